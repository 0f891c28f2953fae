"""The process-wide status watcher: one thread, a back-off per backend, polls on demand."""

from __future__ import annotations

import threading

import pytest

from idds_fat.backends.watcher import StatusWatcher
from idds_fat.testing import wait_until


class Poller:
    """Counts its polls and records the interval the watcher had chosen for each."""

    def __init__(self, changes: list[bool] | None = None) -> None:
        self.changes = list(changes or [])
        self.intervals: list[float] = []
        self.threads: set[str] = set()
        self.watch = None
        self.ready = threading.Event()  # set once `watch` is known

    def poll(self) -> bool:
        assert self.ready.wait(10)
        self.intervals.append(self.watch.interval)
        self.threads.add(threading.current_thread().name)
        return self.changes.pop(0) if self.changes else False


def start(watcher: StatusWatcher, poller: Poller, poll_min: float, poll_max: float):
    poller.watch = watcher.watch(poller.poll, poll_min, poll_max, "test")
    poller.ready.set()
    return poller.watch


def test_interval_doubles_while_nothing_changes_and_stops_at_poll_max():
    watcher = StatusWatcher()
    poller = Poller()
    watch = start(watcher, poller, 0.005, 0.04)
    wait_until(lambda: len(poller.intervals) >= 6, "six polls", timeout=10)
    watch.close()
    assert poller.intervals[:6] == [0.005, 0.01, 0.02, 0.04, 0.04, 0.04]


def test_a_change_brings_the_interval_back_to_poll_min():
    watcher = StatusWatcher()
    poller = Poller(changes=[False, False, True, False])
    watch = start(watcher, poller, 0.005, 0.04)
    wait_until(lambda: len(poller.intervals) >= 5, "five polls", timeout=10)
    watch.close()
    # Each entry is the interval chosen before that poll: reset after the third.
    assert poller.intervals[:5] == [0.005, 0.01, 0.02, 0.005, 0.01]


def test_poll_soon_polls_now_whatever_the_backoff_was():
    watcher = StatusWatcher()
    poller = Poller()
    # A first poll only after an hour: only poll_soon can bring it.
    watch = start(watcher, poller, 3600.0, 7200.0)
    watch.poll_soon()
    wait_until(lambda: len(poller.intervals) == 1, "the poll asked for", timeout=10)
    watch.close()


def test_backends_share_one_thread_which_ends_with_the_last_watch():
    watcher = StatusWatcher()
    first, second = Poller(), Poller()
    watches = [start(watcher, first, 0.005, 0.01), start(watcher, second, 0.005, 0.01)]
    wait_until(lambda: first.intervals and second.intervals, "both polled", timeout=10)
    assert watcher.threads() == 1
    assert first.threads == second.threads == {"idds-fat-status-watcher"}
    for watch in watches:
        watch.close()
    wait_until(lambda: watcher.threads() == 0, "the thread ended", timeout=10)


def test_closed_watch_is_not_polled_again_and_a_failing_poll_is_retried():
    watcher = StatusWatcher()
    calls: list[int] = []
    closing = threading.Event()

    def failing() -> bool:
        calls.append(1)
        if len(calls) == 2:
            closing.set()
        raise RuntimeError("scheduler down")

    watch = watcher.watch(failing, 0.005, 0.005, "failing")
    assert closing.wait(10), "the watcher did not poll again after a failure"
    watch.close()
    polled = len(calls)
    # A new watch's poll proves the thread kept going; the closed one stayed closed.
    other = Poller()
    start(watcher, other, 0.005, 0.005).poll_soon()
    wait_until(lambda: len(other.intervals) >= 3, "the other watch polled", timeout=10)
    assert len(calls) == polled


def test_poll_min_above_poll_max_is_refused():
    with pytest.raises(ValueError, match="poll_min <= poll_max"):
        StatusWatcher().watch(lambda: False, 2.0, 1.0, "bad")
