"""The monitoring page: workflows, their tasks and jobs, live in a browser, and steering.

The service mounts :func:`monitor_routes`: HTML pages at ``/`` and
``/workflows/ID``, their script and style sheet under ``/static``, and the data
they show as JSON under ``/api`` (read from the work dir's workflow records by
:mod:`idds_fat.workflow.catalog`). The pages hold no data: their script fetches
it with the service's bearer token, which the page asks for and keeps in the
browser tab's session storage, never in a URL.
"""

from idds_fat.monitor.routes import monitor_routes

__all__ = ["monitor_routes"]
