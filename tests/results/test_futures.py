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
