"""A Workflow is a ``concurrent.futures.Executor``: CPython's executor tests, adapted.

Adapted from CPython ``Lib/test/test_concurrent_futures/`` (3.13), run on the
local backend:

- ``executor.py`` (``ExecutorTest``): ``test_submit``, ``test_submit_keyword``,
  ``test_map`` (with ``chunksize``), ``test_map_exception``, ``test_map_timeout``
  (a job blocked on a file instead of ``time.sleep(6)``; also checks the timeout
  counts from the call), ``test_shutdown_race_issue12456`` (map then shutdown).
- ``test_shutdown.py`` (``ExecutorShutdownTest``): ``test_run_after_shutdown``
  (also after ``close()``, and the error is an ``IddsFatError`` too),
  ``test_hang_issue12364`` (shutdown waits, every result is there),
  ``test_cancel_futures`` (with ``wait=False``, which must not block; a later
  ``shutdown()`` waits), ``test_context_manager_shutdown``.
- ``test_future.py`` (``FutureTests``): ``test_running``, ``test_cancel``
  (a pending job cancels; a running one refuses, ``kill()`` stops it), and the
  waiters of ``test_wait.py`` seeing a cancelled job as done.
- ``loop.run_in_executor(wf, fn, x)`` from asyncio.

Not applicable: ``test_max_workers_negative`` (``max_workers`` is a setting,
validated by ``Config``); ``test_free_reference`` and ``test_no_stale_references``
(a workflow keeps every job's future, and so its value, for ``wf.tasks``, the
monitoring page and ``attach``); ``test_interpreter_shutdown``,
``test_submit_after_interpreter_shutdown`` and the ``test_hang_gh*`` cases test
``atexit`` hooks of thread and process pools that a workflow does not install
(its ``with`` block or ``close()`` ends it); the thread/process-count tests
inspect pool internals.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import warnings

import pytest

from idds_fat import IddsFatError, MapResult, Workflow, WorkflowClosedError
from idds_fat.testing import wait_until


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def wait_for(path, value=None):
    """Return ``value`` once ``path`` exists (``None``: at once)."""
    if path is not None:
        wait_until(lambda: os.path.exists(path), path, 120)
    return value


def keys_of(mapping):
    return sorted(mapping)


def _settings(**more):
    return {"progress": False, **more}


def _wait_running(future):
    wait_until(future.running, f"{future.name} to run")


def test_a_workflow_is_an_executor():
    with Workflow(**_settings()) as wf:
        assert isinstance(wf, concurrent.futures.Executor)
        assert isinstance(wf.submit(pow, 2, 8), concurrent.futures.Future)


def test_submit():
    with Workflow(**_settings()) as wf:
        assert wf.submit(pow, 2, 8).result(timeout=60) == 256


def test_submit_keyword():
    with Workflow(**_settings()) as wf:
        assert wf.submit(mul, 2, y=8).result(timeout=60) == 16
        future = wf.submit(capture, 1, self=2, fn=3)
        assert future.result(timeout=60) == ((1,), {"self": 2, "fn": 3})
        with pytest.raises(TypeError):
            wf.submit(fn=capture, arg=1)
        with pytest.raises(TypeError):
            wf.submit(arg=1)


def test_map_yields_in_input_order_with_or_without_chunksize():
    with Workflow(**_settings()) as wf:
        assert list(wf.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
        assert list(wf.map(pow, range(10), range(10), chunksize=3)) == [
            pow(x, x) for x in range(10)
        ]
        assert list(wf.map(pow, [2, 3, 4], [1, 2])) == [2, 9]  # stops at the shortest
        with pytest.raises(ValueError, match="chunksize"):
            wf.map(pow, [1], [1], chunksize=0)


def test_map_raises_the_first_exception_where_it_is_reached():
    with Workflow(**_settings()) as wf:
        results = wf.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        assert next(results) == (0, 1)
        assert next(results) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_map_timeout_counts_from_the_call_and_leaves_running_jobs(tmp_path):
    never = str(tmp_path / "never")
    with Workflow(on_exit="cancel", **_settings()) as wf:
        got = []
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            for value in wf.map(wait_for, [None, None, never], [1, 2, 3], timeout=5):
                got.append(value)
        elapsed = time.monotonic() - start
        blocked = wf.tasks["t0001"].futures[2]
        assert got == [1, 2]
        assert 5 <= elapsed < 30
        assert not blocked.cancelled()  # it had started: map's cancel() leaves it


def test_leaving_map_early_cancels_the_jobs_not_started(tmp_path):
    never = str(tmp_path / "never")
    with Workflow(max_workers=1, on_exit="cancel", **_settings()) as wf:
        results = wf.map(wait_for, [never, None, None], timeout=2)
        with pytest.raises(TimeoutError):
            next(results)
        first, *queued = wf.tasks["t0001"].futures
        assert first.running() and not first.cancelled()
        assert all(f.cancelled() for f in queued)


def test_shutdown_race_issue12456_map_then_shutdown():
    wf = Workflow(max_workers=1, **_settings())
    results = wf.map(str, [2] * 3)
    wf.shutdown()
    assert list(results) == ["2", "2", "2"]


def test_submit_after_shutdown_or_close_raises_runtime_error():
    wf = Workflow(**_settings())
    wf.submit(pow, 2, 5).result(timeout=60)
    wf.shutdown()
    with pytest.raises(RuntimeError, match="closed"):
        wf.submit(pow, 2, 5)
    with pytest.raises(IddsFatError):
        wf.map(pow, [2], [5])
    closed = Workflow(**_settings())
    closed.close()
    with pytest.raises(WorkflowClosedError):
        closed.submit(pow, 2, 5)
    with pytest.raises(RuntimeError):  # never started, shut down: the same
        never_started = Workflow(**_settings())
        never_started.shutdown()
        never_started.submit(pow, 2, 5)


def test_shutdown_waits_for_every_job_issue12364():
    wf = Workflow(**_settings())
    futures = [wf.submit(pow, 2, i) for i in range(6)]
    wf.shutdown()
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [2**i for i in range(6)]


def test_shutdown_cancel_futures_without_waiting(tmp_path):
    gate = tmp_path / "gate"
    wf = Workflow(max_workers=1, **_settings())
    running = wf.submit(wait_for, str(gate), "first")
    queued = [wf.submit(wait_for, None, i) for i in range(5)]
    _wait_running(running)
    start = time.monotonic()
    wf.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - start < 5 and not running.done()  # it did not block
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError):
        wf.submit(pow, 2, 5)
    gate.touch()
    wf.shutdown()  # waits for the closing the first call started
    assert running.result(timeout=0) == "first"


def test_context_manager_shutdown():
    with Workflow(**_settings()) as wf:
        assert list(wf.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        wf.submit(abs, -1)


def test_future_is_running_while_its_job_runs_and_then_cannot_be_cancelled(tmp_path):
    gate = tmp_path / "gate"
    with Workflow(**_settings()) as wf:
        future = wf.submit(wait_for, str(gate), 7)
        _wait_running(future)
        assert not future.done()
        assert not future.cancel()
        assert future.running() and not future.cancelled()
        gate.touch()
        assert future.result(timeout=60) == 7
        assert not future.running() and not future.cancel()


def test_pending_job_cancels_and_never_runs_while_a_running_one_is_killed(tmp_path):
    ran = tmp_path / "ran"
    with Workflow(max_workers=1, **_settings()) as wf:
        blocker = wf.submit(wait_for, str(tmp_path / "never"))
        pending = wf.submit(os.mkdir, str(ran))
        _wait_running(blocker)
        assert not pending.running()
        assert pending.cancel() and pending.cancel()  # True again, as Future.cancel
        assert pending.cancelled() and pending.done()
        done, _ = concurrent.futures.wait([pending], timeout=0)
        assert done == {pending}
        assert not blocker.cancel()
        assert blocker.kill()
        assert blocker.cancelled()
        assert list(concurrent.futures.as_completed([blocker], timeout=10)) == [blocker]
        assert wf.submit(pow, 2, 3).result(timeout=60) == 8  # the worker was replaced
    assert not ran.exists()


def test_run_in_executor_from_asyncio():
    async def main(wf):
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(wf, pow, 2, x) for x in range(3)))

    with Workflow(**_settings()) as wf:
        assert asyncio.run(main(wf)) == [1, 2, 4]


def test_map_of_one_list_of_dicts_is_the_deprecated_keyword_map():
    dicts = [{"x": 2, "y": 3}, {"x": 4, "y": 5}]
    with Workflow(**_settings()) as wf:
        with pytest.warns(DeprecationWarning, match="map_kwargs"):
            old = wf.map(mul, dicts)
        assert isinstance(old, MapResult) and old.results() == [6, 20]
        with pytest.warns(DeprecationWarning):
            assert wf.map(mul, [{"x": 2}], y=10).results() == [20]  # common keywords too
        with pytest.raises(TypeError, match="y"):
            wf.map(mul, [1, 2], y=10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert wf.map_kwargs(mul, dicts).results() == [6, 20]
            assert wf.map_kwargs(mul, [{"y": 3}], 5).results() == [15]
            assert list(wf.map(keys_of, iter(dicts))) == [["x", "y"], ["x", "y"]]
            assert list(wf.map(mul, [1, 2], [3, 4])) == [3, 8]
