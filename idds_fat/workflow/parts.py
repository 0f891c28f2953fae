"""The parts a running workflow has: service, cache, state record, result channels, backend.

A new workflow creates them (:meth:`WorkflowParts.create`), one attached to
later reopens them from its work dir (:meth:`WorkflowParts.reopen`); both then
start listening and the backend (:meth:`WorkflowParts.start`), and
:meth:`WorkflowParts.stop` stops them in reverse.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from idds_fat.backends import Backend, BackendSetup, backend_class
from idds_fat.cache import ContentStore, DirectoryStore, HttpStore, open_store
from idds_fat.context import ContextArchive, build_context_archive
from idds_fat.errors import ServiceAccessError, ServiceError
from idds_fat.results import RestResultSource, ResultCollector
from idds_fat.results.stomp import StompResultSubscriber
from idds_fat.workdir import WorkDirPaths, WorkflowPaths, private_dir, slug, write_private
from idds_fat.workflow.deadlines import Deadlines
from idds_fat.workflow.specs import node_location, presigns
from idds_fat.workflow.state import WorkflowState
from idds_fat.wrapper_source import wrapper_bytes, wrapper_file

if TYPE_CHECKING:
    from idds_fat.monitor.steering import Attach
    from idds_fat.service import EmbeddedService
    from idds_fat.workflow.options import WorkflowOptions
    from idds_fat.workflow.tracker import JobTracker

logger = logging.getLogger(__name__)


def check_service(url: str, token: str | None, workflow_id: str) -> None:
    """Check that the idds-fat service at ``url`` answers and takes ``token``.

    Asks for the workflow's results (``GET /results/{workflow_id}?limit=1``):
    cheap, behind the token check, and the very request its collector will make.

    Raises:
        ServiceAccessError: it could not be reached, refused the token (401) or
            answered another error; the message names the service and the status,
            never the token.
    """
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no user:password
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.get(
            f"{url}/results/{workflow_id}",
            params={"since": 0, "wait": 0, "limit": 1},
            headers=headers,
            timeout=(5.0, 15.0),
        )
    except requests.RequestException as exc:
        raise ServiceAccessError(
            f"idds-fat service at {shown} (service_url) could not be reached: "
            f"{type(exc).__name__}: {exc}",
            shown,
        ) from None
    status = response.status_code
    if status == 200:
        return
    if status in (401, 403):
        given = "the token given was refused" if token else "no token was given"
        why = f"{given}; set token (or IDDS_FAT_TOKEN) to the service's token"
    elif status == 404:
        why = "is it an idds-fat service (idds-fat serve)?"
    else:
        why = response.text[:200].strip()
    raise ServiceAccessError(
        f"idds-fat service at {shown} (service_url) answered HTTP {status}: {why}", shown, status
    )


def _caller() -> dict[str, Any]:
    """Who follows the workflow now: ``attach`` refuses while this process lives."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


class WorkflowParts:
    """The parts one workflow runs, and its identity; all empty until it starts.

    Attributes:
        workflow_id: the workflow's id (``""`` until it starts).
        work_dir: its directory (logs, state, key); None until it starts.
        key: the HMAC key that signs its payloads and results.
        token: the bearer token of its service.
        service_url: the base URL of its service (embedded or given).
        service: the embedded service, when this process runs it.
        archive: the packed code context, when there is a ``source_dir``.
        cache: the content store that objects travel through.
        state: its state record (``state.sqlite3``), read by ``attach`` and the monitor.
        collector: receives, verifies and dedupes its results.
        subscriber: its STOMP subscription, when a broker is configured.
        deadlines: runs the checks due after a job ended (result grace periods).
        backend: runs its jobs.
    """

    def __init__(self, options: WorkflowOptions, attach: Attach) -> None:
        self.options = options
        self._attach = attach  # for the monitoring page of the embedded service
        self.workflow_id = ""
        self.work_dir: Path | None = None
        self.key = b""
        self.token: str | None = None
        self.service_url = ""
        self.service: EmbeddedService | None = None
        self.archive: ContextArchive | None = None
        self.cache: ContentStore | None = None
        self.state: WorkflowState | None = None
        self.collector: ResultCollector | None = None
        self.subscriber: StompResultSubscriber | None = None
        self.deadlines: Deadlines | None = None
        self.backend: Backend | None = None

    def create(self, name: str) -> None:
        """Create a new workflow named ``name``: its id, work dir and key, its packed
        code context, its service (embedded unless one is configured), cache and
        state record, and the connection file a later ``attach`` reads.

        Raises:
            ContextError: the code context cannot be packed.
            ServiceAccessError: a configured ``service_url`` cannot be reached or
                refuses the token (checked first).
            ServiceError: the embedded service cannot be started.
        """
        options = self.options
        config = options.config
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        self.workflow_id = f"{slug(name)}-{stamp}-{secrets.token_hex(3)}"
        if config.service_url:  # checked before anything is written or packed
            check_service(config.service_url.rstrip("/"), config.token, self.workflow_id)
        paths = WorkDirPaths(config.work_dir).workflow(self.workflow_id)
        self.work_dir = paths.root
        private_dir(self.work_dir)  # 0700 from the work dir down: only its user reads it
        self.key = secrets.token_bytes(32)
        write_private(paths.hmac_key, self.key)
        source_dir = options.source_dir
        if source_dir is not None:
            self.archive = build_context_archive(
                source_dir,
                options.exclude_source_files,
                config.max_context_bytes,
                index_dir=WorkDirPaths(config.work_dir).context_index,
            )
        if config.service_url:
            self.service_url, self.token = config.service_url.rstrip("/"), config.token
        else:
            self._start_embedded_service(secrets.token_urlsafe(24), port=0)
        cache = self._open_cache(config.cache)
        if self.archive is not None and source_dir is not None:
            if self.archive.data is None and not cache.exists(self.archive.sha256):
                # Packed before, but not into this cache: pack it after all.
                self.archive = build_context_archive(
                    source_dir, options.exclude_source_files, config.max_context_bytes
                )
            if self.archive.data is not None:
                cache.put(self.archive.data)
        self.state = WorkflowState(paths.state)
        self.state.record_workflow(
            self.workflow_id,
            name,
            {
                "backend": config.backend,
                "source_dir": str(source_dir) if source_dir else None,
                "context_sha256": self.archive.sha256 if self.archive else None,
                "service_url": self.service_url,
                "cache": cache.location,
                "broker": config.broker,
                "resources": options.resources.__dict__,
                "placement": options.placement,
            },
        )
        # What a later attach() needs to reconnect; the token makes it private.
        connection = {
            "service_url": self.service_url,
            "token": self.token,
            "embedded": self.service is not None,
            "cache": cache.location,
            "caller": _caller(),
        }
        write_private(paths.connection, json.dumps(connection).encode())

    def reopen(self, workflow_dir: Path) -> None:
        """Reconnect to the workflow created earlier in ``workflow_dir``: take its key,
        become its follower, restart its embedded service at the same address (so
        its jobs can still deliver; elsewhere if that port is taken), and open its
        cache and state record.

        Raises:
            OSError: its key or connection file cannot be read.
            ServiceError: its service cannot be reached or started.
        """
        config = self.options.config
        paths = WorkflowPaths(workflow_dir)
        self.workflow_id = paths.workflow_id
        self.work_dir = workflow_dir
        self.key = paths.hmac_key.read_bytes()
        connection = json.loads(paths.connection.read_text())
        connection["caller"] = _caller()
        write_private(paths.connection, json.dumps(connection).encode())
        if connection["embedded"] and not config.service_url:
            port = int(connection["service_url"].rsplit(":", 1)[1])
            try:
                self._start_embedded_service(connection["token"], port=port)
            except (OSError, ServiceError) as exc:
                # Jobs still running would not reach a service elsewhere; results
                # already stored are read all the same.
                logger.warning("port %d is taken (%s); starting on another", port, exc)
                self._start_embedded_service(connection["token"], port=0)
        else:
            self.service_url = config.service_url or connection["service_url"]
            self.token = config.token or connection["token"]
            check_service(self.service_url.rstrip("/"), self.token, self.workflow_id)
        self._open_cache(connection["cache"])
        self.state = WorkflowState(paths.state)
        self.state.follow()

    def start(self, tracker: JobTracker, catch_up: bool = False) -> None:
        """Start listening for results (handed to ``tracker``) and the backend (whose
        job starts and ends go to ``tracker``). With ``catch_up``, settle the results
        that arrived while nobody listened before the backend starts.

        Raises:
            ServiceError: ``catch_up`` could not read the result store.
        """
        self._start_channels(tracker)
        if catch_up:
            assert self.collector is not None
            self.collector.drain()
        self._start_backend(tracker)

    def result_counts(self) -> dict[str, int]:
        """Return the collector's counts: ``received``, ``duplicates``, ``rejected``, and
        how many new results each channel (``stomp``, ``rest``, ``local``) brought first."""
        c = self.collector
        if c is None:
            return {
                "received": 0,
                "duplicates": 0,
                "rejected": 0,
                "stomp": 0,
                "rest": 0,
                "local": 0,
            }
        return {
            "received": c.received,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            **c.by_channel,
        }

    def _start_embedded_service(self, token: str, port: int) -> None:
        from idds_fat.monitor import monitor_routes
        from idds_fat.service import EmbeddedService

        config = self.options.config
        self.token = token
        self.service = EmbeddedService(
            config.work_dir,
            token,
            config.result_ttl_days * 86400,
            mirror=self.options.mirror_settings(self.workflow_id),
            port=port,
            routes=lambda guarded: monitor_routes(config.work_dir, guarded, self._attach),
        )
        self.service.start()
        self.service_url = self.service.url

    def _open_cache(self, location: str | None) -> ContentStore:
        if location is None:
            self.cache = DirectoryStore(WorkDirPaths(self.options.config.work_dir).cache)
        elif location == "service":
            self.cache = HttpStore(self.service_url + "/cache", self.token)
        elif location.startswith("s3://"):
            from idds_fat.cache.s3 import S3Store

            self.cache = S3Store(location, url_lifetime=self.options.config.cache_url_lifetime)
        else:
            self.cache = open_store(location, self.token)
        return self.cache

    def _start_channels(self, tracker: JobTracker) -> None:
        config = self.options.config
        source = RestResultSource(self.service_url, self.workflow_id, self.token)
        self.collector = ResultCollector(
            source, self.workflow_id, self.key, tracker.dispatch, fetch_ref=self._fetch_result_ref
        )
        self.collector.start()
        self.deadlines = Deadlines(f"idds-fat-deadlines-{self.workflow_id}")
        if config.broker:
            self.subscriber = StompResultSubscriber(
                config.brokers,
                self.options.result_queue(self.workflow_id),
                on_message=self.collector.accept,
                on_state=self.collector.stomp_state,
                user=config.broker_user,
                password=config.broker_password,
                heartbeat_ms=config.broker_heartbeat_ms,
            )
            self.subscriber.start()

    def _fetch_result_ref(self, ref: dict[str, Any]) -> bytes:
        """Read the large result a verified reference names (by content key or by name)."""
        assert self.cache is not None
        if ref.get("ref_name"):
            return self.cache.get_named(str(ref["ref_name"]))  # type: ignore[attr-defined]
        return self.cache.get(str(ref["ref"]))

    def _start_backend(self, tracker: JobTracker) -> None:
        config, cache, work_dir = self.options.config, self.cache, self.work_dir
        assert cache is not None and work_dir is not None
        wrapper_key = cache.put(wrapper_bytes())
        wrapper = wrapper_file(work_dir)  # what local and Slurm jobs import
        job_secrets = {
            "hmac_key": self.key.hex(),
            "token": self.token,
            "broker_user": config.broker_user,
            "broker_password": config.broker_password,
        }
        wrapper_url = None
        if presigns(cache) or cache.location.startswith(("http://", "https://")):
            wrapper_url = node_location(cache, wrapper_key)
        setup = BackendSetup(
            work_dir=work_dir,
            wrapper_path=wrapper,
            secrets=job_secrets,
            on_exit=tracker.job_ended,
            on_start=tracker.job_started,
            wrapper_url=wrapper_url,
            placement=self.options.placement,
            # Straight back over the worker's pipe only when this caller keeps the
            # REST copy itself; a broker, when configured, is what the user asked for.
            direct_results=bool(
                config.local_direct_results and self.service is not None and not config.broker
            ),
            service_url=self.service_url if self.service is not None else None,
        )
        self.backend = backend_class(config.backend, config.slurm_mode).create(config, setup)

    def stop(self) -> None:
        """Stop what was started, in reverse (the backend is shut down by the caller
        first: waiting for its jobs or not is the caller's choice). Safe to call on
        parts that never started."""
        if self.deadlines is not None:
            self.deadlines.stop()
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.collector is not None:
            self.collector.stop(timeout=0.0)
        if self.service is not None:
            self.service.stop()
        if self.collector is not None:
            # The embedded service woke the long poll as it stopped; a remote one
            # answers within the poll's wait, and the daemon thread then ends alone.
            self.collector.stop(timeout=0.5)
        if self.cache is not None:
            self.cache.close()
        if self.state is not None:
            self.state.close()
