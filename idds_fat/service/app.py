"""The idds-fat HTTP service: a content cache and a result store with long polling.

Endpoints (all but ``/healthz`` need ``Authorization: Bearer <token>``; the
service always has a token):

- ``PUT /cache/{key}``: store the body under its sha256 ``key``; 201 new, 200 existed.
- ``GET|HEAD /cache/{key}``: the object's bytes; 404 when absent. The service
  does not verify on the way out: readers check the sha256 themselves.
- ``POST /results/{workflow}``: store a result envelope; 201 ``{"seq": n}``.
- ``GET /results/{workflow}?since=0&wait=0&limit=1000``:
  ``{"cursor": n, "results": [{"seq": n, "envelope": "<base64>"}]}``, waiting up
  to ``wait`` seconds (at most 60) for a result newer than ``since``; with
  ``task=t0001&job=0``, only the results whose header names that job; with
  ``holder=ID``, without the copies kept for reader ID (its own, ``ResultStore.add``),
  the cursor moving past them.
- ``GET /healthz``: ``{"ok": true}``.
- ``POST /pilots/{pool}/lease`` and ``/done``: pilots pull jobs (:mod:`idds_fat.service.leases`).

Whoever builds the app may mount more routes behind the same token check
(``routes``): the workflow's embedded service and ``idds-fat serve`` mount the
monitoring page (:mod:`idds_fat.monitor`) this way, so this package imports
nothing of the monitor.

Before any route, :class:`~idds_fat.service.exposure.RequestOriginCheck`
answers 421 to a ``Host`` the service does not answer to (DNS rebinding) and
403 to a state-changing or ``/api`` request from another origin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from idds_fat.cache.base import check_key, content_key
from idds_fat.cache.directory import DirectoryStore
from idds_fat.service.exposure import HostPolicy, RequestOriginCheck
from idds_fat.service.leases import lease_routes
from idds_fat.service.mirror import BrokerMirror
from idds_fat.service.result_store import ResultStore

logger = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60.0
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
PURGE_INTERVAL_SECONDS = 3600.0

Handler = Callable[[Request], Awaitable[Response]]
#: Wraps a handler in the service's bearer-token check.
Guard = Callable[[Handler], Handler]
#: Given the service's token check, the extra routes to mount (e.g. the monitoring page's).
ExtraRoutes = Callable[[Guard], Sequence[BaseRoute]]


class ResultWakeups:
    """One asyncio event per workflow that long-polling readers wait on.

    A POST sets the workflow's event and drops it, so the next reader gets a
    fresh one. Readers take the event *before* querying the store, so a result
    that lands between their query and their wait still wakes them.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the server's loop, so :meth:`close_threadsafe` can reach it."""
        self._loop = loop
        self.closing = False

    def watch(self, workflow: str) -> asyncio.Event:
        """Return the event the next result for ``workflow`` will set; pair with :meth:`release`."""
        event = self._events.setdefault(workflow, asyncio.Event())
        self._waiters[workflow] = self._waiters.get(workflow, 0) + 1
        return event

    def release(self, workflow: str, event: asyncio.Event) -> None:
        """Forget one reader of ``workflow``; drop its event when nobody waits on it."""
        left = self._waiters.get(workflow, 1) - 1
        if left > 0:
            self._waiters[workflow] = left
            return
        self._waiters.pop(workflow, None)
        if self._events.get(workflow) is event:
            del self._events[workflow]

    def waiting(self, workflow: str) -> int:
        """Return how many readers are waiting for ``workflow`` right now."""
        return self._waiters.get(workflow, 0)

    def notify(self, workflow: str) -> None:
        """Wake every reader waiting for ``workflow``."""
        event = self._events.pop(workflow, None)
        if event is not None:
            event.set()

    def close(self) -> None:
        """Wake every reader for good: the service is stopping."""
        self.closing = True
        for event in self._events.values():
            event.set()
        self._events.clear()

    def close_threadsafe(self) -> None:
        """Call :meth:`close` on the server's loop from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self._loop.call_soon_threadsafe(self.close)


def _bad_request(reason: str) -> PlainTextResponse:
    return PlainTextResponse(reason.splitlines()[0] if reason else "bad request", 400)


def _query_number(request: Request, name: str, default: float, kind: type) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    value = kind(raw)  # ValueError reaches the caller as a 400
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return value


def create_app(
    cache_root: Path,
    db_path: Path,
    token: str,
    result_ttl_seconds: float,
    mirror: dict[str, Any] | None = None,
    routes: ExtraRoutes | None = None,
    hosts: HostPolicy | None = None,
) -> Starlette:
    """Return the service as an ASGI application.

    ``cache_root`` holds the content cache (a :class:`DirectoryStore` layout);
    ``db_path`` is the SQLite file of results, opened when the app starts and
    closed when it stops. Every endpoint but ``/healthz`` answers 401 unless the
    request carries ``Authorization: Bearer <token>``. ``hosts`` says which
    ``Host`` headers it answers to (default: loopback names only); requests from
    a browser page of another origin are refused
    (:mod:`idds_fat.service.exposure`).
    Expired results are purged at startup and then every hour. With ``mirror``
    (the keyword arguments of :class:`~idds_fat.service.mirror.BrokerMirror`
    but the store: ``brokers``, ``destination``, ``user``, ``password``), the
    app also keeps a copy of every result sent to that broker destination.
    ``routes``, given the token check (a :data:`Guard`), returns more routes to
    mount after the service's own: the monitoring page's, whose ``/api`` routes
    go through the check and whose pages do not.

    ``app.state.wakeups`` (a :class:`ResultWakeups`) lets an embedding server
    release long-polling readers before shutting down; ``app.state.results``
    (the :class:`ResultStore`, once the app has started) lets it store results
    it got by other means.

    Raises:
        ValueError: ``token`` is empty: a service without one answers anybody.
    """
    if not token:
        raise ValueError("the service needs a token (idds_fat.service.exposure.generate_token)")
    cache = DirectoryStore(Path(cache_root))
    expected = ("Bearer " + token).encode()
    wakeups = ResultWakeups()
    state: dict[str, ResultStore] = {}

    def guarded(handler: Handler) -> Handler:
        async def check(request: Request) -> Response:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return PlainTextResponse(
                    "missing or wrong bearer token", 401, headers={"WWW-Authenticate": "Bearer"}
                )
            return await handler(request)

        return check

    def results() -> ResultStore:
        return state["results"]

    async def put_object(request: Request) -> Response:
        key = request.path_params["key"]
        try:
            check_key(key)
        except ValueError as exc:
            return _bad_request(str(exc))
        body = await request.body()

        def store() -> int:
            if content_key(body) != key:
                return 400
            if cache.exists(key):
                return 200
            # The key is already checked against the body: skip put()'s second sha256.
            cache._write(key, body)
            return 201

        status = await run_in_threadpool(store)
        if status == 400:
            return _bad_request(f"body does not match its key {key}")
        return Response(status_code=status)

    async def get_object(request: Request) -> Response:
        key = request.path_params["key"]
        try:
            path = cache.path(key)
        except ValueError as exc:
            return _bad_request(str(exc))
        if not path.is_file():
            return Response(status_code=404)
        return FileResponse(path, media_type="application/octet-stream")

    async def post_result(request: Request) -> Response:
        workflow = request.path_params["workflow"]
        body = await request.body()
        try:
            seq = await run_in_threadpool(results().add, workflow, body)
        except ValueError as exc:
            return _bad_request(str(exc))
        wakeups.notify(workflow)
        return JSONResponse({"seq": seq}, status_code=201)

    async def get_results(request: Request) -> Response:
        workflow = request.path_params["workflow"]
        try:
            since = int(_query_number(request, "since", 0, int))
            wait = min(max(_query_number(request, "wait", 0.0, float), 0.0), MAX_WAIT_SECONDS)
            limit = int(_query_number(request, "limit", DEFAULT_LIMIT, int))
            raw_job = request.query_params.get("job")
            job = int(raw_job) if raw_job else None
        except ValueError as exc:
            return _bad_request(f"bad query parameter: {exc}")
        task = request.query_params.get("task")
        holder = request.query_params.get("holder") or None
        limit = min(max(limit, 1), MAX_LIMIT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            event = wakeups.watch(workflow)
            try:
                rows = await run_in_threadpool(
                    results().since, workflow, since, limit, task, job, holder
                )
                remaining = deadline - loop.time()
                if rows or remaining <= 0 or wakeups.closing:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
            finally:
                wakeups.release(workflow, event)
        return JSONResponse(
            {
                "cursor": rows[-1][0] if rows else since,
                "results": [
                    {"seq": seq, "envelope": base64.b64encode(envelope).decode("ascii")}
                    for seq, envelope in rows
                    if envelope is not None  # only moves the holder's cursor on
                ],
            }
        )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def purge_periodically(store: ResultStore) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)
            try:
                await run_in_threadpool(store.purge)
            except Exception:
                logger.exception("purging expired results failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = await run_in_threadpool(ResultStore, Path(db_path), result_ttl_seconds)
        state["results"] = store
        app.state.results = store
        wakeups.bind(asyncio.get_running_loop())
        await run_in_threadpool(store.purge)
        purger = asyncio.create_task(purge_periodically(store))
        mirrored = None
        if mirror:
            loop = asyncio.get_running_loop()
            mirrored = BrokerMirror(
                store,
                **mirror,
                on_stored=lambda wf: loop.call_soon_threadsafe(wakeups.notify, wf),
            )
            mirrored.start()
        app.state.mirror = mirrored
        logger.info("idds-fat service ready (cache %s, results %s)", cache_root, db_path)
        try:
            yield
        finally:
            if mirrored is not None:
                await run_in_threadpool(mirrored.stop)
            wakeups.close()
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            store.close()

    own_routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/cache/{key}", guarded(put_object), methods=["PUT"]),
        Route("/cache/{key}", guarded(get_object), methods=["GET", "HEAD"]),
        Route("/results/{workflow}", guarded(post_result), methods=["POST"]),
        Route("/results/{workflow}", guarded(get_results), methods=["GET"]),
        *lease_routes(guarded),  # pilots pull jobs here (leases.py)
    ]
    app = Starlette(
        routes=[*own_routes, *(routes(guarded) if routes else ())],
        middleware=[Middleware(RequestOriginCheck, hosts=hosts or HostPolicy())],
        lifespan=lifespan,
    )
    app.state.wakeups = wakeups
    return app
