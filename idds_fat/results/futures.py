"""What a ``@work`` call returns: ``AsyncResult`` (a real Future) and ``MapResult``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import _base
from typing import Any

from idds_fat.results.display import arguments_repr, html_table, outcome_counts, outcome_text
from idds_fat.results.idds_names import IddsAsyncResultNames, IddsMapResultNames

# The states of concurrent.futures.Future (CPython Lib/concurrent/futures/_base.py),
# stable since 3.2: AsyncResult adds the one transition it lacks, RUNNING to CANCELLED.
_PENDING = "PENDING"
_RUNNING = "RUNNING"
_CANCELLED = "CANCELLED"

__all__ = ["AsyncResult", "LazyValue", "MapResult"]


class LazyValue:
    """A value fetched on first use (a large result travelling by reference).

    ``get()`` runs ``load`` once, from whichever thread asks first, and keeps the
    value (or the exception) for every later call. ``reference`` is the verified
    header of the signed reference it was sent as (its cache key ``ref``, task,
    job, attempt): a dependent job is handed that instead of the value.
    """

    def __init__(self, load: Callable[[], Any], reference: Mapping[str, Any] | None = None) -> None:
        self._load = load
        self.reference = reference
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def get(self) -> Any:
        """Return the value, loading it the first time. Raises what loading raised."""
        with self._lock:
            if not self._done:
                try:
                    self._value = self._load()
                except BaseException as exc:
                    self._error = exc
                self._done = True
                self._load = None  # type: ignore[assignment]
        if self._error is not None:
            raise self._error
        return self._value


# How long the main thread blocks at a time while it waits for jobs. POSIX
# lets the system deliver a process-directed SIGINT (Ctrl-C, kill -INT) to any
# thread; CPython acts on it only when the main thread runs bytecode again,
# and a lock acquire with no timeout is woken only by a signal to its own
# thread. Waiting in slices is what lets Ctrl-C reach a caller blocked on its
# jobs (tests/workflow/test_lifecycle.py sends it to another thread).
_INTERRUPTIBLE_SLICE = 0.25


def wait_interruptibly(
    futures: Iterable[concurrent.futures.Future], timeout: float | None = None
) -> tuple[set[concurrent.futures.Future], set[concurrent.futures.Future]]:
    """``concurrent.futures.wait(futures, timeout)`` for all of them, which Ctrl-C interrupts.

    Returns ``(done, not_done)``. In the main thread it waits in short slices,
    so a ``KeyboardInterrupt`` is raised at once wherever the signal landed;
    in other threads it is ``concurrent.futures.wait``.
    """
    if threading.current_thread() is not threading.main_thread():
        done, pending = concurrent.futures.wait(futures, timeout)
        return set(done), set(pending)
    # concurrent.futures.wait, with its one wait on the waiter's event cut into
    # slices. Calling wait() once per slice instead locks every pending future and
    # installs a waiter on each, every slice: on a 100,000-job map that is 0.4 s of
    # CPU every 0.25 s, time the caller's other threads then lack. The waiter is
    # installed once here, through the helpers wait() itself uses (CPython's
    # _base, unchanged since 3.2, as the states above).
    fs = set(futures)
    with _base._AcquireFutures(fs):
        done = {f for f in fs if f._state in (_base.CANCELLED_AND_NOTIFIED, _base.FINISHED)}
        if len(done) == len(fs):
            return done, set()
        waiter = _base._create_and_install_waiters(fs, concurrent.futures.ALL_COMPLETED)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            step = (
                _INTERRUPTIBLE_SLICE if remaining is None else min(_INTERRUPTIBLE_SLICE, remaining)
            )
            if waiter.event.wait(step):
                break
    finally:  # Ctrl-C included: no waiter is left behind on the futures
        for f in fs:
            with f._condition:
                f._waiters.remove(waiter)
    done.update(waiter.finished_futures)
    return done, fs - done


class AsyncResult(IddsAsyncResultNames, concurrent.futures.Future):
    """The result of one job: a :class:`concurrent.futures.Future`.

    ``concurrent.futures.as_completed``, ``wait`` and ``asyncio.wrap_future``
    work on it, and it can be awaited directly. ``running()`` is True once the
    backend started the job; from then on ``cancel()`` returns False, as the
    ``Future`` contract says, and :meth:`kill` stops the job instead. ``result()`` returns the
    function's return value or raises its exception (re-raised as its own type,
    with the remote traceback as ``__cause__``), :class:`~idds_fat.errors.JobLostError`
    when the job died without a result, or ``TimeoutError``.

    Attributes:
        task_id: the task the job belongs to.
        job: the job's index in its task.
        kwargs: the job's own keyword arguments (its entry of ``multi_jobs_kwargs_list``).
        name: a readable job name for messages.
        arguments: the whole call's arguments as text (positional, common and the
            job's own keyword arguments; shortened), for display.
    """

    def __init__(
        self,
        task_id: str,
        job: int,
        kwargs: Mapping[str, Any] | None = None,
        name: str = "",
        canceller: Callable[[AsyncResult], None] | None = None,
        arguments: str | None = None,
    ) -> None:
        super().__init__()
        self.task_id = task_id
        self.job = job
        self.kwargs = dict(kwargs or {})
        self.name = name or f"{task_id}/{job}"
        self.arguments = arguments_repr((), self.kwargs) if arguments is None else arguments
        self._canceller = canceller

    def cancel(self) -> bool:
        """Cancel the job if it has not started, as ``concurrent.futures.Future.cancel``.

        Returns False once the job runs (``running()``) or has finished, True if
        the future is cancelled (now or before). A queued job is withdrawn from
        its backend. To stop a running job, use :meth:`kill`.
        """
        if self._to_cancelled(kill=False):
            if self._canceller is not None:
                self._canceller(self)
            return True
        return self.cancelled()

    def kill(self) -> bool:
        """Cancel the job, killing it if it runs (an idds-fat verb; ``cancel()`` does not).

        The future ends cancelled, as the CLI's ``cancel`` and the monitoring
        page's cancel button leave it. Returns False if it had already finished
        with a value or an exception, True if it is cancelled.
        """
        if self.done():
            return self.cancelled()
        if self._canceller is not None:
            self._canceller(self)
        return self.mark_cancelled()

    def mark_running(self) -> bool:
        """Move a pending future to running (its job started); return whether it runs.

        Once running, ``cancel()`` returns False. Safe to call again (a job run
        again stays running) and on a cancelled or finished future (returns False).
        """
        with self._condition:  # a reentrant lock: the check and the move are one step
            if self._state == _PENDING:
                return self.set_running_or_notify_cancel()
            return self._state == _RUNNING

    def mark_cancelled(self) -> bool:
        """Move to the cancelled state, even from running, and wake ``wait``/``as_completed``.

        Doesn't touch the job (the backend killed it, or :meth:`kill` does).
        Returns False if the future had already finished.
        """
        self._to_cancelled(kill=True)
        return self.cancelled()

    def _to_cancelled(self, kill: bool) -> bool:
        """The one transition to cancelled: from pending (and from running if ``kill``).

        ``concurrent.futures.Future`` has no way from RUNNING to CANCELLED, so this
        does what ``Future.cancel`` does for a pending one. Returns whether this
        call made the transition.
        """
        with self._condition:
            if self._state != _PENDING and not (kill and self._state == _RUNNING):
                return False
            self._state = _CANCELLED
            self._condition.notify_all()
        # CANCELLED alone is not done for concurrent.futures.wait and as_completed;
        # this moves it to CANCELLED_AND_NOTIFIED and wakes their waiters.
        self.set_running_or_notify_cancel()
        self._invoke_callbacks()
        return True

    def result(self, timeout: float | None = None) -> Any:
        """Return the job's value, waiting up to ``timeout`` seconds.

        A large value that travelled by reference is fetched from the cache and
        verified here, on first use.

        Raises:
            TimeoutError: not done in time.
            CancelledError: the job was cancelled.
            IntegrityError: a large value's stored copy was tampered with.
            Exception: the job's own exception, or JobLostError.
        """
        value = super().result(self._wait(timeout))
        return value.get() if isinstance(value, LazyValue) else value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Return the job's exception (None if it returned), waiting up to ``timeout`` seconds.

        Raises:
            TimeoutError: not done in time.
            CancelledError: the job was cancelled.
        """
        return super().exception(self._wait(timeout))

    def _wait(self, timeout: float | None) -> float | None:
        """Wait as ``Future`` would, but interruptibly; return what is left of ``timeout``."""
        if self.done():
            return timeout
        wait_interruptibly([self], timeout)
        return 0  # done now, or out of time

    def reference(self) -> Mapping[str, Any] | None:
        """Return the verified header of the signed reference a large value travelled
        by (its cache key ``ref``, ``task``, ``job``, ``attempt``), or None: the job is
        not done with a value, or its value came inline. Loads nothing."""
        if not self.done() or self.cancelled() or super().exception() is not None:
            return None
        return getattr(super().result(), "reference", None)

    def get_result(self, timeout: float | None = None) -> Any:
        """Alias of :meth:`result`, as iDDS names it."""
        return self.result(timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def status(self) -> str:
        """Return ``pending``, ``done``, ``cancelled`` or ``failed: ExceptionType``."""
        if not self.done():
            return "pending"
        if self.cancelled():
            return "cancelled"
        if self.exception() is not None:
            return f"failed: {type(self.exception()).__name__}"
        return "done"

    def __repr__(self) -> str:
        return f"<AsyncResult {self.name} {self.status()}>"

    def _repr_html_(self) -> str:
        return html_table(
            ["job", "arguments", "status", "value"],
            [[self.name, self.arguments, self.status(), outcome_text(self)]],
        )


def _canonical(kwargs: Mapping[str, Any]) -> str | None:
    try:
        return json.dumps(kwargs, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


class MapResult(IddsMapResultNames, Sequence):
    """The results of a task's jobs, one per entry of ``multi_jobs_kwargs_list``.

    Reads like a list in input order (``results[i]``, ``len``, iteration give
    values, blocking as needed), and by arguments: ``get_result(args=kwargs)``
    (with iDDS's ``name``, ``key`` and ``with_details``: results/idds_names.py).
    ``as_completed()`` yields the jobs' :class:`AsyncResult` as they finish, and
    ``futures`` gives them all for ``concurrent.futures.wait``.
    """

    future_type = AsyncResult

    def __init__(self, futures: Sequence[AsyncResult] = ()) -> None:
        self.futures: list[AsyncResult] = list(futures)
        # Built on the first lookup by arguments: most maps are only read in order,
        # and the index costs a JSON text and a dict slot per job (100,000 jobs: 15 MB).
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.futures)

    def __getitem__(self, position: int) -> Any:  # type: ignore[override]
        """Return the value of job ``position`` (blocking); raise its exception if it failed."""
        if isinstance(position, slice):
            return [f.result() for f in self.futures[position]]
        return self.futures[position].result()

    def __iter__(self) -> Iterator[Any]:
        with self._killing_on_interrupt():
            for future in self.futures:
                yield future.result()

    def future_for(self, args: Mapping[str, Any]) -> AsyncResult:
        """Return the job whose keyword arguments equal ``args``.

        Raises:
            KeyError: no job of this map was given these arguments.
        """
        if self._index is None:
            index: dict[str, int] = {}
            for position, future in enumerate(self.futures):
                if (canonical := _canonical(future.kwargs)) is not None:
                    index.setdefault(canonical, position)
            self._index = index  # built whole before it is shared: a racing thread builds its own
        key = _canonical(args)
        if key is not None and key in self._index:
            return self.futures[self._index[key]]
        for future in self.futures:
            if future.kwargs == args:
                return future
        raise KeyError(f"no job of this map was called with {args!r}")

    def items(self, timeout: float | None = None) -> Iterator[tuple[dict[str, Any], Any]]:
        """Yield ``(kwargs, value)`` in input order, blocking for each (Ctrl-C kills the rest)."""
        with self._killing_on_interrupt():
            for future in self.futures:
                yield future.kwargs, future.result(timeout)

    def results(self, timeout: float | None = None) -> list[Any]:
        """Return all values in input order; raise the first failure in input order.

        Raises:
            TimeoutError: some job is still unfinished after ``timeout`` seconds.
            KeyboardInterrupt: Ctrl-C, after cancelling (killing) the unfinished jobs.
            Exception: the first failed job's exception, CancelledError or JobLostError.
        """
        self.wait(timeout)
        return [f.result() for f in self.futures]

    def as_completed(self, timeout: float | None = None) -> Iterator[AsyncResult]:
        """Yield each job's :class:`AsyncResult` as it finishes (done, failed or cancelled).

        Raises:
            TimeoutError: not all finished within ``timeout`` seconds.
        """
        return concurrent.futures.as_completed(self.futures, timeout)

    @contextlib.contextmanager
    def _killing_on_interrupt(self) -> Iterator[None]:
        # Ctrl-C in a wait for these jobs means "stop them", as it does for a
        # blocking @work call (Workflow.wait): left pending they would run on unseen.
        try:
            yield
        except KeyboardInterrupt:
            self.kill()
            raise

    def wait(self, timeout: float | None = None) -> MapResult:
        """Block until every job has finished; return self.

        Raises:
            TimeoutError: some job is still unfinished after ``timeout`` seconds
                (they run on).
            KeyboardInterrupt: Ctrl-C, after cancelling (killing) the unfinished jobs.
        """
        with self._killing_on_interrupt():
            _, pending = wait_interruptibly(self.futures, timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(self.futures)} jobs still unfinished")
        return self

    def done(self) -> bool:
        """Return whether every job has finished."""
        return all(f.done() for f in self.futures)

    def cancel(self) -> int:
        """Cancel every job that has not started (``Future.cancel``); return how many.

        Running jobs go on; :meth:`kill` stops them too.
        """
        return sum(f.cancel() for f in self.futures if not f.done())

    def kill(self) -> int:
        """Cancel every unfinished job, killing those that run; return how many."""
        return sum(f.kill() for f in self.futures if not f.done())

    def failed(self) -> list[AsyncResult]:
        """Return the finished jobs that raised (or were lost or cancelled)."""
        return [f for f in self.futures if f.done() and (f.cancelled() or f.exception())]

    def __await__(self) -> Generator[Any, None, MapResult]:
        """``await results``: wait for every job without blocking the event loop; return self.

        Raises the first failure in input order, as :meth:`results` does (the
        job's exception, ``CancelledError`` or ``JobLostError``), once all finished.
        """

        async def _all() -> MapResult:
            await asyncio.gather(
                *(asyncio.wrap_future(f) for f in self.futures), return_exceptions=True
            )
            for future in self.futures:
                if future.cancelled() or future.exception() is not None:
                    future.result()  # raises what the job raised, or CancelledError
            return self

        return _all().__await__()

    def __repr__(self) -> str:
        finished = sum(f.done() for f in self.futures)
        return f"<MapResult {finished}/{len(self.futures)} done, {len(self.failed())} failed>"

    def _repr_html_(self, max_rows: int = 20) -> str:
        counts = outcome_counts(self.futures)
        summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        rows = []
        for future in self.futures[:max_rows]:
            rows.append([future.job, future.arguments, future.status(), outcome_text(future)])
        if len(self.futures) > max_rows:
            rows.append(["…", f"{len(self.futures) - max_rows} more", "", ""])
        return html_table(
            ["job", "arguments", "status", "value"],
            rows,
            caption=f"MapResult: {summary or 'empty'}",
        )
