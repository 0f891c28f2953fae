"""Running the service: in a thread of the caller's process, or as ``idds-fat serve``."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from idds_fat.errors import ServiceError
from idds_fat.service.app import ExtraRoutes, create_app
from idds_fat.service.exposure import HostPolicy, check_token, generate_token, is_loopback
from idds_fat.service.result_store import ResultStore

logger = logging.getLogger(__name__)

DEFAULT_RESULT_TTL_SECONDS = 7 * 86400.0
_GRACEFUL_SHUTDOWN_SECONDS = 5
RESULTS_DB = "results.sqlite3"
_START_TIMEOUT_SECONDS = 30.0


__all__ = ["EmbeddedService", "is_loopback", "serve"]


def _app_for(
    data_dir: Path,
    token: str,
    result_ttl_seconds: float,
    mirror: dict | None = None,
    routes: ExtraRoutes | None = None,
    hosts: HostPolicy | None = None,
) -> Starlette:
    data_dir = Path(data_dir)
    return create_app(
        cache_root=data_dir / "cache",
        db_path=data_dir / RESULTS_DB,
        token=token,
        result_ttl_seconds=result_ttl_seconds,
        mirror=mirror,
        routes=routes,
        hosts=hosts,
    )


class EmbeddedService:
    """The service on a loopback port, served by uvicorn in a daemon thread.

    The cache lives in ``data_dir/cache`` and the results in
    ``data_dir/results.sqlite3``, so a new service on the same ``data_dir``
    finds what an earlier one stored. ``port`` 0 (the default) takes a free
    port; a given port lets a restarted service come back at the same URL.
    ``mirror`` (``brokers``, ``destination``, ``user``, ``password``) keeps a
    copy of the results sent to that broker destination. ``routes`` mounts more
    routes behind the token check (:func:`~idds_fat.service.app.create_app`):
    a workflow mounts its monitoring page there. Use as a context manager, or
    call :meth:`start` and :meth:`stop`.

    It always has a token: ``token=None`` makes a random one (``self.token``),
    which every request but ``/healthz`` must carry. It answers loopback
    ``Host`` names only, and refuses browser requests from other origins
    (:mod:`idds_fat.service.exposure`).
    """

    def __init__(
        self,
        data_dir: Path,
        token: str | None,
        result_ttl_seconds: float = DEFAULT_RESULT_TTL_SECONDS,
        mirror: dict | None = None,
        port: int = 0,
        routes: ExtraRoutes | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.routes = routes
        self.port = port
        self.token = token or generate_token()
        self.result_ttl_seconds = result_ttl_seconds
        self.mirror = mirror
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._url: str | None = None
        self._app: Starlette | None = None

    @property
    def url(self) -> str:
        """Return the base URL (``http://127.0.0.1:PORT``). Raises ServiceError if not started."""
        if self._url is None:
            raise ServiceError("the embedded service is not running")
        return self._url

    @property
    def app(self) -> Starlette | None:
        """The running ASGI app (its ``state`` holds ``results``, ``mirror`` and
        ``wakeups``), or None when the service is not running."""
        return self._app

    def start(self) -> EmbeddedService:
        """Start serving and return once the service accepts requests; return ``self``.

        Raises:
            ServiceError: already started, or the server failed to start in time.
        """
        if self._thread is not None:
            raise ServiceError(f"the embedded service is already running at {self._url}")
        app = _app_for(self.data_dir, self.token, self.result_ttl_seconds, self.mirror, self.routes)
        # Bind here (port 0) and hand the socket over: no window where another
        # process could take the port between choosing and binding it.
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it Nagle plus delayed ACKs stall each response by ~40 ms.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # Reuse lets a restarted service take its old port back at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"idds-fat-service-{port}",
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(_GRACEFUL_SHUTDOWN_SECONDS)
                sock.close()
                raise ServiceError(
                    f"the embedded service on port {port} did not start (data dir "
                    f"{self.data_dir}); see the uvicorn errors logged above"
                )
            time.sleep(0.005)  # uvicorn offers a flag, not an event
        self._server, self._thread, self._socket = server, thread, sock
        self._url = f"http://127.0.0.1:{port}"
        self._app = app
        logger.debug("embedded service running at %s", self._url)
        return self

    def keep_result(self, workflow: str, envelope: bytes, holder: str | None = None) -> None:
        """Store a result envelope that reached the caller by another way (a warm worker's pipe).

        Readers are not woken: the caller that got it needs no copy now, and
        the copy is there for a later ``attach`` or ``idds-fat results``; a read
        by ``holder`` (the caller's own reader, which has it) passes over it
        (``ResultStore.add``). When the service is stopped (its caller detached),
        the copy goes straight into the store's database, where a service started
        later on ``data_dir`` finds it.

        Raises:
            ValueError: ``envelope`` is not an envelope of ``workflow``.
            sqlite3.Error: the store's database could not be written.
        """
        app = self._app
        if app is not None:
            app.state.results.add(workflow, envelope, holder)
            return
        store = ResultStore(self.data_dir / RESULTS_DB, self.result_ttl_seconds)
        try:
            store.add(workflow, envelope, holder)
        finally:
            store.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: release long polls, let requests finish, join the thread.

        Waits at most about ``timeout`` seconds; does nothing if not running.
        """
        server, thread, app = self._server, self._thread, self._app
        if server is None or thread is None or app is None:
            return
        app.state.wakeups.close_threadsafe()
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "embedded service at %s did not stop in %ss; forcing", self._url, timeout
            )
            server.force_exit = True
            thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = self._app = None
        self._url = None

    def __enter__(self) -> EmbeddedService:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    host: str,
    port: int,
    data_dir: Path,
    token: str | None,
    result_ttl_seconds: float,
    mirror: dict | None = None,
    routes: ExtraRoutes | None = None,
    public_hosts: Sequence[str] = (),
) -> None:
    """Run the service in the foreground until interrupted (Ctrl-C or SIGTERM).

    With ``mirror`` (``brokers``, ``destination``, ``user``, ``password``) it
    also keeps a copy of every result sent to that broker destination.
    ``routes`` mounts more routes behind the token check (``idds-fat serve``
    mounts the monitoring page there). It answers the ``Host`` names of
    :meth:`HostPolicy.for_listener`: loopback names, ``public_hosts`` (names or
    URLs clients reach it by), and beyond loopback this machine's names and any
    IP address.

    Raises:
        ServiceError: no ``token``, or one too weak
            (:data:`~idds_fat.service.exposure.TOKEN_RULE`): on loopback too, other
            users of the machine and web pages in its browsers can reach the service.
    """
    try:
        token = check_token(token)
    except ValueError as exc:
        raise ServiceError(
            f"refusing to start the service on {host}: {exc}. Set IDDS_FAT_TOKEN "
            "(export IDDS_FAT_TOKEN=$(idds-fat token))."
        ) from None
    if not is_loopback(host):
        logger.warning(
            "listening on %s over plain HTTP: the token travels in clear text; "
            "put a TLS proxy in front for untrusted networks",
            host,
        )
    hosts = HostPolicy.for_listener(host, public_hosts)
    app = _app_for(data_dir, token, result_ttl_seconds, mirror, routes, hosts)
    logger.info("idds-fat service on http://%s:%d, data in %s", host, port, data_dir)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
    )
