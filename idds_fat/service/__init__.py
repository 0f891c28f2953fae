"""The idds-fat HTTP service: content cache and result store (and the routes its builder mounts).

How data moves through it::

    job (wrapper) --PUT /cache/KEY--------> DirectoryStore   (data_dir/cache)
    job, caller   <-GET /cache/KEY---------'
    job (wrapper) --POST /results/WF------> ResultStore      (data_dir/results.sqlite3)
    broker queue  --BrokerMirror (STOMP)--'      |  ResultWakeups.notify(WF)
    caller        <-GET /results/WF?since&wait--'   (long poll, woken per workflow)
    browser       --/, /api/...-----------> routes its builder mounted (the monitoring page)

``create_app`` (app.py) builds the ASGI app, every route behind one bearer-token
check and, before it, the Host and Origin checks of ``exposure.py`` (which also
holds the token rule); ``EmbeddedService`` (server.py) runs it in a thread of the caller's
process, ``serve`` runs it as ``idds-fat serve``. This package imports neither
the workflow nor the monitor: a workflow's parts and ``idds-fat serve`` hand
the monitoring page's routes in.
"""

from __future__ import annotations

from idds_fat.service.app import create_app
from idds_fat.service.result_store import ResultStore
from idds_fat.service.server import EmbeddedService, serve

__all__ = ["EmbeddedService", "ResultStore", "create_app", "serve"]
