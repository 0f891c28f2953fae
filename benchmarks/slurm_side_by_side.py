"""idds-fat's slurm backend beside submitit, Parsl and dask-jobqueue, on one real Slurm.

Usage (as root: the private slurmd runs jobs as root)::

    .venv/bin/python benchmarks/slurm_side_by_side.py [--runs 3] [--trivial 200]
        [--sleepy 50] [--hpo 10x20] [--systems pilot,parsl,dask,...]

Starts one :class:`idds_fat.testing.SlurmCluster` (single node; 2 CPUs on this
machine) and, system after system on that same cluster, runs each workload
twice on the same started system: ``cold`` includes starting the system (a
workflow, an executor and its first Slurm job) and the first map; ``warm`` is
the same map again on what is running. For each it records the seconds to the
first result and to all results, checks every value, and writes
``benchmarks/results/slurm_side_by_side.json`` and a Markdown table (the median
of the runs, with the min-max spread) on stdout.

Workloads: ``trivial`` calls of ``x + 1``; ``sleepy`` calls of one second
(ideal with 2 CPUs: sleepy / 2 seconds); ``hpo``: a loop of I iterations, each a
map of P points of a cheap objective, the next centred on the best so far.

Every system gets the node's 2 CPUs: idds-fat arrays one CPU per element,
packing ``jobs_per_worker`` K per element (``pack10c2``: elements of 2 cores running
2 jobs at once), pilot mode one pilot of 2 cores;
submitit ``map_array`` one CPU per element; Parsl HTEX one block (a Slurm job of
2 cores, 2 workers) through ``SlurmProvider``; dask-jobqueue one ``SLURMCluster``
job of 2 worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

sys.path.insert(0, str(HERE))
# Slurm jobs inherit the environment: the nodes import the workloads by name.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

from slurm_workloads import objective, one_second, plus_one  # noqa: E402

from idds_fat import Workflow, work  # noqa: E402

IDDS_FUNCTIONS = {
    (packed, cores, kind): work(
        fn, **({"jobs_per_worker": packed} if packed else {}), **({"cores": cores} if cores else {})
    )
    for packed, cores in ((None, None), (10, None), (10, 2))
    for kind, fn in (("trivial", plus_one), ("sleepy", one_second), ("hpo", objective))
}


class Clock:
    """Seconds since it was made."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


# --- the systems -------------------------------------------------------------------
# Each: start(), map(kind, xs, clock) -> (first, all, values), close().


class IddsFat:
    """idds-fat's slurm backend: arrays, packing (``jobs_per_worker``) or pilot mode."""

    def __init__(self, label: str, work_dir: Path, **settings: Any) -> None:
        self.label = label
        self.settings = {"backend": "slurm", "work_dir": str(work_dir), **settings}
        self.jobs_per_worker = self.settings.pop("jobs_per_worker", None)
        self.cores = self.settings.pop("cores", None)
        self.wf: Workflow | None = None

    def start(self) -> None:
        self.wf = Workflow(**self.settings, progress=False)
        self.wf.__enter__()

    def map(self, kind: str, xs: list, clock: Clock) -> tuple[float, float, list]:
        fn = IDDS_FUNCTIONS[self.jobs_per_worker, self.cores, kind]
        result = fn.map([{"x": x} for x in xs])
        futures = list(result.futures)
        first = None
        for _ in as_completed(futures):
            first = first if first is not None else clock()
        values = [f.result() for f in futures]
        return first or clock(), clock(), values

    def close(self) -> None:
        if self.wf is not None:
            self.wf.__exit__(None, None, None)
            self.wf = None


class Submitit:
    """submitit's ``AutoExecutor`` on Slurm, ``map_array`` (one element per call)."""

    label = "submitit map_array"

    def __init__(self, folder: Path, partition: str) -> None:
        self.folder, self.partition = folder, partition

    def start(self) -> None:
        import submitit

        self.executor = submitit.AutoExecutor(folder=str(self.folder), cluster="slurm")
        self.executor.update_parameters(
            slurm_partition=self.partition,
            timeout_min=30,
            cpus_per_task=1,
            slurm_array_parallelism=1000,
        )

    def map(self, kind: str, xs: list, clock: Clock) -> tuple[float, float, list]:
        import submitit.helpers

        fn = {"trivial": plus_one, "sleepy": one_second, "hpo": objective}[kind]
        jobs = self.executor.map_array(fn, xs)
        first = None
        for _ in submitit.helpers.as_completed(jobs, poll_frequency=0.1):
            first = first if first is not None else clock()
        return first or clock(), clock(), [job.result() for job in jobs]

    def close(self) -> None:
        pass


class Parsl:
    """Parsl's ``HighThroughputExecutor`` with a ``SlurmProvider`` block of 2 workers."""

    label = "Parsl HTEX + SlurmProvider"

    def __init__(self, run_dir: Path, partition: str) -> None:
        self.run_dir, self.partition = run_dir, partition
        self.apps: dict = {}

    def start(self) -> None:
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.launchers import SingleNodeLauncher
        from parsl.providers import SlurmProvider

        bin_dir = str(Path(sys.executable).parent)
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        config = Config(
            executors=[
                HighThroughputExecutor(
                    label="htex_slurm",
                    address="127.0.0.1",
                    max_workers_per_node=2,
                    cores_per_worker=1,
                    provider=SlurmProvider(
                        partition=self.partition,
                        nodes_per_block=1,
                        cores_per_node=2,
                        init_blocks=1,
                        min_blocks=1,
                        max_blocks=1,
                        walltime="00:30:00",
                        exclusive=False,
                        launcher=SingleNodeLauncher(),
                        worker_init=f"export PATH={bin_dir}:$PATH",
                    ),
                )
            ],
            run_dir=str(self.run_dir),
            strategy="none",
        )
        self.dfk = parsl.load(config)

    def map(self, kind: str, xs: list, clock: Clock) -> tuple[float, float, list]:
        from parsl import python_app

        fn = {"trivial": plus_one, "sleepy": one_second, "hpo": objective}[kind]
        app = self.apps.setdefault(kind, python_app(fn, executors=["htex_slurm"]))
        futures = [app(x) for x in xs]
        first = None
        for _ in as_completed(futures):
            first = first if first is not None else clock()
        return first or clock(), clock(), [f.result() for f in futures]

    def close(self) -> None:
        import parsl

        self.dfk.cleanup()
        parsl.clear()


class DaskJobqueue:
    """dask-jobqueue's ``SLURMCluster``: one Slurm job of 2 worker processes."""

    label = "dask-jobqueue SLURMCluster"

    def __init__(self, log_dir: Path, partition: str) -> None:
        self.log_dir, self.partition = log_dir, partition

    def start(self) -> None:
        from dask_jobqueue import SLURMCluster
        from distributed import Client

        self.cluster = SLURMCluster(
            queue=self.partition,
            cores=2,
            processes=2,
            memory="2GB",
            walltime="00:30:00",
            python=sys.executable,
            log_directory=str(self.log_dir),
            scheduler_options={"host": "127.0.0.1", "dashboard_address": None},
        )
        self.cluster.scale(jobs=1)
        self.client = Client(self.cluster)

    def map(self, kind: str, xs: list, clock: Clock) -> tuple[float, float, list]:
        from distributed import as_completed as dask_completed

        fn = {"trivial": plus_one, "sleepy": one_second, "hpo": objective}[kind]
        futures = self.client.map(fn, xs, pure=False)
        first = None
        for _ in dask_completed(futures):
            first = first if first is not None else clock()
        return first or clock(), clock(), self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


# --- the workloads -----------------------------------------------------------------


def run_workload(system, kind: str, size: Any, clock: Clock) -> tuple[float, float]:
    """Run one workload on a started system; check its values; return (first, all)."""
    if kind != "hpo":
        xs = list(range(size))
        first, done, values = system.map(kind, xs, clock)
        expected = [x + 1 for x in xs] if kind == "trivial" else xs
        if list(values) != expected:
            raise AssertionError(f"{system.label}: wrong values for {kind}")
        return first, done
    iterations, points = size
    centre, width, first = 0.0, 8.0, None
    for _ in range(iterations):
        xs = [centre - width / 2 + width * k / (points - 1) for k in range(points)]
        got, _, values = system.map("hpo", xs, clock)
        first = got if first is None else first
        if any(abs(v - objective(x)) > 1e-9 for x, v in zip(xs, values, strict=True)):
            raise AssertionError(f"{system.label}: wrong objective values")
        centre, width = xs[min(range(points), key=values.__getitem__)], width / 2
    if abs(centre - 3.0) > 0.5:
        raise AssertionError(f"{system.label}: the HPO loop ended at {centre}, not near 3")
    return first or clock(), clock()


def measure(make: Callable[[], Any], workloads: dict[str, Any]) -> dict[str, Any]:
    """Cold (start + the workload) and warm (again) for each workload, each on a fresh system."""
    out: dict[str, Any] = {}
    for kind, size in workloads.items():
        system = make()
        clock = Clock()
        system.start()
        try:
            cold = run_workload(system, kind, size, clock)
            warm_clock = Clock()
            warm = run_workload(system, kind, size, warm_clock)
        finally:
            system.close()
        out[kind] = {"cold": cold, "warm": warm}
        print(
            f"  {system.label} {kind}: cold {cold[0]:.2f}/{cold[1]:.2f} s, "
            f"warm {warm[0]:.2f}/{warm[1]:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    return out


def systems(root: Path, partition: str, names: Iterable[str]) -> dict[str, Callable[[], Any]]:
    """Makers of the named systems, each set up as this comparison runs it, on ``partition``
    (their files in new directories under ``root``)."""

    def counter(name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))

    quick = {"slurm_poll_min": 0.5, "slurm_poll_max": 2.0}
    makers = {
        "arrays": lambda: IddsFat("idds-fat arrays", counter("arrays"), **quick),
        "pack10": lambda: IddsFat(
            "idds-fat jobs_per_worker=10", counter("pack"), jobs_per_worker=10, **quick
        ),
        "pack10c2": lambda: IddsFat(
            "idds-fat jobs_per_worker=10, cores=2",
            counter("pack"),
            jobs_per_worker=10,
            cores=2,
            **quick,
        ),
        "pilot": lambda: IddsFat(
            "idds-fat pilot mode",
            counter("pilot"),
            slurm_mode="pilot",
            slurm_pilots=1,
            slurm_max_pilots=1,
            slurm_pilot_cores=2,
            **quick,
        ),
        "submitit": lambda: Submitit(counter("submitit"), partition),
        "parsl": lambda: Parsl(counter("parsl"), partition),
        "dask": lambda: DaskJobqueue(counter("dask"), partition),
    }
    return {name: makers[name] for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trivial", type=int, default=200)
    parser.add_argument("--sleepy", type=int, default=50)
    parser.add_argument("--hpo", default="10x20", help="ITERATIONSxPOINTS, or 0 for none")
    parser.add_argument("--systems", default="pilot,parsl,dask,pack10,submitit,arrays")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "slurm_side_by_side.json")
    args = parser.parse_args(argv)
    workloads: dict[str, Any] = {}
    if args.trivial:
        workloads["trivial"] = args.trivial
    if args.sleepy:
        workloads["sleepy"] = args.sleepy
    if args.hpo not in ("0", ""):
        iterations, points = (int(n) for n in args.hpo.split("x"))
        workloads["hpo"] = (iterations, points)

    from idds_fat.testing import SlurmCluster

    root = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    runs: dict[str, list] = {}
    with SlurmCluster(root / "cluster") as cluster:
        os.environ.update(cluster.env)
        partition = cluster.partitions[0]
        chosen = systems(root, partition, args.systems.split(","))
        for run in range(args.runs):
            for name, make in chosen.items():
                print(f"run {run + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
                try:
                    runs.setdefault(name, []).append(measure(make, workloads))
                except Exception as exc:  # one system failing must not lose the others
                    print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    runs.setdefault(name, []).append({"error": f"{type(exc).__name__}: {exc}"})
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workloads": {k: list(v) if isinstance(v, tuple) else v for k, v in workloads.items()},
        "cpus": cluster.cpus,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))


def table(report: dict) -> str:
    """The Markdown table: per system and workload, median (min-max) of first/all, cold and warm."""
    lines = [
        "| system | workload | cold: first | cold: all | warm: first | warm: all |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in report["runs"].items():
        good = [r for r in runs if "error" not in r]
        if not good:
            lines.append(f"| {name} | (failed: {runs[0]['error'][:80]}) | | | | |")
            continue
        for kind in good[0]:
            cells = []
            for phase in ("cold", "warm"):
                for which in (0, 1):
                    xs = [r[kind][phase][which] for r in good]
                    cells.append(
                        f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"
                        if len(xs) > 1
                        else f"{xs[0]:.2f} s"
                    )
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
