"""The monitoring page: workflows, their tasks and jobs, live in a browser, and steering.

How data moves through it::

    browser --GET /, /workflows/ID----> pages.py     (HTML shells: no data, no token)
    script  --GET /api/... + token----> routes.py -> views.py -> workflow.catalog
                                                     (each workflow's state.sqlite3)
    script  --POST /api/.../cancel----> routes.py -> steering.cancel_jobs
                                          open here:  Workflow.cancel
                                          elsewhere:  attach(id), cancel, detach

Whoever builds the service app mounts :func:`monitor_routes` (the workflow's
embedded service, ``idds-fat serve``) and gives it ``attach``
(:meth:`Workflow.attach`), so this package needs no import of the workflow
runtime. The pages' script fetches the data with the service's bearer token,
which the page asks for (or takes from a ``#token=`` fragment of the link that
opened it, then drops from the address bar) and keeps in the browser tab's
session storage, never in a URL sent to a server.
"""

from idds_fat.monitor.routes import monitor_routes

__all__ = ["monitor_routes"]
