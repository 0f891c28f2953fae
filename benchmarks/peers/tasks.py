"""The functions every system runs: importable by any worker through PYTHONPATH."""

from __future__ import annotations

import time


def trivial(x: int = 0) -> int:
    """Return ``x``: a job that does nothing."""
    return x


def sleep_10ms(x: int = 0) -> int:
    """Sleep 10 ms and return ``x``."""
    time.sleep(0.01)
    return x
