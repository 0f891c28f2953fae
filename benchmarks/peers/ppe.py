"""``concurrent.futures.ProcessPoolExecutor``: the floor of a Python process pool."""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from peers.base import ResultLike, System


class ProcessPoolSystem(System):
    """A ``ProcessPoolExecutor(workers)``; ``map`` is ``Executor.map`` (chunksize 1)."""

    label = "PPE"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        self._pool = ProcessPoolExecutor(self.workers)
        # Workers start lazily; make them exist so startup is counted here.
        list(self._pool.map(abs, range(self.workers)))

    def submit(self, fn: Callable[[int], Any], x: int) -> ResultLike:
        assert self._pool is not None
        return self._pool.submit(fn, x)

    def map(self, fn: Callable[[int], Any], xs: list[int]) -> list[Any]:
        assert self._pool is not None
        return list(self._pool.map(fn, xs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def versions(self) -> dict[str, str]:
        return {"python": sys.version.split()[0]}
