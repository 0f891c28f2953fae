"""One process-wide thread that polls every batch backend's jobs, each on its own back-off.

::

    SlurmBackend / PandaBackend            the watcher thread (one per process)
    ---------------------------            ------------------------------------
    watch = WATCHER.watch(poll, min, max)  sleeps until the earliest watch is due
    submit/adopt -> watch.poll_soon(s)  ->  changed = watch's poll()  (squeue, task status)
                                            changed or woken: next poll in poll_min
                                            else: the interval doubles, up to poll_max
    shutdown -> watch.close()               no more polls of that watch

A backend's ``poll`` asks its scheduler about all of its jobs in one call
(batched), so a thousand jobs never mean a thousand scheduler calls, and a
process with several workflows runs one polling thread, not one per backend
(submitit's ``InfoWatcher`` is the model). A poll that raises is logged and
tried again at the next interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Watch:
    """One backend's registration with the :class:`StatusWatcher`.

    Attributes:
        name: for log messages.
        interval: the seconds the watcher waits after the current poll,
            between ``poll_min`` and ``poll_max``.
    """

    def __init__(
        self,
        watcher: StatusWatcher,
        poll: Callable[[], bool],
        poll_min: float,
        poll_max: float,
        name: str,
    ) -> None:
        if not 0 < poll_min <= poll_max:
            raise ValueError(f"need 0 < poll_min <= poll_max, not {poll_min} and {poll_max}")
        self.name = name
        self.interval = poll_min
        self._watcher = watcher
        self._poll = poll
        self._min, self._max = poll_min, poll_max
        self._due = time.monotonic() + poll_min
        self._polling = False
        self._woken = False  # poll_soon during a poll: keep the due time it set

    def poll_soon(self, within: float = 0.0) -> None:
        """Poll within ``within`` seconds (now by default), whatever the back-off was."""
        with self._watcher._cond:
            self.interval = self._min
            self._due = min(self._due, time.monotonic() + within)
            self._woken = True
            self._watcher._cond.notify_all()

    def close(self, wait: bool = True) -> None:
        """Stop polling; with ``wait``, return only once a poll under way has ended.

        Safe to call from the poll itself (it then does not wait for itself).
        """
        self._watcher._remove(self, wait)


class StatusWatcher:
    """Runs the polls of every :class:`Watch` in one daemon thread.

    The thread starts with the first watch and ends when the last is closed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: list[Watch] = []
        self._thread: threading.Thread | None = None

    def watch(self, poll: Callable[[], bool], poll_min: float, poll_max: float, name: str) -> Watch:
        """Poll ``poll`` from ``poll_min`` seconds on; it returns whether anything changed.

        Raises:
            ValueError: unless ``0 < poll_min <= poll_max``.
        """
        watch = Watch(self, poll, poll_min, poll_max, name)
        with self._cond:
            self._watches.append(watch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="idds-fat-status-watcher", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return watch

    def threads(self) -> int:
        """How many watcher threads run (0 or 1): for tests and diagnostics."""
        with self._cond:
            return 0 if self._thread is None else 1

    def _remove(self, watch: Watch, wait: bool) -> None:
        with self._cond:
            if watch in self._watches:
                self._watches.remove(watch)
            self._cond.notify_all()
            if wait and threading.current_thread() is not self._thread:
                while watch._polling:
                    self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._watches:
                        self._thread = None  # a later watch starts a new thread
                        return
                    now = time.monotonic()
                    due = min(self._watches, key=lambda w: w._due)
                    if due._due <= now:
                        break
                    self._cond.wait(due._due - now)
                due._polling, due._woken = True, False
            try:
                changed = due._poll()
            except Exception:  # the watcher must outlive any surprise
                logger.exception("polling %s failed; will try again", due.name)
                changed = False
            with self._cond:
                due._polling = False
                if not due._woken:  # a poll_soon during the poll set the next time itself
                    due.interval = due._min if changed else min(due.interval * 2, due._max)
                    due._due = time.monotonic() + due.interval
                self._cond.notify_all()


WATCHER = StatusWatcher()
"""The process-wide watcher the Slurm and PanDA backends share."""
