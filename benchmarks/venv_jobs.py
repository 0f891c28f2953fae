"""First and cached job in a requirements venv on the local backend (issue "Environments").

The venv installs a small probe package from a wheelhouse built here (no
internet needed), so the first job's time is the node's build (``python -m
venv`` + pip) plus the job, and later jobs reuse the cached build. A job in the
current environment is timed alongside. Each round uses a fresh work dir and a
fresh environment cache.

    .venv/bin/python benchmarks/venv_jobs.py [--rounds 3] [--local-mode warm|cold]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from idds_fat import Venv, Workflow, work
from idds_fat.testing import environments as build


def probe() -> str:
    """Import what only the venv has."""
    import fatprobe

    return fatprobe.VALUE


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    """Time the jobs and print the medians with every sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-mode", choices=("warm", "cold"), default="warm")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="idds-fat-venv-bench-"))
    wheels = build.make_wheelhouse(root / "wheels")
    first, cached, current = [], [], []
    for i in range(args.rounds):
        venv = Venv(["fatprobe"], pip_options=build.offline_pip_options(wheels))
        with Workflow(
            work_dir=root / f"work{i}",
            env_cache_dir=root / f"envs{i}",
            local_mode=args.local_mode,
            progress=False,
        ):
            in_venv = work(environment=venv)(probe)
            plain = work(lambda: 1)
            plain()  # the workflow's service and workers are up before timing
            first.append(_timed(in_venv))
            for _ in range(3):
                cached.append(_timed(in_venv))
                current.append(_timed(plain))
    for label, samples in (
        ("first venv job (build + run)", first),
        ("cached venv job", cached),
        ("current-environment job", current),
    ):
        shown = ", ".join(f"{s * 1e3:.0f}" for s in samples)
        print(f"{label:30} median {statistics.median(samples) * 1e3:6.0f} ms  [{shown}]")


if __name__ == "__main__":
    main()
