"""The functions the Slurm side-by-side runs (benchmarks/slurm_side_by_side.py).

In a module of their own, importable on the nodes (the benchmark puts this
directory on ``PYTHONPATH``, which Slurm jobs inherit), so every system sends
them by reference, as a user's installed code would be.
"""

from __future__ import annotations

import time


def plus_one(x: int) -> int:
    """The trivial call."""
    return x + 1


def one_second(x: int) -> int:
    """A call of one second."""
    time.sleep(1.0)
    return x


def objective(x: float) -> float:
    """The HPO loop's cheap objective, best at 3."""
    return (x - 3.0) ** 2


def stamped(seconds: float) -> tuple[float, float]:
    """A call of ``seconds`` that returns when it started and ended (``time.time()``)."""
    began = time.time()
    time.sleep(seconds)
    return began, time.time()
