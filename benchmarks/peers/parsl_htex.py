"""Parsl: a ``HighThroughputExecutor`` with a ``LocalProvider`` block on loopback."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers.base import ResultLike, System


class ParslSystem(System):
    """One HTEX block of ``workers`` workers on this node, used through ``python_app``.

    The block is held (``init_blocks = min_blocks = max_blocks = 1``) so that the
    scaling strategy never retires it between measurements. Everything else is
    Parsl's default (encrypted ZMQ, monitoring off, run directory in a temporary
    directory).
    """

    label = "Parsl"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._dfk: Any = None
        self._run_dir: tempfile.TemporaryDirectory | None = None
        self._apps: dict[Callable[[int], Any], Any] = {}

    def start(self) -> None:
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        # HTEX launches ``interchange.py`` and ``process_worker_pool.py`` through
        # PATH: they sit beside this interpreter, which need not be on PATH.
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join(filter(None, [bin_dir, os.environ.get("PATH")]))
        self._run_dir = tempfile.TemporaryDirectory(prefix="bench-parsl-")
        config = Config(
            executors=[
                HighThroughputExecutor(
                    label="htex_local",
                    address="127.0.0.1",
                    max_workers_per_node=self.workers,
                    cores_per_worker=1,
                    provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
                )
            ],
            run_dir=self._run_dir.name,
        )
        self._dfk = parsl.load(config)
        # The block's workers connect asynchronously: one call per worker waits for them.
        self.map(abs, list(range(self.workers)))

    def _app(self, fn: Callable[[int], Any]) -> Any:
        from parsl import python_app

        if fn not in self._apps:
            self._apps[fn] = python_app(fn, executors=["htex_local"])
        return self._apps[fn]

    def submit(self, fn: Callable[[int], Any], x: int) -> ResultLike:
        return self._app(fn)(x)

    def map(self, fn: Callable[[int], Any], xs: list[int]) -> list[Any]:
        app = self._app(fn)
        futures = [app(x) for x in xs]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._dfk is not None:
            self._dfk.cleanup()
            self._dfk = None
        if self._run_dir is not None:
            self._run_dir.cleanup()
            self._run_dir = None

    def versions(self) -> dict[str, str]:
        import parsl

        return {"parsl": parsl.__version__}
