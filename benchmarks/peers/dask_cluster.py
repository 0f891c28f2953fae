"""Dask distributed: a ``LocalCluster`` of worker processes on loopback, used through futures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peers.base import ResultLike, System


class DaskSystem(System):
    """``LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)`` and a Client.

    ``submit`` is ``Client.submit(pure=False)``; ``map`` is ``Client.map`` then
    ``Client.gather``. The dashboard is off.
    """

    label = "Dask"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._cluster: Any = None
        self._client: Any = None

    def start(self) -> None:
        from distributed import Client, LocalCluster

        self._cluster = LocalCluster(
            n_workers=self.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        self._client = Client(self._cluster)
        self._client.wait_for_workers(self.workers)

    def submit(self, fn: Callable[[int], Any], x: int) -> ResultLike:
        return self._client.submit(fn, x, pure=False)

    def map(self, fn: Callable[[int], Any], xs: list[int]) -> list[Any]:
        return self._client.gather(self._client.map(fn, xs, pure=False))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def versions(self) -> dict[str, str]:
        import dask
        import distributed

        return {"dask": dask.__version__, "distributed": distributed.__version__}
