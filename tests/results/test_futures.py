"""AsyncResult and MapResult as concurrent.futures objects."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import sys
import threading
import time

import pytest

from idds_fat import AsyncResult, MapResult, Workflow, work
from idds_fat.results.futures import wait_interruptibly
from idds_fat.testing import wait_until


def test_cancelled_result_counts_as_done_for_wait_and_as_completed():
    cancelled_jobs = []
    first = AsyncResult("t1", 0, {"x": 1}, canceller=cancelled_jobs.append)
    second = AsyncResult("t1", 1, {"x": 2})
    assert first.cancel()
    second.set_result(4)
    done, pending = concurrent.futures.wait([first, second], timeout=1)
    assert done == {first, second} and not pending
    assert set(concurrent.futures.as_completed([first, second], timeout=1)) == {first, second}
    assert cancelled_jobs == [first]
    assert first.cancel()  # already cancelled: True, as Future.cancel says
    assert cancelled_jobs == [first]


def test_map_result_lookup_by_kwargs_with_unhashable_values():
    futures = [AsyncResult("t", i, {"p": [i, i + 1]}) for i in range(3)]
    for i, future in enumerate(futures):
        future.set_result(i * 10)
    results = MapResult(futures)
    assert results.get_result(args={"p": [1, 2]}) == 10
    assert results[2] == 20 and list(results) == [0, 10, 20]
    assert results[0:2] == [0, 10]
    with pytest.raises(KeyError):
        results.get_result(args={"p": [9]})


def test_map_result_wait_times_out_with_a_count():
    results = MapResult([AsyncResult("t", 0), AsyncResult("t", 1)])
    results.futures[0].set_result(1)
    with pytest.raises(TimeoutError, match="1 of 2"):
        results.wait(timeout=0.01)
    assert "1/2 done" in repr(results)


def test_cancelling_twice_is_harmless():
    future = AsyncResult("t", 0)
    assert future.mark_cancelled() and future.mark_cancelled()
    assert future.cancelled()
    done, _ = concurrent.futures.wait([future], timeout=1)
    assert done == {future}


def test_awaiting_a_map_result_raises_the_first_failure_in_input_order():
    ok, failed, later = AsyncResult("t", 0), AsyncResult("t", 1), AsyncResult("t", 2)
    ok.set_result(1)
    failed.set_exception(ValueError("job 1 broke"))
    later.set_exception(KeyError("job 2"))
    with pytest.raises(ValueError, match="job 1 broke"):
        asyncio.run(_await(MapResult([ok, failed, later])))


def test_awaiting_a_map_result_with_a_cancelled_job_raises_cancelled():
    ok, cancelled = AsyncResult("t", 0), AsyncResult("t", 1)
    ok.set_result(1)
    cancelled.mark_cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        asyncio.run(_await(MapResult([ok, cancelled])))


def test_awaiting_a_map_result_that_succeeded_returns_it():
    futures = [AsyncResult("t", i) for i in range(2)]
    for i, future in enumerate(futures):
        future.set_result(i)
    results = MapResult(futures)
    assert asyncio.run(_await(results)) is results and results.results() == [0, 1]


async def _await(results: MapResult) -> MapResult:
    return await results


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _main_thread_waits() -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code is wait_interruptibly.__code__:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("waiting_in", ["results", "iteration"])
def test_ctrl_c_in_map_results_kills_the_outstanding_jobs(tmp_path, waiting_in):
    pid_file = tmp_path / "job.pid"

    @work
    def runs_until_killed(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Workflow(max_workers=2) as wf:
            results = wf.map_kwargs(
                runs_until_killed, [{"path": str(pid_file)}, {"path": str(tmp_path / "other")}]
            )
            job_pid = int(
                wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the job's pid")
            )

            def interrupt() -> None:
                # Ctrl-C once the caller blocks on its jobs (a process-directed SIGINT).
                wait_until(_main_thread_waits, "the caller to wait for its jobs")
                os.kill(os.getpid(), signal.SIGINT)

            interrupter = threading.Thread(target=interrupt)
            interrupter.start()
            with pytest.raises(KeyboardInterrupt):
                if waiting_in == "results":
                    results.results()
                else:
                    list(results)
            interrupter.join()
            assert all(f.cancelled() for f in results.futures)
            states = wf.parts.state.job_counts()
        assert states == {"cancelled": 2}
        wait_until(lambda: not _pid_alive(job_pid), f"the job (pid {job_pid}) to die", timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)


class _CountingCondition:
    """A future's condition that counts how often it is taken (``with`` or ``acquire``)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.entered = 0

    def __enter__(self) -> bool:
        self.entered += 1
        return self._condition.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._condition.__exit__(*exc)

    def acquire(self, *args: object) -> bool:
        self.entered += 1
        return self._condition.acquire(*args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._condition, name)


def test_waiting_in_slices_locks_each_future_a_fixed_number_of_times(monkeypatch):
    # The main thread waits in slices (for Ctrl-C). Waiting on 100,000 futures must
    # not lock each of them every slice: that made a big map's wait quadratic.
    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setattr("idds_fat.results.futures._INTERRUPTIBLE_SLICE", 0.005)
    futures = [AsyncResult("t", i) for i in range(20)]
    conditions = []
    for future in futures:
        future._condition = _CountingCondition()
        conditions.append(future._condition)
    futures[0].set_result(0)
    done, pending = wait_interruptibly(futures, timeout=0.2)  # about 40 slices
    assert done == {futures[0]} and pending == set(futures[1:])
    # Once to install the waiter, once to remove it (set_result was the first's third).
    assert [c.entered for c in conditions[1:]] == [2] * 19
    assert all(not f._waiters for f in futures)


def test_waiting_in_slices_returns_once_every_future_is_done():
    futures = [AsyncResult("t", i) for i in range(50)]
    settler = threading.Thread(target=lambda: [f.set_result(f.job) for f in futures])
    settler.start()
    done, pending = wait_interruptibly(futures)
    settler.join()
    assert done == set(futures) and not pending
    assert [f.result() for f in futures] == list(range(50))
    assert all(not f._waiters for f in futures)


def test_map_result_finds_a_job_by_arguments_added_after_it_was_made():
    futures = [AsyncResult("t", i, {"x": i}) for i in range(3)]
    results = MapResult(futures)
    results.add_result(args={"x": 7}, result=70)
    for i, future in enumerate(futures):
        future.set_result(i * 10)
    assert results.get_result(args={"x": 7}) == 70
    assert results.get_result(args={"x": 1}) == 10
    with pytest.raises(KeyError):
        results.future_for({"x": 5})
