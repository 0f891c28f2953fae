"""A running workflow: its id, key, work dir, service, cache, backend and results."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from idds_fat.backends import BACKENDS, Backend, BackendSetup, JobExit, JobRequest, Resources
from idds_fat.cache import ContentStore, DirectoryStore, HttpStore, open_store
from idds_fat.config import Config, load_config
from idds_fat.context import ContextArchive, build_context_archive
from idds_fat.context.environment import (
    EnvironmentSettings,
    as_environment,
    caller_versions,
    environment_spec,
    task_environment,
)
from idds_fat.errors import (
    ConfigError,
    IddsFatError,
    IgnoredParameterWarning,
    JobLostError,
    ServiceError,
)
from idds_fat.results import AsyncResult, MapResult, RestResultSource, ResultCollector
from idds_fat.results.display import WaitProgress, html_table, outcome_counts
from idds_fat.results.futures import LazyValue
from idds_fat.results.outcome import decode_result
from idds_fat.results.stomp import StompResultSubscriber
from idds_fat.serialize import dumps_call, dumps_job_kwargs, register_user_modules, seal
from idds_fat.workflow import resume
from idds_fat.workflow.current import _active, _active_lock
from idds_fat.workflow.current import current_workflow as current_workflow
from idds_fat.workflow.current import require_workflow as require_workflow
from idds_fat.workflow.deadlines import Deadlines
from idds_fat.workflow.job_ends import _exit_reason, _settle, _tail, recorded_outcome
from idds_fat.workflow.state import WorkflowState
from idds_fat.workflow.workdir import _slug, _write_private
from idds_fat.wrapper_source import wrapper_bytes, wrapper_module

logger = logging.getLogger(__name__)

#: Pickled job arguments up to this size travel inside the job spec, larger ones by key.
INLINE_KWARGS_BYTES = 32 * 1024

# iDDS parameter names -> our resource names.
_IDDS_RESOURCES = {"core_count": "cores", "total_memory": "memory_mb", "max_walltime": "walltime"}
_RESOURCE_NAMES = ("cores", "memory_mb", "gpus", "walltime", "jobs_per_worker")
# iDDS parameters that only some backends use.
_PLACEMENT_PARAMETERS = ("queue", "site", "cloud", "init_env", "container_options")
# Applied by the wrapper on every backend (docs/environments/), so never "ignored".
_ENVIRONMENT_PARAMETERS = ("init_env", "container_options")

_warned: set[tuple[str, str]] = set()


def warn_ignored(parameter: str, backend: str, what: str = "") -> None:
    """Warn, once per process, that ``parameter`` has no effect on ``backend``."""
    if (parameter, backend) in _warned:
        return
    _warned.add((parameter, backend))
    warnings.warn(
        f"{parameter} has no effect on the {backend} backend{what}; it is recorded but not used",
        IgnoredParameterWarning,
        stacklevel=4,
    )


class Workflow:
    """A workflow: the context in which ``@work`` calls run as jobs.

    Use it as a context manager (``with Workflow(backend="local") as wf:``) or
    through the ``@workflow`` decorator. While it is open, calling a ``@work``
    function submits a task to its backend; ``submit`` and ``map`` do the same
    for any function, like ``concurrent.futures.Executor``.

    Leaving it waits for the jobs still running (``on_exit="wait"``, the default)
    or cancels them (``on_exit="cancel"``); an exception leaving the body always
    cancels. Then it stops what it started: the backend's workers, the result
    collector and the embedded service. Its work dir (logs, state) stays.

    Args:
        name: a readable name (default ``"workflow"``); part of the id.
        backend: ``"local"`` (default from configuration).
        source_dir: directory zipped and shipped as the jobs' code context; its
            modules are pickled by value. ``None`` ships no archive.
        exclude_source_files: ``.gitignore``-style patterns left out of the context.
        cores, memory_mb, gpus, walltime: default resources of every job.
        on_exit: ``"wait"`` or ``"cancel"``.
        timeout: default seconds a blocking ``@work`` call waits (``None``: no limit).
        config: a :class:`~idds_fat.config.Config` to start from.
        **options: iDDS parameters (``service``, ``local``, ``queue``, ``site``,
            ``cloud``, ``core_count``, ``total_memory``, ``max_walltime``,
            ``init_env``, ``container_options``), ``environment`` (the default
            environment of its tasks: ``Venv``, ``Conda``, ``Container``,
            ``Current`` or a string form; docs/environments/) and any
            :class:`Config` setting (``max_workers``, ``work_dir``, ``cache``, ...).

    Raises:
        ConfigError: an unknown option or a bad value.
        ContextError: ``source_dir`` is missing or too large (when the workflow starts).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        backend: str | None = None,
        source_dir: str | os.PathLike | None = None,
        exclude_source_files: Sequence[str] = (),
        cores: int | None = None,
        memory_mb: int | None = None,
        gpus: int | None = None,
        walltime: float | None = None,
        on_exit: str | None = None,
        timeout: float | None = None,
        config: Config | None = None,
        **options: Any,
    ) -> None:
        resources = {"cores": cores, "memory_mb": memory_mb, "gpus": gpus, "walltime": walltime}
        placement: dict[str, Any] = {}
        self.environment: Any = None  # the default Environment of its tasks (None: Current)
        settings: dict[str, Any] = {"backend": backend, "on_exit": on_exit}
        config_fields = set(Config.__dataclass_fields__)
        for key, value in options.items():
            if key in _IDDS_RESOURCES:
                resources[_IDDS_RESOURCES[key]] = resources[_IDDS_RESOURCES[key]] or value
            elif key == "environment":
                self.environment = as_environment(value)  # a malformed one fails here
            elif key in _PLACEMENT_PARAMETERS or key in ("service", "local"):
                placement[key] = value
            elif key in config_fields:
                settings[key] = value
            else:
                raise ConfigError(f"Workflow got an unknown option {key!r}")
        self.config = load_config(base=config, **settings) if config else load_config(**settings)
        if self.config.backend not in BACKENDS:
            raise ConfigError(
                f"unknown backend {self.config.backend!r}; available: {sorted(BACKENDS)}"
            )
        self.name = name or "workflow"
        self.source_dir = Path(source_dir).resolve() if source_dir is not None else None
        self.exclude_source_files = tuple(exclude_source_files)
        self.resources = Resources(**resources)
        self.placement = placement
        self.timeout = timeout
        self.id = ""
        self.work_dir: Path | None = None
        self.service_url = ""
        self.body: Callable[..., Any] | None = None
        self._key = secrets.token_bytes(32)
        self._token: str | None = None
        self._started = False
        self._closed = False
        self._detached = False
        self._lock = threading.Lock()
        self._futures: dict[tuple[str, int], AsyncResult] = {}
        self._tasks: dict[str, list[AsyncResult]] = {}
        self._task_names: dict[str, str] = {}
        self._jobs: dict[str, JobRequest] = {}
        self._running: set[str] = set()
        self._task_count = 0
        self._service: Any = None
        self._cache: ContentStore | None = None
        self._backend: Backend | None = None
        self._collector: ResultCollector | None = None
        self._subscriber: StompResultSubscriber | None = None
        self._deadlines: Deadlines | None = None
        self._attempts: dict[str, int] = {}
        self._state: WorkflowState | None = None
        self._archive: ContextArchive | None = None
        self._warn_placement(self.config.backend, placement, self.resources)

    # --- life cycle ------------------------------------------------------------------

    def _warn_placement(self, backend: str, placement: dict, resources: Resources) -> None:
        supported = BACKENDS[backend].supported_parameters
        for key, value in placement.items():
            if key == "local":
                if not value:
                    warn_ignored(
                        "local=False", backend, " (the workflow body runs in this process)"
                    )
            elif value is not None and key not in supported and key not in _ENVIRONMENT_PARAMETERS:
                warn_ignored(key, backend)
        for key in _RESOURCE_NAMES:
            if getattr(resources, key) is not None and key not in supported:
                warn_ignored(key, backend)

    @property
    def result_queue(self) -> str:
        """The STOMP destination of this workflow's results."""
        return f"/queue/{self.config.broker_queue_prefix}.{self.id}"

    @property
    def mirror_queue(self) -> str:
        """The STOMP destination of the copy of its results that the service mirrors."""
        return f"/queue/{self.config.broker_queue_prefix}.mirror.{self.id}"

    def _mirror_settings(self) -> dict[str, Any] | None:
        config = self.config
        if not config.broker:
            return None
        return {
            "brokers": config.brokers,
            "destination": self.mirror_queue,
            "user": config.broker_user,
            "password": config.broker_password,
        }

    def _stomp_spec(self) -> dict[str, Any] | None:
        config = self.config
        if not config.broker:
            return None
        return {
            "brokers": config.brokers,
            "destination": self.result_queue,
            "mirror": self.mirror_queue,
            "mirror_ttl": config.result_ttl_days * 86400,
            "timeout": config.broker_timeout,
        }

    def start(self) -> Workflow:
        """Start the workflow (done by ``with`` and by the first task); return self.

        Raises:
            ContextError: the code context cannot be packed.
            ServiceError: the result service cannot be reached or started.
        """
        with self._lock:
            if self._started:
                return self
            if self._closed:
                raise IddsFatError("this workflow is closed; create a new one")
            try:
                self._start()
            except BaseException:
                self._stop_parts()
                raise
            self._started = True
        return self

    def _start(self) -> None:
        config = self.config
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        self.id = f"{_slug(self.name)}-{stamp}-{secrets.token_hex(3)}"
        self.work_dir = config.work_dir / "workflows" / self.id
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self.work_dir / "hmac.key", self._key)
        if self.source_dir is not None:
            self._archive = build_context_archive(
                self.source_dir,
                self.exclude_source_files,
                config.max_context_bytes,
                index_dir=config.work_dir / "context-index",
            )
        if config.service_url:
            self.service_url, self._token = config.service_url.rstrip("/"), config.token
        else:
            self._start_embedded_service(secrets.token_urlsafe(24), port=0)
        self._open_cache(config.cache)
        if self._archive is not None:
            if self._archive.data is None and not self._cache.exists(self._archive.sha256):
                # Packed before, but not into this cache: pack it after all.
                self._archive = build_context_archive(
                    self.source_dir, self.exclude_source_files, config.max_context_bytes
                )
            if self._archive.data is not None:
                self._cache.put(self._archive.data)
        self._state = WorkflowState(self.work_dir / "state.sqlite3")
        self._state.record_workflow(
            self.id,
            self.name,
            {
                "backend": config.backend,
                "source_dir": str(self.source_dir) if self.source_dir else None,
                "context_sha256": self._archive.sha256 if self._archive else None,
                "service_url": self.service_url,
                "cache": self._cache.location,
                "broker": config.broker,
                "resources": self.resources.__dict__,
                "placement": self.placement,
            },
        )
        # What a later attach() needs to reconnect; the token makes it private.
        connection = {
            "service_url": self.service_url,
            "token": self._token,
            "embedded": self._service is not None,
            "cache": self._cache.location,
            "caller": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        _write_private(self.work_dir / "connection.json", json.dumps(connection).encode())
        self._start_channels()
        self._start_backend()
        logger.info("workflow %s started in %s", self.id, self.work_dir)

    def _start_embedded_service(self, token: str, port: int) -> None:
        from idds_fat.monitor import monitor_routes
        from idds_fat.service import EmbeddedService

        config = self.config
        self._token = token
        self._service = EmbeddedService(
            config.work_dir,
            token,
            config.result_ttl_days * 86400,
            mirror=self._mirror_settings(),
            port=port,
            routes=lambda guarded: monitor_routes(config.work_dir, guarded, type(self).attach),
        )
        self._service.start()
        self.service_url = self._service.url

    def _open_cache(self, location: str | None) -> None:
        if location is None:
            self._cache = DirectoryStore(self.config.work_dir / "cache")
        elif location == "service":
            self._cache = HttpStore(self.service_url + "/cache", self._token)
        elif location.startswith("s3://"):
            from idds_fat.cache.s3 import S3Store

            self._cache = S3Store(location, url_lifetime=self.config.cache_url_lifetime)
        else:
            self._cache = open_store(location, self._token)

    def _start_channels(self) -> None:
        config = self.config
        source = RestResultSource(self.service_url, self.id, self._token)
        self._collector = ResultCollector(
            source, self.id, self._key, self._dispatch, fetch_ref=self._fetch_result_ref
        )
        self._collector.start()
        self._deadlines = Deadlines(f"idds-fat-deadlines-{self.id}")
        if config.broker:
            self._subscriber = StompResultSubscriber(
                config.brokers,
                self.result_queue,
                on_message=self._collector.accept,
                on_state=self._collector.stomp_state,
                user=config.broker_user,
                password=config.broker_password,
                heartbeat_ms=config.broker_heartbeat_ms,
            )
            self._subscriber.start()

    def _presigns(self) -> bool:
        return hasattr(self._cache, "presigned_get")

    def _node_location(self, key: str) -> str:
        """Where a job reads cache object ``key``: a presigned URL on S3, else the cache path."""
        if self._presigns():
            return self._cache.presigned_get(key)  # type: ignore[union-attr]
        return wrapper_module().cache_object_location(self._cache.location, key)

    def _add_node_urls(self, spec: dict[str, Any]) -> None:
        """On S3, give the job presigned URLs: nodes have neither credentials nor boto3."""
        if not self._presigns():
            return
        keys = [spec["payload"]["key"]]
        if spec.get("archive"):
            keys.append(spec["archive"]["key"])
        if spec["environment"].get("archive"):
            keys.append(spec["environment"]["archive"]["key"])
        if spec.get("kwargs") and "key" in spec["kwargs"]:
            keys.append(spec["kwargs"]["key"])
        spec["urls"] = {key: self._node_location(key) for key in keys}
        name = f"results/{spec['workflow']}/{spec['task']}/{spec['job']}.{spec['attempt']}"
        spec["result_object"] = name
        spec["result_put_url"] = self._cache.presigned_put(name)  # type: ignore[union-attr]

    def _job_request(
        self, task_id: str, index: int, name: str, spec_key: str, resources: Resources
    ) -> JobRequest:
        """What the backend is given to run job ``index`` of a task, named ``name``."""
        return JobRequest(
            job_id=f"{task_id}/{index}",
            name=f"{self.id}/{task_id}/{name}",
            spec_location=self._node_location(spec_key),
            workdir=self.work_dir / "jobs" / task_id / str(index),
            resources=resources,
        )

    def _fetch_result_ref(self, ref: dict[str, Any]) -> bytes:
        """Read the large result a verified reference names (by content key or by name)."""
        assert self._cache is not None
        if ref.get("ref_name"):
            return self._cache.get_named(str(ref["ref_name"]))  # type: ignore[attr-defined]
        return self._cache.get(str(ref["ref"]))

    def _start_backend(self) -> None:
        config = self.config
        wrapper_key = self._cache.put(wrapper_bytes())
        # A module name: jobs import it, so its bytecode is cached (launch_command).
        wrapper_file = self.work_dir / f"wrapper_{wrapper_key[:16]}.py"
        if not wrapper_file.exists():
            wrapper_file.write_bytes(self._cache.get(wrapper_key))
        job_secrets = {
            "hmac_key": self._key.hex(),
            "token": self._token,
            "broker_user": config.broker_user,
            "broker_password": config.broker_password,
        }
        wrapper_url = None
        if self._presigns() or self._cache.location.startswith(("http://", "https://")):
            wrapper_url = self._node_location(wrapper_key)
        setup = BackendSetup(
            work_dir=self.work_dir,
            wrapper_path=wrapper_file,
            secrets=job_secrets,
            on_exit=self._job_ended,
            on_start=self._job_started,
            wrapper_url=wrapper_url,
            placement=self.placement,
            # Straight back over the worker's pipe only when this caller keeps the
            # REST copy itself; a broker, when configured, is what the user asked for.
            direct_results=bool(
                config.local_direct_results and self._service is not None and not config.broker
            ),
        )
        self._backend = BACKENDS[config.backend].create(config, setup)

    # --- reconnecting to a workflow whose caller went away --------------------------

    @classmethod
    def attach(
        cls,
        workflow_id: str,
        *,
        work_dir: str | os.PathLike | None = None,
        force: bool = False,
        **settings: Any,
    ) -> Workflow:
        """Reconnect to a workflow started earlier (by a caller that may have died).

        Restarts its embedded service at the same address (so its jobs can still
        deliver), rebuilds every task's futures from the workflow's state, collects
        the results that arrived meanwhile, watches the jobs still running, and
        runs again the jobs that never started. The returned workflow is started:
        use it in ``with`` or call ``close()``; ``tasks`` has its MapResults.
        ``workflow_id`` may be a unique prefix. Results already stored are
        dispatched before it returns, so finished jobs show as finished at once.
        Attaching while the process that started (or last attached to) the
        workflow still runs on this host is refused unless ``force``: two
        followers would both act on its jobs.

        Raises:
            IddsFatError: no such workflow, its state is unreadable, or its caller
                is alive.
        """
        return resume.attach(cls, workflow_id, work_dir=work_dir, force=force, **settings)

    # --- tasks as the user sees them ------------------------------------------------

    @property
    def tasks(self) -> dict[str, MapResult]:
        """Every task of this workflow, by task id, as a MapResult in input order."""
        with self._lock:
            return {task: MapResult(futures) for task, futures in self._tasks.items()}

    @property
    def task_names(self) -> dict[str, str]:
        """The name of every task (its function's name unless given), by task id."""
        with self._lock:
            return dict(self._task_names)

    def cancel(self, task_id: str | None = None) -> int:
        """Cancel the unfinished jobs of one task (or of all); return how many.

        Raises:
            KeyError: no task has this id.
        """
        with self._lock:
            if task_id is not None and task_id not in self._tasks:
                raise KeyError(f"no task {task_id!r} in workflow {self.id}")
            chosen = [task_id] if task_id is not None else list(self._tasks)
            futures = [f for t in chosen for f in self._tasks[t] if not f.done()]
        self._cancel(futures)
        return len(futures)

    def close(self, cancel: bool | None = None) -> None:
        """Finish the workflow: wait for (or cancel) running jobs, then stop its parts.

        ``cancel`` defaults to the ``on_exit`` setting. Safe to call twice.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if cancel is None:
            cancel = self.config.on_exit == "cancel"
        try:
            if not cancel:
                # Results decide when a job is done; the backend's own view may lag.
                concurrent.futures.wait(list(self._futures.values()))
            if self._backend is not None:
                self._backend.shutdown(cancel=cancel)
        finally:
            status = "cancelled" if cancel else "finished"
            if self._state is not None and any(
                f.done() and not f.cancelled() and f.exception() for f in self._futures.values()
            ):
                status = "failed" if not cancel else status
            if self._state is not None:
                self._state.set_workflow_status(status)
            self._stop_parts()
            with _active_lock:
                _active[:] = [w for w in _active if w is not self]

    def detach(self) -> None:
        """Stop following this workflow without waiting for or cancelling its jobs.

        The jobs run on (their results wait in the result store or the broker's
        queue); ``Workflow.attach(id)`` follows them again later. Jobs not started
        yet start only when someone attaches.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._detached = True
        try:
            if self._backend is not None:
                self._backend.shutdown(cancel=False, wait=False)
        finally:
            self._stop_parts()
            with _active_lock:
                _active[:] = [w for w in _active if w is not self]

    def _stop_parts(self) -> None:
        if self._deadlines is not None:
            self._deadlines.stop()
        if self._subscriber is not None:
            self._subscriber.stop()
        if self._collector is not None:
            self._collector.stop(timeout=0.0)
        if self._service is not None:
            self._service.stop()
        if self._collector is not None:
            # The embedded service woke the long poll as it stopped; a remote one
            # answers within the poll's wait, and the daemon thread then ends alone.
            self._collector.stop(timeout=0.5)
        if self._cache is not None:
            self._cache.close()
        if self._state is not None:
            self._state.close()

    def open(self) -> Workflow:
        """Start the workflow and make it current until ``close()``; return self.

        For notebooks: open it in one cell, call ``@work`` functions in later
        cells, close it when done (``with`` does the same within one block).
        """
        self.start()
        with _active_lock:
            _active.append(self)
        return self

    def __enter__(self) -> Workflow:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(cancel=True if exc_type is not None else None)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the workflow's body (set by ``@workflow(return_workflow=True)``) inside it.

        Raises:
            IddsFatError: the workflow has no body.
        """
        if self.body is None:
            raise IddsFatError("this workflow has no body to run; use it as a context manager")
        with self:
            return self.body(*args, **kwargs)

    # --- tasks -----------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> AsyncResult:
        """Run ``fn(*args, **kwargs)`` as one job; return its :class:`AsyncResult` at once.

        Raises:
            ArgumentError: an argument does not pickle or is too large.
        """
        return self.submit_task(fn, args, kwargs)[0]

    def map(
        self,
        fn: Callable[..., Any],
        kwargs_list: Iterable[Mapping[str, Any]],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> MapResult:
        """Run ``fn(*args, **kwargs, **k)`` as one job per ``k`` in ``kwargs_list``.

        Returns a :class:`MapResult` at once, in the order of ``kwargs_list``.

        Raises:
            ArgumentError: an argument does not pickle or is too large.
        """
        return MapResult(self.submit_task(fn, args, kwargs, list(kwargs_list)))

    def submit_task(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        kwargs_list: list[Mapping[str, Any]] | None = None,
        resources: Resources | None = None,
        name: str | None = None,
        environment: Any = None,
        init_env: str | None = None,
        container_options: Mapping[str, Any] | None = None,
    ) -> list[AsyncResult]:
        """Submit one task: one job, or one per entry of ``kwargs_list``.

        Everything is checked (arguments pickle and fit, resources can be had)
        before anything is stored or submitted, so a bad call leaves no trace.
        ``environment`` (an ``Environment`` or its string form; default the
        workflow's), ``init_env`` and the iDDS ``container_options`` say where
        the jobs run (``idds_fat.context.environment``).

        Raises:
            ArgumentError: an argument does not pickle or is too large.
            ValueError: the backend cannot give the jobs ``resources``.
            ConfigError: a malformed environment.
            ContextError: an environment archive cannot be read or packed.
        """
        self.start()
        assert self._cache is not None and self._backend is not None and self._state is not None
        config = self.config
        fn_name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "function")
        task_name = name or fn_name
        job_resources = self.resources.merged(resources or Resources())
        self._backend.check(job_resources)
        register_user_modules(self.source_dir)
        call = dumps_call(fn, args, kwargs, config.max_argument_bytes)
        entries = [None] if kwargs_list is None else list(kwargs_list)
        if not entries:
            return []
        env_spec = environment_spec(
            task_environment(
                environment,
                container_options,
                self.environment,
                self.placement.get("container_options"),
                "container_options" in BACKENDS[config.backend].supported_parameters,
            ),
            self._cache,
            EnvironmentSettings(
                config.env_cache_dir, config.container_runtime, config.container_run_options
            ),
        )
        job_kwargs = [
            None if entry is None else dumps_job_kwargs(entry, i, config.max_argument_bytes)
            for i, entry in enumerate(entries)
        ]
        with self._lock:
            if self._closed:
                raise IddsFatError("this workflow is closed; create a new one")
            self._task_count += 1
            task_id = f"t{self._task_count:04d}"
        payload_key = self._cache.put(
            seal(
                {
                    "kind": "call",
                    "workflow": self.id,
                    "task": task_id,
                    **caller_versions(),
                    "sources": call.sources,
                },
                call.body,
                self._key,
            )
        )
        stomp_spec = self._stomp_spec()
        futures, requests, rows = [], [], []
        for index, (entry, body) in enumerate(zip(entries, job_kwargs, strict=True)):
            spec: dict[str, Any] = {
                "version": wrapper_module().WRAPPER_VERSION,
                "workflow": self.id,
                "task": task_id,
                "job": index,
                "attempt": 0,
                "name": f"{task_name}[{index}]",
                "cache": self._cache.location,
                "archive": None
                if self._archive is None
                else {"key": self._archive.sha256, "max_bytes": config.max_context_bytes},
                "payload": {"key": payload_key},
                "kwargs": None,
                "result_url": f"{self.service_url}/results/{self.id}",
                "stomp": stomp_spec,
                "result_inline_bytes": config.result_inline_bytes,
                "publish_timeout": config.publish_timeout,
                "environment": env_spec,
                "init_env": init_env or self.placement.get("init_env"),
            }
            if body is not None:
                sealed = seal({"kind": "kwargs", "task": task_id, "job": index}, body, self._key)
                spec["kwargs"] = (
                    {"inline": base64.b64encode(sealed).decode()}
                    if len(sealed) <= INLINE_KWARGS_BYTES
                    else {"key": self._cache.put(sealed)}
                )
            self._add_node_urls(spec)
            spec_key = self._cache.put(json.dumps(spec, sort_keys=True).encode())
            request = self._job_request(task_id, index, spec["name"], spec_key, job_resources)
            future = AsyncResult(
                task_id, index, entry, name=request.name, canceller=self._cancel_future
            )
            futures.append(future)
            requests.append(request)
            rows.append((index, spec["name"], spec_key))
        with self._lock:
            for future, request in zip(futures, requests, strict=True):
                self._futures[(task_id, future.job)] = future
                self._jobs[request.job_id] = request
            self._tasks[task_id] = futures
            self._task_names[task_id] = task_name
        self._state.record_task(task_id, task_name, fn_name, rows)
        try:
            self._backend.submit(requests)
        except BaseException:
            # The call raises, so nobody holds these futures: forget them.
            with self._lock:
                for future in futures:
                    self._futures.pop((task_id, future.job), None)
                    future.mark_cancelled()
                self._tasks.pop(task_id, None)
                self._task_names.pop(task_id, None)
            for future in futures:
                self._state.set_job_status(task_id, future.job, "failed")
            raise
        return futures

    def wait(self, futures: Sequence[AsyncResult], timeout: float | None = None) -> None:
        """Block until ``futures`` are all done; cancel them on Ctrl-C or timeout.

        Raises:
            TimeoutError: not all done within ``timeout`` (default: the workflow's).
            KeyboardInterrupt: after cancelling the outstanding jobs.
        """
        timeout = self.timeout if timeout is None else timeout
        description = self._task_names.get(futures[0].task_id, "jobs") if futures else "jobs"
        progress = WaitProgress(
            futures, description, lambda: len(self._running), enabled=self.config.progress
        )
        try:
            with progress:
                _, pending = concurrent.futures.wait(futures, timeout)
        except KeyboardInterrupt:
            self._cancel(f for f in futures if not f.done())
            raise
        if pending:
            self._cancel(pending)
            raise TimeoutError(
                f"{len(pending)} of {len(futures)} jobs not done after {timeout} s; cancelled"
            )

    # --- results and job ends (called from other threads) ----------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Counts of results: ``received`` (new), ``duplicates`` dropped, forged or
        corrupted ``rejected``, and how many new ones each channel (``stomp``,
        ``rest``, ``local``: straight from a warm local worker) brought first."""
        c = self._collector
        if c is None:
            return {
                "received": 0,
                "duplicates": 0,
                "rejected": 0,
                **dict.fromkeys(("stomp", "rest", "local"), 0),
            }
        return {
            "received": c.received,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            **c.by_channel,
        }

    def _dispatch(self, header: dict[str, Any], body: bytes) -> bool:
        future = self._futures.get((str(header.get("task")), int(header.get("job", -1))))
        if future is None or future.done():
            return False
        if isinstance(body, LazyValue):
            ok, value = True, LazyValue(lambda: decode_result(header, body.get())[1])
        else:
            try:
                ok, value = decode_result(header, body)
            except Exception as exc:  # e.g. the value needs a module the caller lacks
                ok, value = (
                    False,
                    IddsFatError(f"result of {future.name} could not be unpickled: {exc}"),
                )
        settled = _settle(future, ok, value)
        if settled and self._state is not None:
            status = "done" if ok else "failed"
            outcome = recorded_outcome(ok, value)
            self._state.set_job_status(future.task_id, future.job, status, **outcome)
        return settled

    def _job_started(self, job: JobRequest, ref: str) -> None:
        self._running.add(job.job_id)
        task_id, index = job.job_id.rsplit("/", 1)
        if self._state is not None:
            self._state.set_job_started(task_id, int(index), ref)

    def _job_ended(self, job: JobRequest, outcome: JobExit) -> None:
        if outcome.result is not None and self._service is not None:
            # The copy that attach() and `idds-fat results` read later; kept before
            # the user sees the value, so a caller killed right after loses nothing.
            try:
                self._service.keep_result(self.id, outcome.result)
            except (ValueError, OSError, sqlite3.Error) as exc:
                logger.warning("could not keep a copy of the result of %s: %s", job.name, exc)
        if self._detached:
            return  # the copy waits for attach()
        if outcome.result is not None and self._collector is not None:
            self._collector.accept(outcome.result, "local")
        self._running.discard(job.job_id)
        task_id, index = job.job_id.rsplit("/", 1)
        future = self._futures.get((task_id, int(index)))
        if future is None:
            return
        if outcome.cancelled:
            future.mark_cancelled()
            if self._state is not None:
                self._state.set_job_status(task_id, int(index), "cancelled", outcome.returncode)
            return
        checked = self._check_result(job, outcome)
        if future.done():
            return
        if outcome.returncode == 0 and self._deadlines and (self._subscriber or not checked):
            # A clean exit means a channel took the result. Over STOMP it may still
            # be on its way (or the broker lost it), or the store could not be read
            # just now (it restarts): look again after a grace period.
            grace = self.config.result_grace_seconds
            self._deadlines.at(grace, lambda: self._result_overdue(job, outcome))
            return
        self._lose(job, outcome)

    def _check_result(self, job: JobRequest, outcome: JobExit) -> bool:
        """Read the REST store for the job's result; return False if it could not be read."""
        task_id, index = job.job_id.rsplit("/", 1)
        future = self._futures[(task_id, int(index))]
        if not future.done() and self._collector is not None:
            # The wrapper exits only after a channel acknowledged its result, and the
            # REST store (directly or through the mirror) keeps a copy: read it now.
            try:
                self._collector.drain()
            except ServiceError as exc:
                logger.warning("could not check for the result of %s: %s", job.name, exc)
                return False
        return True

    def _result_overdue(self, job: JobRequest, outcome: JobExit) -> None:
        task_id, index = job.job_id.rsplit("/", 1)
        future = self._futures[(task_id, int(index))]
        self._check_result(job, outcome)
        if future.done() or self._closed:
            return
        attempt = self._attempts.get(job.job_id, 0)
        if attempt < self.config.max_resubmits:
            logger.warning(
                "the result of %s was accepted but never arrived; running it again", job.name
            )
            self._resubmit(job, attempt + 1)
            return
        reason = "it exited cleanly and a channel accepted its result, but it never arrived"
        self._lose(job, JobExit(outcome.returncode, reason))

    def _resubmit(self, job: JobRequest, attempt: int) -> None:
        """Run ``job`` again as ``attempt``, from its own spec (in a work dir of its own)."""
        assert self._cache is not None and self._backend is not None
        public = wrapper_module().public_url(job.spec_location)
        spec = json.loads(self._cache.get(public.rstrip("/").rsplit("/", 1)[-1]))
        spec["attempt"] = attempt
        self._add_node_urls(spec)
        new_key = self._cache.put(json.dumps(spec, sort_keys=True).encode())
        again = JobRequest(
            job_id=job.job_id,
            name=f"{job.name}#{attempt}",
            spec_location=self._node_location(new_key),
            workdir=job.workdir.with_name(f"{job.workdir.name}.{attempt}"),
            resources=job.resources,
        )
        self._attempts[job.job_id] = attempt
        self._jobs[job.job_id] = again
        self._backend.submit([again])

    def _lose(self, job: JobRequest, outcome: JobExit) -> None:
        task_id, index = job.job_id.rsplit("/", 1)
        future = self._futures[(task_id, int(index))]
        lost = JobLostError(
            job.name,
            outcome.returncode,
            _exit_reason(outcome),
            _tail(job.stderr_path),
            str(job.stderr_path),
        )
        if _settle(future, False, lost) and self._state is not None:
            self._state.set_job_status(
                task_id, int(index), "lost", outcome.returncode, **recorded_outcome(False, lost)
            )

    def _cancel(self, futures: Iterable[AsyncResult]) -> None:
        futures = list(futures)
        if self._backend is not None and futures:
            self._backend.cancel([f"{f.task_id}/{f.job}" for f in futures])
        for future in futures:
            if future.mark_cancelled():
                self._record_cancelled(future)

    def _record_cancelled(self, future: AsyncResult) -> None:
        # Recorded here, not when the backend reports the kill: a detached caller
        # would not hear that report.
        if self._state is not None:
            self._state.set_job_status(future.task_id, future.job, "cancelled")

    def _cancel_future(self, future: AsyncResult) -> None:
        self._record_cancelled(future)
        if self._backend is not None:
            self._backend.cancel([f"{future.task_id}/{future.job}"])

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "not started"
        return f"<Workflow {self.id or self.name} {state}, {len(self._futures)} jobs>"

    def _repr_html_(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "not started"
        rows = []
        for task_id, futures in self.tasks.items():
            counts = outcome_counts(futures.futures)
            running = sum(f"{task_id}/{f.job}" in self._running for f in futures.futures)
            rows.append(
                [
                    task_id,
                    self._task_names.get(task_id, ""),
                    len(futures),
                    counts["done"],
                    counts["failed"],
                    counts["cancelled"],
                    running,
                    counts["pending"] - running,
                ]
            )
        headers = ["task", "name", "jobs", "done", "failed", "cancelled", "running", "queued"]
        caption = f"Workflow {self.id or self.name} ({state}, backend {self.config.backend})"
        return html_table(headers, rows, caption=caption)
