"""Every job of a running workflow, and what each result and each job end means for it.

::

    ResultCollector --dispatch(header, body)------> settle the job's future, record it
    Backend --job_started(job, ref)---------------> running; record the backend's ref
    Backend --job_ended(job, exit)----------------> keep a result handed back directly,
                                                    read the REST store, then:
        cancelled                                   -> the future is cancelled
        clean exit, result on its way (STOMP)       -> look again after the grace period
                                                       (run it again, up to max_resubmits)
        died with no result handed over (no_result) -> JobLostError at once
        anything else without a result              -> JobLostError, with its stderr tail
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import numbers
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from idds_fat.backends import JobExit, JobRequest
from idds_fat.backends.base import killed_by
from idds_fat.errors import IddsFatError, JobLostError, ServiceError
from idds_fat.node.errors import EXIT_UNDELIVERED, EXIT_UNREPORTED
from idds_fat.results import AsyncResult
from idds_fat.results.display import outcome_counts
from idds_fat.results.futures import LazyValue
from idds_fat.results.outcome import decode_result
from idds_fat.workdir import read_tail

if TYPE_CHECKING:
    from idds_fat.workflow.options import WorkflowOptions
    from idds_fat.workflow.parts import WorkflowParts
    from idds_fat.workflow.specs import JobSpecs

logger = logging.getLogger(__name__)


class JobTracker:
    """The books of one workflow's jobs: futures, requests, attempts, which run.

    One lock guards the books; futures are settled, and the backend and the
    state record called, outside it (a future's callbacks run user code). The
    collector calls :meth:`dispatch` and the backend :meth:`job_started` and
    :meth:`job_ended`, each from a thread of its own.
    """

    def __init__(self, options: WorkflowOptions, parts: WorkflowParts, specs: JobSpecs) -> None:
        self._options = options
        self._parts = parts
        self._specs = specs
        self._lock = threading.Lock()
        self._futures: dict[tuple[str, int], AsyncResult] = {}
        self._tasks: dict[str, list[AsyncResult]] = {}
        self._task_names: dict[str, str] = {}
        self._jobs: dict[str, JobRequest] = {}
        self._attempts: dict[str, int] = {}
        self._running: set[str] = set()
        self._task_count = 0
        self._closed = False
        self._detached = False

    # --- the books ---------------------------------------------------------------------

    def new_task_id(self) -> str:
        """Return the id of a new task (``t0001``, ``t0002``, ...)."""
        with self._lock:
            self._task_count += 1
            return f"t{self._task_count:04d}"

    def new_future(self, task_id: str, index: int, kwargs: Any, name: str) -> AsyncResult:
        """Return the future of job ``index`` of a task; cancelling (or killing) it
        cancels the job at the backend."""
        return AsyncResult(task_id, index, kwargs, name=name, canceller=self.cancel_future)

    def add_task(
        self,
        task_id: str,
        name: str,
        futures: Sequence[AsyncResult],
        requests: Sequence[JobRequest] = (),
        *,
        restored: bool = False,
    ) -> None:
        """Book a task's futures and the requests of the jobs behind them.

        ``restored``: the task was recorded by an earlier caller (``attach``), so
        its id is taken and :meth:`new_task_id` goes on after it.
        """
        with self._lock:
            for future in futures:
                self._futures[(task_id, future.job)] = future
            for request in requests:
                self._jobs[request.job_id] = request
            self._tasks.setdefault(task_id, []).extend(futures)
            self._task_names[task_id] = name
            if restored:
                self._task_count += 1

    def forget_task(self, task_id: str) -> None:
        """Drop a task whose submission failed: cancel its futures, record its jobs failed."""
        with self._lock:
            futures = self._tasks.pop(task_id, [])
            self._task_names.pop(task_id, None)
            for future in futures:
                self._futures.pop((task_id, future.job), None)
                self._jobs.pop(f"{task_id}/{future.job}", None)
        for future in futures:
            future.mark_cancelled()
            self._record(future, "failed")

    def request(self, job_id: str) -> JobRequest:
        """Return the request job ``job_id`` (``task_id/index``) runs as now (its latest attempt).

        Raises:
            KeyError: no such job.
        """
        with self._lock:
            return self._jobs[job_id]

    def requests(self) -> list[JobRequest]:
        """Return the request of every job, as each runs now."""
        with self._lock:
            return list(self._jobs.values())

    def futures(self) -> list[AsyncResult]:
        """Return the future of every job."""
        with self._lock:
            return list(self._futures.values())

    def tasks(self) -> dict[str, list[AsyncResult]]:
        """Return every task's futures, by task id, in input order."""
        with self._lock:
            return {task: list(futures) for task, futures in self._tasks.items()}

    def task_names(self) -> dict[str, str]:
        """Return every task's name, by task id."""
        with self._lock:
            return dict(self._task_names)

    def running(self) -> set[str]:
        """Return the ids of the jobs that the backend reported started and not yet ended."""
        with self._lock:
            return set(self._running)

    def task_rows(self) -> list[list[Any]]:
        """Return a row per task: id, name, jobs, done, failed, cancelled, running, queued."""
        names, running, rows = self.task_names(), self.running(), []
        for task_id, futures in self.tasks().items():
            counts = outcome_counts(futures)
            started = sum(f"{task_id}/{f.job}" in running for f in futures)
            done, failed, cancelled = counts["done"], counts["failed"], counts["cancelled"]
            rows.append(
                [task_id, names.get(task_id, ""), len(futures), done, failed, cancelled, started]
                + [counts["pending"] - started]
            )
        return rows

    def running_count(self) -> int:
        """Return how many jobs run now."""
        return len(self._running)

    def close(self, detached: bool = False) -> None:
        """Stop acting on job ends: run nothing again from now on. ``detached``: the
        caller stops following, so a job's end only keeps its result for ``attach``."""
        with self._lock:
            self._closed = True
            self._detached = detached

    def _future_of(self, job: JobRequest) -> AsyncResult | None:
        task_id, index = job.job_id.rsplit("/", 1)
        with self._lock:
            return self._futures.get((task_id, int(index)))

    def _record(
        self, future: AsyncResult, status: str, returncode: int | None = None, **outcome: Any
    ) -> None:
        state = self._parts.state
        if state is not None:
            state.set_job_status(future.task_id, future.job, status, returncode, **outcome)

    # --- results and job ends (called from other threads) -------------------------------

    def dispatch(self, header: dict[str, Any], body: Any) -> bool:
        """Settle the future of a verified result (``body`` may be a LazyValue of a
        large one); return whether a future was waiting for it."""
        with self._lock:
            future = self._futures.get((str(header.get("task")), int(header.get("job", -1))))
        if future is None or future.done():
            return False
        if isinstance(body, LazyValue):
            ok, value = (
                True,
                LazyValue(lambda: decode_result(header, body.get())[1], reference=body.reference),
            )
        else:
            try:
                ok, value = decode_result(header, body)
            except Exception as exc:  # e.g. the value needs a module the caller lacks
                ok, value = (
                    False,
                    IddsFatError(f"result of {future.name} could not be unpickled: {exc}"),
                )
        settled = _settle(future, ok, value)
        if settled:
            self._record(future, "done" if ok else "failed", **recorded_outcome(ok, value))
        return settled

    def job_started(self, job: JobRequest, ref: str) -> None:
        """Note that ``job`` runs, and record how the backend knows it (``ref``) for ``attach``."""
        task_id, index = job.job_id.rsplit("/", 1)
        with self._lock:
            self._running.add(job.job_id)
            future = self._futures.get((task_id, int(index)))
        if future is not None:
            future.mark_running()  # from now on cancel() is False; kill() stops it
        if self._parts.state is not None:
            self._parts.state.set_job_started(task_id, int(index), ref)

    def job_ended(self, job: JobRequest, outcome: JobExit) -> None:
        """Act on the end of ``job``: take a result it handed back, cancel, wait for
        a result still on its way, or report the job lost.

        Raises:
            ServiceError: the result it handed back was taken, but no copy of it
                could be kept in the result store: the backend must not count it
                delivered (a warm worker then delivers it itself).
        """
        service, collector = self._parts.service, self._parts.collector
        unkept: Exception | None = None
        if outcome.result is not None and service is not None:
            # The copy that attach() and `idds-fat results` read later; kept before
            # the user sees the value, so a caller killed right after loses nothing.
            # Kept for this collector, whose own reads pass over it: it gets the
            # result just below, and reading its copy back would cost a read per job.
            holder = None if collector is None or self._detached else collector.holder
            try:
                service.keep_result(self._parts.workflow_id, outcome.result, holder)
            except ValueError as exc:  # not a result of this workflow: the collector says
                logger.warning("could not keep a copy of the result of %s: %s", job.name, exc)
            except (OSError, sqlite3.Error) as exc:
                unkept = exc
        self._take_end(job, outcome)
        if unkept is not None:
            raise ServiceError(
                f"could not keep a copy of the result of {job.name}: {unkept}"
            ) from unkept

    def _take_end(self, job: JobRequest, outcome: JobExit) -> None:
        collector = self._parts.collector
        if self._detached:
            return  # the copy waits for attach()
        if outcome.result is not None and collector is not None:
            collector.accept(outcome.result, "local")
        task_id, index = job.job_id.rsplit("/", 1)
        with self._lock:
            self._running.discard(job.job_id)
            future = self._futures.get((task_id, int(index)))
        if future is None:
            return
        if outcome.cancelled:
            # A job withdrawn because its input failed is settled (DependencyError) first.
            if future.mark_cancelled():
                self._record(future, "cancelled", outcome.returncode)
            return
        checked = self._check_result(job, future)
        if future.done():
            return
        deadlines = self._parts.deadlines
        if (
            outcome.returncode == 0
            and not outcome.no_result
            and deadlines
            and (self._parts.subscriber or not checked)
        ):
            # A clean exit means a channel took the result. Over STOMP it may still
            # be on its way (or the broker lost it), or the store could not be read
            # just now (it restarts): look again after a grace period.
            grace = self._options.config.result_grace_seconds
            deadlines.at(grace, lambda: self._result_overdue(job, outcome))
            return
        self.lose(job, outcome)

    def _check_result(self, job: JobRequest, future: AsyncResult) -> bool:
        """Read the REST store for the job's result; return False if it could not be read."""
        collector = self._parts.collector
        if not future.done() and collector is not None:
            # The wrapper exits only after a channel acknowledged its result, and the
            # REST store (directly or through the mirror) keeps a copy: read it now.
            try:
                collector.drain()
            except ServiceError as exc:
                logger.warning("could not check for the result of %s: %s", job.name, exc)
                return False
        return True

    def _result_overdue(self, job: JobRequest, outcome: JobExit) -> None:
        future = self._future_of(job)
        assert future is not None
        self._check_result(job, future)
        if future.done() or self._closed:
            return
        with self._lock:
            attempt = self._attempts.get(job.job_id, 0)
        if attempt < self._options.config.max_resubmits:
            logger.warning(
                "the result of %s was accepted but never arrived; running it again", job.name
            )
            self._resubmit(job, attempt + 1)
            return
        reason = "it exited cleanly and a channel accepted its result, but it never arrived"
        self.lose(job, JobExit(outcome.returncode, reason))

    def _resubmit(self, job: JobRequest, attempt: int) -> None:
        """Run ``job`` again as ``attempt``, from its own spec (in a work dir of its own)."""
        assert self._parts.backend is not None
        again = self._specs.again(job, attempt)
        with self._lock:
            self._attempts[job.job_id] = attempt
            self._jobs[job.job_id] = again
        self._parts.backend.submit([again])

    def lose(self, job: JobRequest, outcome: JobExit) -> None:
        """Settle ``job``'s future with a :class:`JobLostError` that says why it ended
        and shows its last stderr lines (from ``outcome.log`` when the backend names
        one, else the job's ``stderr.txt``; the path only if the file is there),
        unless it is done already."""
        future = self._future_of(job)
        assert future is not None
        log = outcome.log or job.paths.stderr
        tail = read_tail(log, lines=20, max_bytes=16384)
        lost = JobLostError(
            job.name,
            outcome.returncode,
            _exit_reason(outcome),
            tail or "",
            str(log) if tail is not None else None,  # a file that is not there is no evidence
        )
        if _settle(future, False, lost):
            self._record(future, "lost", outcome.returncode, **recorded_outcome(False, lost))

    def cancel(self, futures: Iterable[AsyncResult]) -> None:
        """Cancel the jobs of ``futures`` at the backend and the futures themselves."""
        futures = list(futures)
        backend = self._parts.backend
        if backend is not None and futures:
            backend.cancel([f"{f.task_id}/{f.job}" for f in futures])
        for future in futures:
            if future.mark_cancelled():
                # Recorded here, not when the backend reports the kill: a detached
                # caller would not hear that report.
                self._record(future, "cancelled")

    def fail(self, future: AsyncResult, exc: BaseException) -> bool:
        """Settle ``future`` with ``exc`` and record its job failed, unless it is done
        already (its job never ran: an input failed, or it could not be submitted);
        return whether this settled it."""
        if _settle(future, False, exc):
            self._record(future, "failed", **recorded_outcome(False, exc))
            return True
        return False

    @property
    def detached(self) -> bool:
        """Whether the caller stopped following the workflow (``Workflow.detach``)."""
        return self._detached

    def cancel_future(self, future: AsyncResult) -> None:
        """Cancel the job of ``future``, which is being cancelled or killed (its canceller)."""
        self._record(future, "cancelled")
        if self._parts.backend is not None:
            self._parts.backend.cancel([f"{future.task_id}/{future.job}"])


def _exit_reason(outcome: JobExit) -> str:
    if outcome.reason:
        return outcome.reason
    code = outcome.returncode
    if code is None:
        return "its process could not be followed"
    if code < 0:
        return killed_by(code)
    if code == EXIT_UNDELIVERED:
        return "its result could not be delivered to the result store"
    if code == EXIT_UNREPORTED:
        return "the wrapper could not start the job"
    if code == 0:
        return "it exited cleanly but no valid result arrived"
    return "its process exited"


def _settle(future: AsyncResult, ok: bool, value: Any) -> bool:
    """Complete ``future`` unless something else already did; return whether this did."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def recorded_outcome(ok: bool, value: Any) -> dict[str, Any]:
    """Return what the state record keeps of a job's outcome: ``value`` or ``error``.

    A real number (not a bool, finite) is kept as ``value`` for the monitoring
    page's best-so-far plot; an exception is kept as ``error``: its type, message
    and remote traceback. Anything else is kept as nothing: the record is not a
    result store.
    """
    if ok:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            return {"value": number} if math.isfinite(number) else {}
        return {}
    remote = getattr(value, "remote_traceback", None)  # ends with the exception's own line
    return {"error": remote.rstrip() if remote else f"{type(value).__name__}: {value}"}
