"""What the caller sees when a job raises, or dies without a result."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

import pytest

from idds_fat import JobLostError, RemoteError, RemoteTraceback, Workflow, work


class NeedsTwoArguments(Exception):
    """Pickles but does not unpickle: its __init__ wants two arguments."""

    def __init__(self, first, second):
        super().__init__(f"{first}/{second}")


class HoldsALock(Exception):
    """Does not pickle at all."""

    def __init__(self):
        super().__init__("holding a lock")
        self.lock = threading.Lock()


@work
def fails_with_value_error(x):
    if x > 0:
        raise ValueError(f"x must not be positive, got {x}")
    return x


def test_remote_exception_reraises_as_its_own_type_with_remote_traceback():
    with Workflow():
        with pytest.raises(ValueError, match="x must not be positive, got 3") as info:
            fails_with_value_error(3)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fails_with_value_error" in cause.tb and "raise ValueError" in cause.tb
    assert "wrapper.py" not in cause.tb.splitlines()[1]


def test_map_keeps_each_jobs_exception_on_its_own_result():
    mapped = work(map_results=True)(fails_with_value_error.fn)
    with Workflow():
        results = mapped(multi_jobs_kwargs_list=[{"x": 0}, {"x": 1}, {"x": -1}])
    assert results.get_result(args={"x": 0}) == 0
    assert results.get_result(args={"x": -1}) == -1
    with pytest.raises(ValueError):
        results.get_result(args={"x": 1})
    assert [f.job for f in results.failed()] == [1]


def test_map_as_list_raises_first_failure_in_input_order():
    with Workflow():
        with pytest.raises(ValueError, match="got 2"):
            fails_with_value_error(multi_jobs_kwargs_list=[{"x": 0}, {"x": 2}, {"x": 5}])


@pytest.mark.parametrize("exc_class", [NeedsTwoArguments, HoldsALock])
def test_exception_that_cannot_travel_arrives_as_remote_error(exc_class):
    @work
    def raise_it():
        raise exc_class(*(["a", "b"] if exc_class is NeedsTwoArguments else []))

    with Workflow():
        with pytest.raises(RemoteError) as info:
            raise_it()
    assert info.value.type_name.endswith(exc_class.__qualname__)
    assert "raise_it" in info.value.traceback
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_unpicklable_return_value_is_reported_not_lost():
    with Workflow():
        with pytest.raises(TypeError, match="return value could not be pickled"):
            work(lambda: threading.Lock())()


def test_job_that_exits_without_result_is_lost_with_its_stderr():
    @work
    def exits():
        print("about to vanish", file=sys.stderr, flush=True)
        os._exit(7)

    with Workflow():
        with pytest.raises(JobLostError) as info:
            exits()
    lost = info.value
    assert lost.exit_status == 7
    assert "about to vanish" in lost.stderr_tail and "about to vanish" in str(lost)
    assert lost.stderr_path and os.path.exists(lost.stderr_path)
    assert "exits[0]" in lost.job


def test_killed_job_is_lost_with_the_signal_named():
    @work
    def killed():
        os.kill(os.getpid(), signal.SIGKILL)

    with Workflow():
        with pytest.raises(JobLostError, match="SIGKILL") as info:
            killed()
    assert info.value.exit_status == -signal.SIGKILL


def test_segfault_is_lost_not_hanging():
    @work
    def crash():
        ctypes.string_at(0)

    with Workflow():
        with pytest.raises(JobLostError, match="SIGSEGV"):
            crash()


def test_one_lost_job_does_not_take_down_the_rest_of_the_map():
    @work(map_results=True)
    def sometimes_dies(i):
        if i == 1:
            os._exit(1)
        return i

    with Workflow():
        results = sometimes_dies(multi_jobs_kwargs_list=[{"i": i} for i in range(3)])
    assert results[0] == 0 and results[2] == 2
    with pytest.raises(JobLostError):
        results[1]


def test_walltime_kills_the_job_and_says_so(tmp_path):
    @work(walltime=0.5)
    def too_long():
        import time

        time.sleep(60)

    with Workflow():
        with pytest.raises(JobLostError, match="walltime"):
            too_long()
