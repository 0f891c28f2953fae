"""What every compared system offers the benchmarks: start, submit, map, close."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Protocol


class ResultLike(Protocol):
    """A future of any of the systems: ``concurrent.futures.Future``, Dask's, Parsl's."""

    def result(self, timeout: float | None = None) -> Any:
        """Block until the job is done; return its value or raise its exception."""


class System(abc.ABC):
    """One way of running Python functions in other processes on this machine.

    ``label`` names it in tables (``"idds-fat warm"``, ``"Dask"``); ``workers``
    is how many jobs it runs at once. A system is used as
    ``start()``, then any number of ``submit``/``map``, then ``close()``.
    """

    label: str

    def __init__(self, workers: int) -> None:
        self.workers = workers

    @abc.abstractmethod
    def start(self) -> None:
        """Start the workers (or whatever the system needs before the first call)."""

    @abc.abstractmethod
    def submit(self, fn: Callable[[int], Any], x: int) -> ResultLike:
        """Run ``fn(x)`` as one job; return a future with its value."""

    @abc.abstractmethod
    def map(self, fn: Callable[[int], Any], xs: list[int]) -> list[Any]:
        """Run ``fn(x)`` for each ``x`` as one job each; block and return the values in order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the workers and release everything ``start`` took."""

    def versions(self) -> dict[str, str]:
        """Return the versions of the packages this system is made of."""
        return {}
