"""The monitoring page's routes (:func:`monitor_routes`), mounted by whoever builds the service app.

- ``GET /``, ``GET /workflows/{id}``: the pages (open: they hold no data).
- ``GET /static/...``: their script and style sheet (package data).
- ``GET /api/workflows``: every workflow, newest first.
- ``GET /api/workflows/{id}``: one workflow, its tasks and a job timeline.
- ``GET /api/workflows/{id}/tasks/{task}/jobs/{job}``: one job, its error and stderr tail.
- ``POST /api/workflows/{id}/cancel``, ``POST /api/workflows/{id}/tasks/{task}/cancel``:
  cancel unfinished jobs.

``/api`` is behind the service's token like the cache and results endpoints:
job logs and tracebacks can hold what only the workflow's owner should see.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from idds_fat.errors import IddsFatError
from idds_fat.monitor import pages, views
from idds_fat.monitor.steering import Attach, cancel_jobs
from idds_fat.workflow.catalog import TaskNotFound, WorkflowNotFound

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

Handler = Callable[[Request], Awaitable[Response]]

# The pages load nothing but their own script and style; no framing (a cancel
# button must not be clickable through someone else's page).
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _json(payload: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(payload, status_code=status, headers=_API_HEADERS)


async def _answer(call: Callable[[], Any]) -> Response:
    """Run a view in a thread (it reads SQLite) and map lookup failures to 404, others to 409."""
    try:
        return _json(await run_in_threadpool(call))
    except (WorkflowNotFound, TaskNotFound) as exc:
        return _json({"error": str(exc)}, 404)
    except (IddsFatError, KeyError) as exc:
        return _json({"error": str(exc).strip("'\"")}, 409)


def monitor_routes(
    work_dir: Path, guarded: Callable[[Handler], Handler], attach: Attach
) -> list[BaseRoute]:
    """Return the monitoring page's routes for the workflows recorded under ``work_dir``.

    ``guarded`` wraps a handler in the service's bearer-token check; every
    ``/api`` route goes through it. ``attach`` (:meth:`Workflow.attach`) reconnects
    to a workflow that is not open in this process, to cancel its jobs.
    """
    work_dir = Path(work_dir)

    async def index(request: Request) -> Response:
        return HTMLResponse(pages.index_page(), headers=_PAGE_HEADERS)

    async def workflow(request: Request) -> Response:
        page = pages.workflow_page(request.path_params["workflow"])
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    async def api_workflows(request: Request) -> Response:
        return await _answer(lambda: views.workflows_view(work_dir))

    async def api_workflow(request: Request) -> Response:
        workflow_id = request.path_params["workflow"]
        return await _answer(lambda: views.workflow_view(work_dir, workflow_id))

    async def api_job(request: Request) -> Response:
        params = request.path_params
        return await _answer(
            lambda: views.job_view(work_dir, params["workflow"], params["task"], params["job"])
        )

    async def api_cancel(request: Request) -> Response:
        workflow_id = request.path_params["workflow"]
        task = request.path_params.get("task")
        logger.info("cancel requested from the monitor: workflow %s, task %s", workflow_id, task)
        return await _answer(lambda: cancel_jobs(work_dir, workflow_id, task, attach))

    return [
        Route("/", index, methods=["GET"]),
        Route("/workflows/{workflow}", workflow, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="monitor-static"),
        Route("/api/workflows", guarded(api_workflows), methods=["GET"]),
        Route("/api/workflows/{workflow}", guarded(api_workflow), methods=["GET"]),
        Route(
            "/api/workflows/{workflow}/tasks/{task}/jobs/{job:int}",
            guarded(api_job),
            methods=["GET"],
        ),
        Route("/api/workflows/{workflow}/cancel", guarded(api_cancel), methods=["POST"]),
        Route(
            "/api/workflows/{workflow}/tasks/{task}/cancel", guarded(api_cancel), methods=["POST"]
        ),
    ]
