"""Waiting in tests for something another process or thread brings about."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str = "condition", timeout: float = 60.0) -> T:
    """Call ``condition`` until it returns something true, and return that.

    Polls every 20 ms: a deadline for a condition, not a sleep standing in for
    synchronisation.

    Raises:
        AssertionError: ``timeout`` seconds passed first; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
