"""AsyncResult and MapResult as concurrent.futures objects."""

from __future__ import annotations

import concurrent.futures

import pytest

from idds_fat import AsyncResult, MapResult


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
