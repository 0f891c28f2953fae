"""One thread that runs callbacks at deadlines (instead of a timer thread per job)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Deadlines:
    """Calls each scheduled callback once its deadline has passed, in deadline order.

    Callbacks run on this object's thread; an exception in one is logged and
    does not stop the others.
    """

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def at(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` ``delay`` seconds from now."""
        with self._changed:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._counter), callback))
            self._changed.notify()

    def stop(self) -> None:
        """Stop; callbacks not yet due are dropped."""
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._changed.wait(timeout)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:
                logger.exception("a deadline callback failed")
