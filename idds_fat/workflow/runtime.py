"""A running workflow: the public verbs (start, submit, map, shutdown, wait, cancel, close, attach).

``Workflow`` is a :class:`concurrent.futures.Executor`: ``submit``, ``map`` and
``shutdown`` follow that contract; ``map_kwargs`` is idds-fat's map over keyword
arguments (one task, one job per dict), ``cancel``/``close``/``detach`` its own verbs.

What it holds lives next door: its options (options.py), the parts it runs
(parts.py), its job specs (specs.py) and the books of its jobs (tracker.py).
"""

from __future__ import annotations

import concurrent.futures
import html
import logging
import os
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from idds_fat.backends import JobRequest, Resources
from idds_fat.config import Config
from idds_fat.errors import IddsFatError, WorkflowClosedError
from idds_fat.results import AsyncResult, MapResult
from idds_fat.results.display import WaitProgress, html_table, job_arguments
from idds_fat.results.futures import wait_interruptibly
from idds_fat.serialize import dumps_call, dumps_job_kwargs, register_user_modules
from idds_fat.workflow import resume
from idds_fat.workflow.binding import check_call
from idds_fat.workflow.current import drop_current, push_current
from idds_fat.workflow.dependencies import DependentTasks, inputs_of
from idds_fat.workflow.executor_map import is_kwargs_list, map_entries, results_in_order
from idds_fat.workflow.idds_names import IddsWorkflowNames, body_of, idds_arguments
from idds_fat.workflow.options import OptionAttribute, WorkflowOptions
from idds_fat.workflow.parts import WorkflowParts
from idds_fat.workflow.specs import JobSpecs, job_name, request_name
from idds_fat.workflow.tracker import JobTracker

logger = logging.getLogger(__name__)


#: The first chunk of a task handed to a backend that runs specs inline: small, so the
#: first jobs start early; each next chunk twice as large, up to the last size.
_FIRST_CHUNK, _LAST_CHUNK = 8, 512


def _chunks(count: int) -> Iterator[range]:
    """Ranges that cover ``range(count)``, growing from ``_FIRST_CHUNK`` to ``_LAST_CHUNK``."""
    start, size = 0, _FIRST_CHUNK
    while start < count:
        yield range(start, min(start + size, count))
        start += size
        size = min(size * 2, _LAST_CHUNK)


class Workflow(IddsWorkflowNames, concurrent.futures.Executor):
    """A workflow: the context in which ``@work`` calls run as jobs.

    Use it as a context manager (``with Workflow(backend="local") as wf:``) or
    through the ``@workflow`` decorator. While it is open, calling a ``@work``
    function submits a task to its backend; ``submit`` and ``map`` do the same
    for any function.

    It is a :class:`concurrent.futures.Executor` (``submit``, ``map``,
    ``shutdown``), so code written for ``ProcessPoolExecutor`` or
    ``loop.run_in_executor`` takes it; its futures are
    :class:`~idds_fat.results.AsyncResult`. ``map_kwargs(fn, kwargs_list)`` runs
    one job per dict of keyword arguments, as one task.

    Leaving it waits for the jobs still running (``on_exit="wait"``, the default)
    or cancels them (``on_exit="cancel"``); an exception leaving the body always
    cancels. Then it stops what it started: the backend's workers, the result
    collector and the embedded service. Its work dir (logs, state) stays.

    Args:
        name: a readable name (default ``"workflow"``); part of the id.
        backend: ``"local"`` (default from configuration).
        source_dir: directory zipped and shipped as the jobs' code context; its
            modules are pickled by value. ``None`` (the default) is iDDS's: the
            current directory (with ``use_func_dir=True``, the directory of
            ``func``'s file, ``source_dir_parent_level`` levels up); ``False``
            ships no archive. The work dir and caches inside it are left out.
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

    Attributes:
        options: its options, resolved (:class:`~idds_fat.workflow.options.WorkflowOptions`);
            ``config``, ``resources``, ``placement``, ``environment``, ``source_dir``
            and ``exclude_source_files`` read and set them.
        parts: what it runs once started (:class:`~idds_fat.workflow.parts.WorkflowParts`):
            service, cache, result channels, backend, its key and token.
        specs: builds and reads back its job specs (:class:`~idds_fat.workflow.specs.JobSpecs`).
        tracker: its jobs' futures, requests and ends
            (:class:`~idds_fat.workflow.tracker.JobTracker`).
        body: the function ``run`` runs (set by ``@workflow(return_workflow=True)``).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        backend: str | None = None,
        source_dir: str | os.PathLike | bool | None = None,
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
        name = idds_arguments(name, options)  # iDDS: Workflow(func, ...), named after func
        self.options = WorkflowOptions.resolve(
            resources={"cores": cores, "memory_mb": memory_mb, "gpus": gpus, "walltime": walltime},
            options=options,
            backend=backend,
            on_exit=on_exit,
            source_dir=source_dir,
            exclude_source_files=exclude_source_files,
            config=config,
        )
        self.name = name or "workflow"
        self.timeout = timeout
        self.body: Callable[..., Any] | None = body_of(self.options.call)
        self.parts = WorkflowParts(self.options, attach=type(self).attach)
        self.specs = JobSpecs(self.options, self.parts)
        self.tracker = JobTracker(self.options, self.parts, self.specs)
        self.dependents = DependentTasks(self.options, self.parts, self.specs, self.tracker)
        self._started = False
        self._closed = False
        self._closer: threading.Thread | None = None  # shutdown's closing thread
        self._lock = threading.Lock()
        self.options.warn_ignored_parameters()

    config = OptionAttribute[Config]("Its configuration.")
    resources = OptionAttribute[Resources]("The default resources of its jobs.")
    placement = OptionAttribute[Mapping[str, Any]]("Its iDDS placement (queue, site, ...).")
    environment = OptionAttribute[Any]("The default environment of its tasks (None: Current).")
    source_dir = OptionAttribute[Path | None]("The directory shipped as the code context.")
    exclude_source_files = OptionAttribute[tuple[str, ...]]("Patterns left out of the context.")

    @property
    def id(self) -> str:
        """The workflow's id (``""`` until it starts)."""
        return self.parts.workflow_id

    @property
    def work_dir(self) -> Path | None:
        """Its directory under the configured work dir (None until it starts)."""
        return self.parts.work_dir

    @property
    def service_url(self) -> str:
        """The base URL of its result service (``""`` until it starts); jobs
        submitted after it is set deliver there."""
        return self.parts.service_url

    @service_url.setter
    def service_url(self, url: str) -> None:
        self.parts.service_url = url

    @property
    def monitor_url(self) -> str:
        """The address of its monitoring page (``""`` until it starts), to open in a browser.

        The service's token rides in the fragment (``#token=...``), which a
        browser keeps to itself: it reaches neither the server nor its logs, and
        the page moves it into the tab's storage and out of the address bar. It
        is still the token: don't log it or paste it where others read.
        """
        if not self.service_url or not self.id:
            return ""
        url = f"{self.service_url}/workflows/{urllib.parse.quote(self.id, safe='')}"
        token = self.parts.token
        return f"{url}#{urllib.parse.urlencode({'token': token})}" if token else url

    @property
    def result_queue(self) -> str:
        """The STOMP destination of this workflow's results."""
        return self.options.result_queue(self.id)

    @property
    def mirror_queue(self) -> str:
        """The STOMP destination of the copy of its results that the service mirrors."""
        return self.options.mirror_queue(self.id)

    # --- life cycle ------------------------------------------------------------------

    def start(self) -> Workflow:
        """Start the workflow (done by ``with`` and by the first task); return self.

        Raises:
            ContextError: the code context cannot be packed.
            ServiceError: the result service cannot be reached or started.
        """
        return self._start_with(self._create)

    def _create(self) -> None:
        self.parts.create(self.name)
        self.parts.start(self.tracker)
        logger.info("workflow %s started in %s", self.id, self.work_dir)

    def _start_with(self, starting: Callable[[], None]) -> Workflow:
        with self._lock:
            if self._closed:
                raise WorkflowClosedError("this workflow is closed; create a new one")
            if self._started:
                return self
            try:
                starting()
            except BaseException:
                self.parts.stop()
                raise
            self._started = True
        return self

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
            WorkflowNotFound: no workflow matches ``workflow_id``, or several do.
            IddsFatError: its state is unreadable, or its caller is alive.
        """
        workflow_dir, config, record = resume.find_workflow(
            workflow_id, work_dir=work_dir, force=force, **settings
        )
        recorded = record["settings"]
        wf = cls(record["name"], config=config, **recorded.get("placement", {}))
        wf.resources = Resources(**recorded.get("resources", {}))
        return wf._start_with(lambda: resume.resume(wf, workflow_dir))

    # --- tasks as the user sees them ------------------------------------------------

    @property
    def tasks(self) -> dict[str, MapResult]:
        """Every task of this workflow, by task id, as a MapResult in input order."""
        return {task: MapResult(futures) for task, futures in self.tracker.tasks().items()}

    @property
    def task_names(self) -> dict[str, str]:
        """The name of every task (its function's name unless given), by task id."""
        return self.tracker.task_names()

    def cancel(self, task_id: str | None = None) -> int:
        """Kill the unfinished jobs of one task (or of all), running ones too; return how many.

        Their futures end cancelled (as :meth:`AsyncResult.kill` leaves them); the
        CLI's ``cancel`` and the monitoring page's cancel button call this.

        Raises:
            KeyError: no task has this id.
        """
        tasks = self.tracker.tasks()
        if task_id is not None and task_id not in tasks:
            raise KeyError(f"no task {task_id!r} in workflow {self.id}")
        chosen = [task_id] if task_id is not None else list(tasks)
        futures = [f for t in chosen for f in tasks[t] if not f.done()]
        self.tracker.cancel(futures)
        return len(futures)

    def close(self, cancel: bool | None = None) -> None:
        """Finish the workflow: wait for (or cancel) running jobs, then stop its parts.

        ``cancel`` defaults to the ``on_exit`` setting. Safe to call twice. Later
        submissions raise :class:`~idds_fat.errors.WorkflowClosedError`.
        """
        if not self._mark_closed():
            return
        self._finish(self.config.on_exit == "cancel" if cancel is None else cancel)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks and finish, as ``concurrent.futures.Executor.shutdown``.

        From now on ``submit`` and ``map`` raise
        :class:`~idds_fat.errors.WorkflowClosedError` (a ``RuntimeError``).
        ``cancel_futures`` cancels the jobs that have not started
        (``Future.cancel``); running ones finish. Then it is ``close(cancel=False)``:
        the remaining jobs finish and their futures settle, then the workflow's
        parts stop. With ``wait=True`` this returns after that; with
        ``wait=False`` it returns at once and the closing runs in a thread of
        its own (not a daemon: the interpreter waits for it at exit, as it does
        for ``ThreadPoolExecutor``'s workers). To stop following the jobs without
        waiting for them, use :meth:`detach`; to kill them, ``close(cancel=True)``.
        Safe to call twice; a later ``shutdown(wait=True)`` waits for an earlier
        ``shutdown(wait=False)``.
        """
        first = self._mark_closed()
        if cancel_futures:
            for future in self.tracker.futures():
                future.cancel()
        if first and wait:
            self._finish(False)
        elif first:
            drop_current(self)  # a @work call from now on runs nowhere else
            self._closer = threading.Thread(
                target=self._finish, args=(False,), name=f"idds-fat-shutdown-{self.id or self.name}"
            )
            self._closer.start()
        elif wait and self._closer is not None and self._closer is not threading.current_thread():
            self._closer.join()

    def _mark_closed(self) -> bool:
        """Refuse new tasks from now on; return False if it was closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self.tracker.close()
            return True

    def _finish(self, cancel: bool) -> None:
        try:
            if cancel:  # before the backend stops: a job released now could not start
                self.tracker.cancel(self.dependents.waiting())
            else:
                # Results decide when a job is done; the backend's own view may lag.
                concurrent.futures.wait(self.tracker.futures())
            if self.parts.backend is not None:
                self.parts.backend.shutdown(cancel=cancel)
        finally:
            if (state := self.parts.state) is not None:
                futures = self.tracker.futures()
                failed = any(f.done() and not f.cancelled() and f.exception() for f in futures)
                state.end_workflow("cancelled" if cancel else "failed" if failed else "finished")
            self.specs.close()
            self.parts.stop()
            drop_current(self)

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
            self.tracker.close(detached=True)
        try:
            if self.parts.backend is not None:
                self.parts.backend.shutdown(cancel=False, wait=False)
        finally:
            self.specs.close()
            self.parts.stop()
            drop_current(self)

    def open(self) -> Workflow:
        """Start the workflow and make it current until ``close()``; return self.

        For notebooks: open it in one cell, call ``@work`` functions in later
        cells, close it when done (``with`` does the same within one block).
        """
        self.start()
        push_current(self)
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

    def submit(self, fn: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` as one job; return its :class:`AsyncResult` at once.

        Without arguments it is iDDS's ``wf.submit()``: :meth:`submit_body` runs
        the workflow's body here and returns the workflow's id.

        Raises:
            SignatureError: a ``TypeError``: the arguments do not fit ``fn``'s
                signature (checked here, before any job is submitted).
            ArgumentError: an argument does not pickle or is too large.
            WorkflowClosedError: the workflow was closed, detached or shut down.
        """
        if fn is None and not args and not kwargs:
            return self.submit_body()
        if fn is None:
            raise TypeError("submit() needs a function to run (or no arguments: iDDS's submit)")
        return self.submit_task(fn, args, kwargs)[0]

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        **common: Any,
    ) -> Iterator[Any]:
        """Run ``fn(*xs)`` for ``xs`` in ``zip(*iterables)``, as ``Executor.map``.

        Submits every job at once (one task, one job per element) and returns an
        iterator of their values in input order, each waited for when reached;
        the first exception is raised where it is reached. ``timeout`` counts
        from this call: a value not there by then raises ``TimeoutError``.
        Leaving the iterator early cancels the jobs that have not started.
        ``chunksize`` is accepted and has no effect (as for
        ``ThreadPoolExecutor``); to run several jobs per worker, give the
        function ``@work(jobs_per_worker=...)``.

        Deprecated form: ``map(fn, kwargs_list, **common)``, with a single
        iterable that is a non-empty list or tuple whose items are all dicts
        (mappings), still runs ``fn(**common, **k)`` per dict and returns a
        :class:`MapResult`, with a ``DeprecationWarning``, for one release; use
        :meth:`map_kwargs`. Only that form takes extra keyword arguments (the old
        common positional arguments are gone: they read as more iterables). To
        map over dicts as ``Executor.map`` does meanwhile, pass an iterator
        (``wf.map(fn, iter(dicts))``).

        Raises:
            SignatureError: a ``TypeError``: the arguments do not fit ``fn``'s
                signature (checked here, before any job is submitted).
            ArgumentError: an argument does not pickle or is too large.
            WorkflowClosedError: the workflow was closed, detached or shut down.
            ValueError: ``chunksize`` is below 1.
            TypeError: keyword arguments other than ``timeout`` and ``chunksize``
                outside the deprecated form.
        """
        end_time = None if timeout is None else timeout + time.monotonic()
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if len(iterables) == 1 and is_kwargs_list(iterables[0]):
            warnings.warn(
                "Workflow.map(fn, kwargs_list) is deprecated: use "
                "Workflow.map_kwargs(fn, kwargs_list); Workflow.map is Executor.map",
                DeprecationWarning,
                stacklevel=2,
            )
            return self.map_kwargs(fn, iterables[0], **common)  # type: ignore[arg-type]
        if common:
            raise TypeError(f"map() got unexpected keyword arguments: {', '.join(common)}")
        fn_args, entries, name = map_entries(fn, iterables)
        return results_in_order(self.submit_task(fn_args, (), {}, entries, name=name), end_time)

    def map_kwargs(
        self,
        fn: Callable[..., Any],
        kwargs_list: Iterable[Mapping[str, Any]],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> MapResult:
        """Run ``fn(*args, **kwargs, **k)`` as one job per ``k`` in ``kwargs_list``.

        One task, as ``WorkFunction.map``. Returns a :class:`MapResult` at once,
        in the order of ``kwargs_list``.

        Raises:
            SignatureError: a ``TypeError``: the arguments do not fit ``fn``'s
                signature (checked here, before any job is submitted).
            ArgumentError: an argument does not pickle or is too large.
            WorkflowClosedError: the workflow was closed, detached or shut down.
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

        Everything is checked (arguments bind to ``fn``'s signature, pickle and
        fit, resources can be had) before anything is stored or submitted, so a
        bad call leaves no trace.
        ``environment`` (an ``Environment`` or its string form; default the
        workflow's), ``init_env`` and the iDDS ``container_options`` say where
        the jobs run (``idds_fat.context.environment``).

        Raises:
            SignatureError: a ``TypeError``: the arguments (or an entry of
                ``kwargs_list``) do not fit ``fn``'s signature.
            ArgumentError: an argument does not pickle or is too large.
            ValueError: the backend cannot give the jobs ``resources``.
            ConfigError: a malformed environment.
            ContextError: an environment archive cannot be read or packed.
        """
        check_call(fn, args, kwargs, kwargs_list)  # before start: a bad call costs nothing
        self.start()
        parts, config = self.parts, self.config
        assert parts.cache is not None and parts.backend is not None and parts.state is not None
        fn_name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "function")
        task_name = name or fn_name
        job_resources = self.resources.merged(resources or Resources())
        parts.backend.check(job_resources)
        register_user_modules(self.source_dir)
        entries = [None] if kwargs_list is None else list(kwargs_list)
        if not entries:
            return []
        if inputs_of(args, kwargs, *entries):  # futures among the arguments: dependencies.py
            return self.dependents.submit(
                fn,
                fn_name,
                task_name,
                args,
                kwargs,
                entries,
                self.specs.environment(environment, container_options),
                init_env,
                job_resources,
                self._new_task_id,
            )
        call = dumps_call(fn, args, kwargs, config.max_argument_bytes)
        env_spec = self.specs.environment(environment, container_options)
        job_kwargs = [
            None if entry is None else dumps_job_kwargs(entry, i, config.max_argument_bytes)
            for i, entry in enumerate(entries)
        ]
        task_id = self._new_task_id()
        if parts.backend.runs_inline_specs(job_resources):
            return self._submit_inline(
                task_id, task_name, fn_name, (args, kwargs, entries), call, job_kwargs,
                env_spec, init_env, job_resources,
            )  # fmt: skip
        requests = self.specs.store_task(
            task_id, task_name, call, job_kwargs, env_spec, init_env, job_resources
        )
        futures = [
            self.tracker.new_future(task_id, index, entry, request.name)
            for index, (entry, request) in enumerate(zip(entries, requests, strict=True))
        ]
        # What the page and _repr_html_ show of the call: the service reads no payload.
        for future, text in zip(futures, job_arguments(args, kwargs, entries), strict=True):
            future.arguments = text
        self.tracker.add_task(task_id, task_name, futures, requests)
        self._record_task(task_id, task_name, fn_name, requests, futures)
        try:
            parts.backend.submit(requests)
        except BaseException:
            self.tracker.forget_task(task_id)  # the call raises: nobody holds these futures
            raise
        return futures

    def _submit_inline(
        self,
        task_id: str,
        task_name: str,
        fn_name: str,
        the_call: tuple[Sequence[Any], Mapping[str, Any], list[Any]],
        call: Any,
        job_kwargs: list[bytes | None],
        env_spec: dict[str, Any],
        init_env: str | None,
        job_resources: Resources,
    ) -> list[AsyncResult]:
        """Submit a task to a backend whose warm workers run jobs from their inline
        specs: its jobs start before their specs are stored, and the task is recorded
        once they are.

        Why this order keeps the durability promise (docs/backends/local.md, "Job
        specs inline"): ``attach`` and a resubmission rerun a job from its spec in the
        cache, and they find a job only through the task's record, so a spec must be
        in the cache before ``record_task`` writes its key, not before the job runs. A
        warm worker needs no cache copy: it checks the inline spec against its key. So
        the jobs go to the backend chunk by chunk as their specs are built (the first
        chunk small, so the first job starts early), each chunk's specs are written in
        one batch while its jobs run, and the task is recorded after the last batch,
        before this returns the futures: a caller killed before that held no future
        of the task, and one killed after finds it whole on ``attach``. What the jobs
        report meanwhile (started, ended) is held by the state record and applied when
        the task is recorded (``WorkflowState.hold_task``).
        """
        parts = self.parts
        assert parts.backend is not None and parts.state is not None
        args, kwargs, entries = the_call
        payload_key = self.specs.store_call(task_id, call)
        futures = [
            self.tracker.new_future(
                task_id, index, entry, request_name(self.id, task_id, job_name(task_name, index))
            )
            for index, entry in enumerate(entries)
        ]
        for future, text in zip(futures, job_arguments(args, kwargs, entries), strict=True):
            future.arguments = text
        parts.state.hold_task(task_id)
        self.tracker.add_task(task_id, task_name, futures)
        requests: list[JobRequest] = []
        writing: concurrent.futures.Future | None = None
        try:
            for chunk in _chunks(len(entries)):
                built = [
                    self.specs.build(
                        task_id, index, task_name, payload_key, job_kwargs[index],
                        env_spec, init_env, job_resources,
                    )
                    for index in chunk
                ]  # fmt: skip
                self.tracker.add_task(task_id, task_name, (), built)
                parts.backend.submit(built)
                requests.extend(built)
                if writing is not None:
                    writing.result()  # one batch at a time; raises what it raised
                    writing = None
                if len(requests) == len(entries) and len(requests) <= _FIRST_CHUNK:
                    self.specs.write(built)  # one chunk: nothing to build meanwhile
                else:
                    # Stored by the writer thread while the jobs just handed over run
                    # and this thread builds the next chunk (its I/O holds no GIL).
                    writing = self.specs.write_soon(built)
            if writing is not None:
                writing.result()
            self._record_task(task_id, task_name, fn_name, requests, futures)
        except BaseException:
            if writing is not None:  # let it end before the task is forgotten
                concurrent.futures.wait([writing])
            # Nothing was recorded: the jobs handed over must not run on unseen.
            parts.state.drop_task(task_id)
            if requests:
                parts.backend.cancel([r.job_id for r in requests])
            self.tracker.forget_task(task_id)  # the call raises: nobody holds these futures
            raise
        return futures

    def _record_task(
        self,
        task_id: str,
        task_name: str,
        fn_name: str,
        requests: Sequence[JobRequest],
        futures: Sequence[AsyncResult],
    ) -> None:
        """Record a task in the workflow's state: its jobs' spec keys and their calls' text."""
        assert self.parts.state is not None
        self.parts.state.record_task(
            task_id,
            task_name,
            fn_name,
            self.specs.rows(task_name, requests),
            [f.arguments for f in futures],
        )

    def _new_task_id(self) -> str:
        """Book a new task's id. Raises WorkflowClosedError once the workflow is closed."""
        with self._lock:
            if self._closed:
                raise WorkflowClosedError("this workflow is closed; create a new one")
            return self.tracker.new_task_id()

    def wait(self, futures: Sequence[AsyncResult], timeout: float | None = None) -> None:
        """Block until ``futures`` are all done; cancel them on Ctrl-C or timeout.

        Raises:
            TimeoutError: not all done within ``timeout`` (default: the workflow's).
            KeyboardInterrupt: after cancelling the outstanding jobs.
        """
        timeout = self.timeout if timeout is None else timeout
        names = self.tracker.task_names()
        description = names.get(futures[0].task_id, "jobs") if futures else "jobs"
        progress = WaitProgress(
            futures, description, self.tracker.running_count, enabled=self.config.progress
        )
        try:
            with progress:
                _, pending = wait_interruptibly(futures, timeout)
        except KeyboardInterrupt:
            self.tracker.cancel(f for f in futures if not f.done())
            raise
        if pending:
            self.tracker.cancel(pending)
            raise TimeoutError(
                f"{len(pending)} of {len(futures)} jobs not done after {timeout} s; cancelled"
            )

    @property
    def stats(self) -> dict[str, int]:
        """Counts of results: ``received`` (new), ``duplicates`` dropped, forged or
        corrupted ``rejected``, and how many new ones each channel (``stomp``,
        ``rest``, ``local``: straight from a warm local worker) brought first."""
        return self.parts.result_counts()

    def _state(self) -> str:
        return "closed" if self._closed else "running" if self._started else "not started"

    def __repr__(self) -> str:
        return (
            f"<Workflow {self.id or self.name} {self._state()}, {len(self.tracker.futures())} jobs>"
        )

    def _repr_html_(self) -> str:
        headers = ["task", "name", "jobs", "done", "failed", "cancelled", "running", "queued"]
        caption = (
            f"Workflow {self.id or self.name} ({self._state()}, backend {self.config.backend})"
        )
        table = html_table(headers, self.tracker.task_rows(), caption=caption)
        url = self.monitor_url
        if not url or self._closed:
            return table
        link = (
            f'<p><a href="{html.escape(url, quote=True)}" target="_blank" '
            'rel="noopener noreferrer">monitoring page</a></p>'
        )
        return table + link
