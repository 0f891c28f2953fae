"""A running workflow: the public verbs (start, submit, map, shutdown, wait, cancel, close, attach).

``Workflow`` is a :class:`concurrent.futures.Executor`: ``submit``, ``map`` and
``shutdown`` follow that contract; ``map_kwargs`` is idds-fat's map over keyword
arguments (one task, one job per dict), ``cancel``/``close``/``detach`` its own verbs.

What it holds lives next door: its options (options.py), the parts it runs
(parts.py), its job specs (specs.py) and the books of its jobs (tracker.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import html
import logging
import os
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


class _Submission(NamedTuple):
    """A long task's chunks being handed over in the background (``Workflow._submit_rest``)."""

    task_id: str
    done: concurrent.futures.Future  # its last keys recorded (or it failed)
    stop: threading.Event  # set: hand nothing more over
    handed: threading.Event  # set: it hands nothing more over (its writes may go on)


def _job_index(request: JobRequest) -> int:
    return int(request.job_id.rsplit("/", 1)[1])


def _spec_keys(requests: Sequence[JobRequest]) -> list[tuple[int, str]]:
    """What the state record keeps of jobs whose specs are stored: (index, spec key)."""
    return [(_job_index(r), r.spec_key) for r in requests]


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
        # The thread that hands a long task's later chunks over, and what it does now.
        self._submitter: concurrent.futures.ThreadPoolExecutor | None = None
        self._submissions: list[_Submission] = []  # not ended yet (or not seen ended)
        self._submitter_ident: int | None = None
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
        CLI's ``cancel`` and the monitoring page's cancel button call this. The jobs
        of a long task not handed to the backend yet never go there; it returns once
        the workflow's background submission has ended.

        Raises:
            KeyError: no task has this id.
        """
        tasks = self.tracker.tasks()
        if task_id is not None and task_id not in tasks:
            raise KeyError(f"no task {task_id!r} in workflow {self.id}")
        self._stop_submissions(task_id)
        chosen = [task_id] if task_id is not None else list(tasks)
        futures = [f for t in chosen for f in tasks[t] if not f.done()]
        # Cancelled first, so the submitter skips them, then waited for: whatever it
        # hands over from now on is cancelled at once (it checks after handing over).
        self.tracker.cancel(futures)
        self._await_submission()
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
        (``Future.cancel``; those of a long task not handed over yet never go to
        the backend); running ones finish. Then it is ``close(cancel=False)``:
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
            self._stop_submissions()  # the jobs not handed over yet never go
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
            self._await_submission(stop=cancel)
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
            self._stop_submitter()
            self.specs.close()
            self.parts.stop()
            drop_current(self)

    def detach(self) -> None:
        """Stop following this workflow without waiting for or cancelling its jobs.

        The jobs run on (their results wait in the result store or the broker's
        queue); ``Workflow.attach(id)`` follows them again later. Jobs not started
        yet start only when someone attaches. A long task still being handed over is
        handed over whole first, so ``attach`` can run every job of it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._await_submission()
        self.tracker.close(detached=True)
        try:
            if self.parts.backend is not None:
                self.parts.backend.shutdown(cancel=False, wait=False)
        finally:
            self._stop_submitter()
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

        Submits one task, one job per element, and returns an iterator of their
        values in input order, each waited for when reached; the first exception
        is raised where it is reached. Every job is recorded before this returns;
        on warm workers a long map returns once its first jobs are handed over,
        and the rest follow in the background, in order (docs/backends/local.md,
        "Job specs inline"). ``timeout`` counts
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
        # The jobs of a task reach the backend after those of the tasks before it.
        self._await_submission(handed_only=True)
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
        self._record_task(
            task_id, task_name, fn_name, self.specs.rows(task_name, requests), futures
        )
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
        specs: its jobs start before their specs are stored, and it returns the
        futures once the first chunk is handed over and the task recorded.

        Why this order keeps the durability promise (docs/backends/local.md, "Job
        specs inline"): ``attach`` and a resubmission rerun a job from its spec in the
        cache, and they find a job only through the task's record, so a spec must be
        in the cache before its key is recorded, not before the job runs (a warm
        worker checks the inline spec against its key). The first chunk (up to
        ``_FIRST_CHUNK`` jobs) is handed over first, its specs stored, then the task
        recorded whole in one transaction, with the first chunk's keys and none for
        the other jobs, before this returns; what the first jobs report meanwhile is
        held (``WorkflowState.hold_task``). The other chunks follow in this workflow's
        submitter thread (:meth:`_submit_rest`), each key recorded once its spec is
        stored. So ``attach`` finds every job of a task whose futures were returned:
        with its key, to follow or rerun, or without one, never handed over for good,
        which it fails (``resume._rebuild_tasks``). A caller killed before this
        returns never gave out the futures: nothing of the task is recorded for
        ``attach`` to find, and its first jobs may still run.
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

        def build(indices: Iterable[int]) -> list[JobRequest]:
            return [
                self.specs.build(
                    task_id, index, task_name, payload_key, job_kwargs[index],
                    env_spec, init_env, job_resources,
                )
                for index in indices
            ]  # fmt: skip

        chunks = list(_chunks(len(entries)))
        parts.state.hold_task(task_id)
        self.tracker.add_task(task_id, task_name, futures)
        built: list[JobRequest] = []
        try:
            built = build(chunks[0])
            self.tracker.add_task(task_id, task_name, (), built)
            parts.backend.submit(built)
            # The rest runs while the first jobs start: the calls' text (for the page
            # and the record), the first chunk's specs, and the task's record.
            for future, text in zip(futures, job_arguments(args, kwargs, entries), strict=True):
                future.arguments = text
            self.specs.write(built)
            unsent = [(i, job_name(task_name, i), None) for i in range(len(built), len(entries))]
            self._record_task(
                task_id, task_name, fn_name, self.specs.rows(task_name, built) + unsent, futures
            )
        except BaseException:
            # The jobs handed over must not run on unseen: nobody holds their futures.
            parts.state.drop_task(task_id)
            if built:
                parts.backend.cancel([r.job_id for r in built])
            self.tracker.forget_task(task_id)  # records a recorded task's jobs failed
            raise
        if len(chunks) > 1:
            stop, handed = threading.Event(), threading.Event()
            pool = self._submitter_pool()
            done = pool.submit(
                self._submit_rest, task_id, task_name, list(futures), chunks[1:], build,
                stop, handed,
            )  # fmt: skip
            done.add_done_callback(lambda _: handed.set())  # however it ended
            with self._lock:
                self._submissions = [s for s in self._submissions if not s.done.done()]
                self._submissions.append(_Submission(task_id, done, stop, handed))
        return futures

    def _submit_rest(
        self,
        task_id: str,
        task_name: str,
        futures: list[AsyncResult],
        chunks: list[range],
        build: Callable[[Iterable[int]], list[JobRequest]],
        stop: threading.Event,
        handed: threading.Event,
    ) -> None:
        """Hand the chunks after a task's first to the backend, in order, in this
        workflow's submitter thread: build one, hand it over, store its specs in the
        spec writer thread while the next is built, record its keys once stored.

        A future cancelled before its job is handed over is skipped. ``stop`` (a
        cancel) leaves the chunks not handed over unsubmitted, their futures
        cancelled. A failure (the cache refused a batch, the backend a chunk) fails
        every future whose key is not recorded with it: those handed over are
        cancelled at the backend, the others never go there. ``handed`` is set once
        it hands nothing more over: a later task's jobs may go to the backend then.
        """
        backend, state = self.parts.backend, self.parts.state
        assert backend is not None and state is not None
        self._submitter_ident = threading.get_ident()
        unkeyed: list[JobRequest] = []  # handed over, keys not recorded yet, in order
        writing: tuple[concurrent.futures.Future, list[JobRequest]] | None = None
        handed_to = chunks[0].start if chunks else len(futures)

        def keyed() -> None:
            nonlocal writing
            assert writing is not None
            (stored, batch), writing = writing, None
            stored.result()  # raises what the write raised
            state.set_spec_keys(task_id, _spec_keys(batch))
            del unkeyed[: len(batch)]

        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                built = build(i for i in chunk if not futures[i].done())
                handed_to = chunk.stop
                if not built:
                    continue
                self.tracker.add_task(task_id, task_name, (), built)
                unkeyed.extend(built)
                backend.submit(built)
                # Cancelled while its chunk was built: a backend that had not seen the
                # job then (pilots) learns of the cancel only now.
                late = [r.job_id for r in built if futures[_job_index(r)].cancelled()]
                if late:
                    backend.cancel(late)
                if writing is not None:
                    keyed()
                writing = (self.specs.write_soon(built), built)
            handed.set()
            if writing is not None:
                keyed()
        except BaseException as exc:
            handed.set()
            if writing is not None:  # a batch that was stored keeps its jobs
                with contextlib.suppress(BaseException):
                    keyed()
            logger.error("submitting task %s failed: %s", task_id, exc)
            lost = [futures[_job_index(r)] for r in unkeyed] + futures[handed_to:]
            for future in lost:
                self.tracker.fail(future, exc)
            if unkeyed:  # settled first: the backend's report of the cancel changes nothing
                backend.cancel([r.job_id for r in unkeyed])
            return
        unsent = [f for f in futures[handed_to:] if not f.done()]
        if unsent:
            self.tracker.cancel(unsent)

    def _submitter_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._submitter is None:
                # One thread: a workflow's tasks reach the backend in the order submitted.
                self._submitter = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="idds-fat-submit"
                )
            return self._submitter

    def _stop_submissions(self, task_id: str | None = None) -> None:
        """Tell the background submission of ``task_id`` (or of every task) to stop:
        its jobs not handed over yet are then cancelled."""
        with self._lock:
            chosen = [s for s in self._submissions if task_id in (None, s.task_id)]
        for submission in chosen:
            submission.stop.set()

    def _await_submission(self, stop: bool = False, handed_only: bool = False) -> None:
        """Wait until the background submissions of long tasks end (``handed_only``:
        until they hand nothing more over; their last specs may still be stored);
        ``stop`` them first."""
        if stop:
            self._stop_submissions()
        if threading.get_ident() == self._submitter_ident:
            return  # a future's callback run by the submitter itself: waiting never ends
        with self._lock:
            submissions = list(self._submissions)
        if handed_only:
            for submission in submissions:
                submission.handed.wait()
            return
        concurrent.futures.wait([s.done for s in submissions])
        for submission in submissions:
            if (error := submission.done.exception()) is not None:  # a bug: futures may hang
                logger.error("submitting task %s failed", submission.task_id, exc_info=error)
        with self._lock:
            self._submissions = [s for s in self._submissions if s not in submissions]

    def _stop_submitter(self) -> None:
        with self._lock:
            pool, self._submitter = self._submitter, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _record_task(
        self,
        task_id: str,
        task_name: str,
        fn_name: str,
        rows: Sequence[tuple[int, str, str | None]],
        futures: Sequence[AsyncResult],
    ) -> None:
        """Record a task in the workflow's state: its jobs ``(index, name, spec_key)``
        and their calls' text."""
        assert self.parts.state is not None
        self.parts.state.record_task(
            task_id, task_name, fn_name, rows, [f.arguments for f in futures]
        )

    def _new_task_id(self) -> str:
        """Book a new task's id. Raises WorkflowClosedError once the workflow is closed."""
        with self._lock:
            if self._closed:
                raise WorkflowClosedError("this workflow is closed; create a new one")
            return self.tracker.new_task_id()

    def wait(self, futures: Sequence[AsyncResult], timeout: float | None = None) -> None:
        """Block until ``futures`` are all done; cancel them on Ctrl-C or timeout.

        Once they are done, it also waits for the last long task to be handed over
        whole (every spec stored and its key recorded).

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
        self._await_submission()

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
