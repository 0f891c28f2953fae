"""Calls that take other calls' futures as arguments: a graph of jobs written in plain Python.

::

    add.submit(inc.submit(1), inc.submit(2))
      Workflow.submit_task --inputs_of--> the AsyncResults among the arguments (positional,
                             keyword, nested in lists, tuples, sets and dicts; a MapResult
                             stands for the list of its values)
      DependentTasks.hold -> futures now, jobs recorded "waiting" (no spec, not submitted),
                             one done-callback per distinct input (no thread, no polling)
        an input failed     -> every job of the task fails with DependencyError, unrun
        an input cancelled  -> every job of the task is cancelled
        the last input done -> _release, in the thread that settled it: each future becomes
                               its value, or the reference to a large result stored by
                               reference (the node fetches it: RESULT_REFERENCE), the call
                               is pickled, its specs stored, its jobs submitted
      or, at once, when every input not done yet is a job the backend holds (Slurm):
      DependentTasks._follow -> each such future becomes a ResultOf (RESULT_OF: the node
                               reads that job's result from the REST store itself), the
                               jobs go to Backend.submit_after (sbatch --dependency=afterok:)
                               and the inputs' callbacks only fail or cancel them

A future exists before it can be passed, so the graph has no cycles. Failures
and cancels travel down a chain without recursion: the callbacks of one thread
run one after the other (:func:`_soon`), however long the chain.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idds_fat.backends import Resources
from idds_fat.errors import DependencyError
from idds_fat.node.run import RESULT_OF, RESULT_REFERENCE
from idds_fat.results import AsyncResult, MapResult
from idds_fat.results.display import job_arguments
from idds_fat.serialize import dumps_call, dumps_job_kwargs
from idds_fat.workflow.specs import job_name, presigns, request_name

if TYPE_CHECKING:
    from idds_fat.workflow.options import WorkflowOptions
    from idds_fat.workflow.parts import WorkflowParts
    from idds_fat.workflow.specs import JobSpecs
    from idds_fat.workflow.tracker import JobTracker

logger = logging.getLogger(__name__)

_CONTAINERS = (list, tuple, dict, set, frozenset)


def inputs_of(*values: Any) -> list[AsyncResult]:
    """Return the distinct futures among ``values``, in the order first met.

    Looks into lists, tuples, sets, frozensets and dicts (their values) at any
    depth; a :class:`MapResult` counts as all of its futures.
    """
    found: dict[int, AsyncResult] = {}
    stack = list(reversed(values))
    while stack:
        value = stack.pop()
        if isinstance(value, AsyncResult):
            found.setdefault(id(value), value)
        elif isinstance(value, MapResult):
            for future in value.futures:
                found.setdefault(id(future), future)
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))  # popped in their own order
        elif isinstance(value, _CONTAINERS):
            stack.extend(reversed(list(value)))
    return list(found.values())


def substitute(value: Any, value_of: Callable[[AsyncResult], Any]) -> Any:
    """Return ``value`` with each future replaced by ``value_of(future)`` and each
    MapResult by the list of its futures' replacements; containers holding none
    are returned as they are, the others rebuilt as their own type."""
    if isinstance(value, AsyncResult):
        return value_of(value)
    if isinstance(value, MapResult):
        return [value_of(f) for f in value.futures]
    if not isinstance(value, _CONTAINERS) or not inputs_of(value):
        return value
    if isinstance(value, dict):
        items = {k: substitute(v, value_of) for k, v in value.items()}
        if type(value) is dict:
            return items
        rebuilt = copy.copy(value)  # OrderedDict, defaultdict, ...: keep the type
        rebuilt.update(items)
        return rebuilt
    items = [substitute(v, value_of) for v in value]
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(items)
    if isinstance(value, tuple) and hasattr(value, "_make"):
        return value._make(items)  # a namedtuple
    if isinstance(value, list):
        rebuilt = copy.copy(value)
        rebuilt[:] = items
        return rebuilt
    return type(value)(items)


def values_now(value: Any) -> Any:
    """Return ``value`` with each future replaced by its value, waiting for it: how a
    ``@work`` function called outside a workflow (in-process) takes futures.

    Raises:
        Exception: what an input raised (its job failed), or CancelledError.
    """
    return substitute(value, lambda future: future.result())


class StoredResult:
    """Where a dependent job finds another job's large result: a cache key.

    It is pickled into the dependent's call as a persistent id
    (:data:`~idds_fat.node.run.RESULT_REFERENCE`); the node fetches the result,
    verifies it and unpickles it in its place, so the value never passes
    through the caller.
    """

    def __init__(self, key: str, task: str, job: int, attempt: int) -> None:
        self.pid = (RESULT_REFERENCE, key, task, job, attempt)


class ResultOf:
    """Where a dependent job finds the result of an input still running: its name.

    It is pickled into the dependent's call as a persistent id
    (:data:`~idds_fat.node.run.RESULT_OF`): the node reads the input's result
    from the workflow's REST result store (any attempt; a large one from the
    cache), verifies it and unpickles it in its place. Used when the backend
    starts the dependent only after its inputs (``Backend.submit_after``).
    """

    def __init__(self, task: str, job: int) -> None:
        self.pid = (RESULT_OF, task, job)


def persistent_id(obj: Any) -> Any:
    """pickle's ``persistent_id`` hook for a call holding :class:`StoredResult`\\ s
    and :class:`ResultOf`\\ s."""
    return obj.pid if type(obj) in (StoredResult, ResultOf) else None


# --- running callbacks one after the other -------------------------------------------

_local = threading.local()


def _soon(action: Callable[[], None]) -> None:
    """Run ``action`` now, unless this thread is already running such actions: then
    after them. Settling a future runs its callbacks, which settle the next future:
    done this way a chain of 10,000 jobs fails without 10,000 nested calls."""
    queue = getattr(_local, "queue", None)
    if queue is not None:
        queue.append(action)
        return
    _local.queue = queue = collections.deque([action])
    try:
        while queue:
            try:
                queue.popleft()()
            except Exception:  # one task's trouble must not stop the others'
                logger.exception("handling a finished input failed")
    finally:
        _local.queue = None


@dataclass
class _HeldTask:
    """A task whose arguments hold futures: what it needs to be submitted later."""

    task_id: str
    task_name: str
    fn: Callable[..., Any] | None
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    entries: list[Mapping[str, Any] | None]
    environment: dict[str, Any]
    init_env: str | None
    resources: Resources
    futures: list[AsyncResult]
    inputs: list[AsyncResult]
    left: int = 0
    ended: bool = False
    followed: bool = False  # submitted at once; the backend starts it after its inputs


class DependentTasks:
    """Holds the tasks of one workflow whose arguments hold futures, and submits
    each when all its inputs are done (or fails or cancels it when one is not).

    Its callbacks run in the thread that settles an input: the result
    collector's, or a backend's; it starts no thread of its own.
    """

    def __init__(
        self,
        options: WorkflowOptions,
        parts: WorkflowParts,
        specs: JobSpecs,
        tracker: JobTracker,
    ) -> None:
        self._options = options
        self._parts = parts
        self._specs = specs
        self._tracker = tracker
        self._lock = threading.Lock()
        self._held: dict[str, _HeldTask] = {}  # by task id, until its inputs decide
        self._counts = {"held": 0, "released": 0, "followed": 0}

    def counts(self) -> dict[str, int]:
        """Return how many tasks with futures among their arguments were ``held``,
        then submitted by this process once their inputs were done (``released``),
        or submitted at once for the backend to start after their inputs
        (``followed``: Slurm's afterok)."""
        with self._lock:
            return dict(self._counts)

    def waiting(self) -> list[AsyncResult]:
        """Return the futures of the jobs that wait for their inputs."""
        with self._lock:
            return [f for held in self._held.values() for f in held.futures if not f.done()]

    def submit(
        self,
        fn: Callable[..., Any],
        function_name: str,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        entries: list[Mapping[str, Any] | None],
        environment: dict[str, Any],
        init_env: str | None,
        resources: Resources,
        new_task_id: Callable[[], str],
    ) -> list[AsyncResult]:
        """Submit a task whose arguments hold futures; return its jobs' futures at once.

        Its jobs are booked and recorded ``waiting`` on the jobs of those futures
        (each job on those among the common arguments and its own entry), and
        submitted all together when every input of the task is done. When an
        input is done already, what follows (the submission, or the failure)
        happens before this returns. ``new_task_id`` books the task's id.

        Raises:
            ArgumentError: an argument other than the futures does not pickle or is
                too large (the values of the futures are checked when they are there).
            WorkflowClosedError: from ``new_task_id``.
        """
        parts, limit = self._parts, self._options.config.max_argument_bytes
        # A call that cannot travel fails here, as one without futures does, not later.
        dumps_call(fn, substitute(tuple(args), _nothing), substitute(dict(kwargs), _nothing), limit)
        for i, entry in enumerate(entries):
            if entry is not None:
                dumps_job_kwargs(substitute(dict(entry), _nothing), i, limit)
        task_id = new_task_id()
        jobs = [(i, job_name(task_name, i), "") for i in range(len(entries))]
        futures = []
        texts = job_arguments(args, kwargs, entries)
        for (index, name, _), entry, text in zip(jobs, entries, texts, strict=True):
            future = self._tracker.new_future(
                task_id, index, entry, request_name(parts.workflow_id, task_id, name)
            )
            future.arguments = text
            futures.append(future)
        inputs = inputs_of(args, kwargs, *entries)
        held = _HeldTask(
            task_id,
            task_name,
            fn,
            args,
            kwargs,
            entries,
            environment,
            init_env,
            resources,
            list(futures),  # Executor.map pops from the list it is given
            inputs,
            left=len(inputs),
        )
        self._tracker.add_task(task_id, task_name, futures)
        with self._lock:
            self._held[task_id] = held
            self._counts["held"] += 1
        common = inputs_of(args, kwargs)
        depends = [[_job_id(f) for f in inputs_of(*common, entry)] for entry in entries]
        if parts.state is not None:
            parts.state.record_task(
                task_id, task_name, function_name, jobs, [f.arguments for f in futures]
            )
            parts.state.set_waiting(task_id, depends)
        if self._follow(held, depends):
            with self._lock:
                self._counts["followed"] += 1
        for future in inputs:
            future.add_done_callback(lambda f, held=held: _soon(lambda: self._input_done(held, f)))
        return futures

    def _input_done(self, held: _HeldTask, future: AsyncResult) -> None:
        with self._lock:
            if held.ended:
                return
            if future.cancelled() or future.exception() is not None:
                held.ended = True
            else:
                held.left -= 1
                held.ended = held.left == 0
            if not held.ended:
                return
            self._held.pop(held.task_id, None)
        if future.cancelled():
            if held.followed:  # its jobs are in the backend: withdraw them
                self._tracker.cancel([f for f in held.futures if not f.done()])
            for dependent in held.futures:
                dependent.cancel()
        elif future.exception() is not None:
            live = [f for f in held.futures if not f.done()]
            self._fail(held, lambda dependent: _dependency_error(dependent, future))
            if held.followed and live and self._parts.backend is not None:
                # Settled first, so the backend's report of the kill changes nothing.
                self._parts.backend.cancel([_job_id(f) for f in live])
        elif not held.followed:
            self._release(held)
        self._forget(held)

    def _fail(self, held: _HeldTask, error: Callable[[AsyncResult], BaseException]) -> None:
        for dependent in held.futures:
            if not dependent.done():
                self._tracker.fail(dependent, error(dependent))

    def _follow(self, held: _HeldTask, depends: list[list[str]]) -> bool:
        """Submit the task at once, for the backend to start it after its inputs, when
        the backend can (Slurm, ``slurm_afterok``) and every input not done yet is one
        of this workflow's jobs that it holds; return whether it did."""
        parts = self._parts
        prefix = f"{parts.workflow_id}/"
        pending = [f for f in held.inputs if not f.done()]
        if (
            not self._options.config.slurm_afterok
            or parts.backend is None
            or parts.cache is None
            or presigns(parts.cache)  # the node could not read a large input from S3
            or self._tracker.detached
            or held.fn is None
            or not pending
            or any(not f.name.startswith(prefix) for f in pending)
            or any(f.done() and (f.cancelled() or f.exception() is not None) for f in held.inputs)
        ):
            return False
        value_of = self._value_of()

        def named(future: AsyncResult) -> Any:
            return value_of(future) if future.done() else ResultOf(future.task_id, future.job)

        try:
            requests = self._store(held, named)
        except Exception:  # an input ended badly meanwhile: its callback decides
            return False
        self._tracker.add_task(held.task_id, held.task_name, (), requests)
        if parts.state is not None:
            parts.state.set_released(held.task_id, self._specs.rows(held.task_name, requests))
        try:
            held.followed = parts.backend.submit_after(requests, [_job_id(f) for f in pending])
        except Exception as exc:  # sbatch refused it: its jobs fail with that, as submit's do
            held.followed = True  # nobody submits it again
            self._fail(held, lambda _, error=exc: error)
            return True
        if not held.followed and parts.state is not None:
            parts.state.set_waiting(held.task_id, depends)  # held after all
        return held.followed

    def _value_of(self) -> Callable[[AsyncResult], Any]:
        """Return what a done input stands for in a call: its value, or a reference to
        it when its large result is in this workflow's content store."""
        parts = self._parts

        def value_of(future: AsyncResult) -> Any:
            reference = future.reference()
            if (
                reference is not None
                and reference.get("ref")
                and reference.get("workflow") == parts.workflow_id
            ):
                # A large result in the content store: the node fetches it itself.
                ref = StoredResult(
                    str(reference["ref"]),
                    str(reference["task"]),
                    int(reference["job"]),
                    int(reference.get("attempt", 0)),
                )
                return ref
            return future.result()

        return value_of

    def _store(self, held: _HeldTask, value_of: Callable[[AsyncResult], Any]) -> list:
        """Pickle the task's call with each future replaced by ``value_of(future)``, store
        its specs; return its requests. Raises what pickling or storing raises."""
        assert held.fn is not None
        stored: list[Any] = []

        def noted(future: AsyncResult) -> Any:
            value = value_of(future)
            if type(value) in (StoredResult, ResultOf):
                stored.append(value)
            return value

        args = substitute(tuple(held.args), noted)
        kwargs = substitute(dict(held.kwargs), noted)
        entries = [None if e is None else substitute(dict(e), noted) for e in held.entries]
        hook = persistent_id if stored else None
        limit = self._options.config.max_argument_bytes
        call = dumps_call(held.fn, args, kwargs, limit, hook)
        job_kwargs = [
            None if entry is None else dumps_job_kwargs(entry, i, limit, hook)
            for i, entry in enumerate(entries)
        ]
        return self._specs.store_task(
            held.task_id,
            held.task_name,
            call,
            job_kwargs,
            held.environment,
            held.init_env,
            held.resources,
        )

    def _release(self, held: _HeldTask) -> None:
        """Submit the task: its inputs are all done with a value."""
        live = [f for f in held.futures if not f.done()]  # some may have been cancelled
        if not live or self._tracker.detached or held.fn is None:
            return
        parts = self._parts
        try:
            requests = self._store(held, self._value_of())
        except Exception as exc:  # e.g. a value too large to travel: its jobs fail with it
            self._fail(held, lambda _, error=exc: error)
            return
        self._tracker.add_task(held.task_id, held.task_name, (), requests)
        if parts.state is not None:
            parts.state.set_released(held.task_id, self._specs.rows(held.task_name, requests))
        with self._lock:
            self._counts["released"] += 1
        wanted = [r for r, f in zip(requests, held.futures, strict=True) if not f.done()]
        try:
            assert parts.backend is not None
            parts.backend.submit(wanted)
        except Exception as exc:
            self._fail(held, lambda _, error=exc: error)

    @staticmethod
    def _forget(held: _HeldTask) -> None:
        """Drop what the task no longer needs: its inputs keep their callbacks (and so
        this record) as long as they live, its arguments need not live as long."""
        held.fn, held.args, held.kwargs, held.entries = None, (), {}, []
        held.inputs = []


def _short(future: AsyncResult) -> str:
    """A job's name without its workflow's id (``t0003/inc[0]``), for messages."""
    return future.name.partition("/")[2] or future.name


def _job_id(future: AsyncResult) -> str:
    return f"{future.task_id}/{future.job}"


def _dependency_error(dependent: AsyncResult, failed: AsyncResult) -> DependencyError:
    """The error of ``dependent``, which will not run because its input ``failed`` did."""
    cause = failed.exception()
    assert cause is not None
    failed_name = _short(failed)
    root = cause.failed_job if isinstance(cause, DependencyError) else failed_name
    root_cause: BaseException = cause
    while isinstance(root_cause, DependencyError) and root_cause.__cause__ is not None:
        root_cause = root_cause.__cause__
    first = (str(root_cause).strip().splitlines() or [""])[0]
    because = "" if root == failed_name else f" because {root} did"
    error = DependencyError(
        f"{_short(dependent)} did not run: its input {failed_name} failed{because}: "
        f"{type(root_cause).__name__}: {first}",
        job=_short(dependent),
        dependency=failed_name,
        failed_job=root,
    )
    error.__cause__ = cause
    return error


def _nothing(future: AsyncResult) -> None:
    """What a future stands for when a call is checked before its inputs are there."""
    return None
