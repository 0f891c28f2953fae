"""idds-fat on the ``local`` backend, warm (long-lived workers) or cold (one interpreter a job)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from peers.base import ResultLike, System


class IddsFatSystem(System):
    """A ``Workflow(backend="local", local_mode=mode)`` in a temporary work directory.

    The workflow is entered in ``start`` and left in ``close``; calls go through
    ``@work`` functions exactly as a user writes them: ``f.submit(x)`` and
    ``f.map([{"x": x}, ...]).results()``. The progress bar is off.
    """

    def __init__(self, mode: str, workers: int) -> None:
        super().__init__(workers)
        if mode not in ("warm", "cold"):
            raise ValueError(f"mode must be 'warm' or 'cold', not {mode!r}")
        self.mode = mode
        self.label = f"idds-fat {mode}"
        self._dir: tempfile.TemporaryDirectory | None = None
        self._workflow: Any = None
        self._works: dict[Callable[[int], Any], Any] = {}

    def start(self) -> None:
        import peers.tasks
        from idds_fat import Workflow
        from peers import warm_available

        # No code context: the functions travel by value (below), and PPE, Dask and
        # Parsl ship none either. From the repository's root the default context would
        # be the whole checkout, extracted once by every warm worker.
        options: dict[str, Any] = {
            "max_workers": self.workers,
            "progress": False,
            "source_dir": False,
        }
        if warm_available():
            options["local_mode"] = self.mode
        elif self.mode == "warm":
            raise RuntimeError("warm: not available (this idds-fat has no local_mode setting)")
        # Jobs get the functions by value, so they need not import this package.
        cloudpickle.register_pickle_by_value(peers.tasks)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-idds-")
        work_dir = Path(self._dir.name)
        self._workflow = Workflow("bench", work_dir=work_dir, backend="local", **options)
        self._workflow.__enter__()

    def _work(self, fn: Callable[[int], Any]) -> Any:
        from idds_fat import work

        if fn not in self._works:
            self._works[fn] = work(fn)
        return self._works[fn]

    def submit(self, fn: Callable[[int], Any], x: int) -> ResultLike:
        return self._work(fn).submit(x)

    def map(self, fn: Callable[[int], Any], xs: list[int]) -> list[Any]:
        return self._work(fn).map([{"x": x} for x in xs]).results()

    def close(self) -> None:
        if self._workflow is not None:
            self._workflow.__exit__(None, None, None)
            self._workflow = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        root = Path(__file__).resolve().parents[2]

        def git(*argv: str) -> str:
            done = subprocess.run(
                ["git", "-C", str(root), *argv], capture_output=True, text=True, check=False
            )
            return done.stdout.strip()

        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        # Changes to the SDK or the wrapper not yet committed make the figures theirs too.
        if git("status", "--porcelain", "--", "idds_fat", "wrapper"):
            commit += "+uncommitted"
        return {"idds-fat": version("idds-fat"), "commit": commit}
