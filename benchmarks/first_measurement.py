"""First measurement of the local backend's per-call cost (cold jobs).

Measures, in one run on this machine:

* ``python -c pass``: the floor of any job that starts an interpreter;
* ``python -c "import cloudpickle"``: the floor of a job that unpickles anything;
* round trip of one trivial ``@work`` call (submit -> value in the caller),
  median and p90 over ``--calls`` sequential calls in one workflow;
* wall time of a ``--jobs``-job map of a trivial function;

and prints each next to the interpreter floor as a ratio.

    .venv/bin/python benchmarks/first_measurement.py [--calls 50] [--jobs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from idds_fat import Workflow, work


@work
def trivial(x=0):
    return x


def _command_times(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True)
        times.append(time.perf_counter() - start)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=20, help="runs of each interpreter floor")
    args = parser.parse_args()

    floor = statistics.median(_command_times([sys.executable, "-c", "pass"], args.runs))
    floor_cp = statistics.median(
        _command_times([sys.executable, "-c", "import cloudpickle"], args.runs)
    )
    with tempfile.TemporaryDirectory() as work_dir, Workflow(work_dir=work_dir) as wf:
        trivial(0)  # warm the caller's side (service, cache, wrapper in place)
        round_trips = []
        for i in range(args.calls):
            start = time.perf_counter()
            assert trivial(i) == i
            round_trips.append(time.perf_counter() - start)
        start = time.perf_counter()
        results = trivial.map([{"x": i} for i in range(args.jobs)])
        assert results.results() == list(range(args.jobs))
        map_wall = time.perf_counter() - start
        workers = wf.config.max_workers

    rt_median = statistics.median(round_trips)
    rows = [
        ("python -c pass (median)", floor, 1.0),
        ("python -c 'import cloudpickle' (median)", floor_cp, floor_cp / floor),
        (f"@work round trip, median of {args.calls}", rt_median, rt_median / floor),
        (f"@work round trip, p90 of {args.calls}", _quantile(round_trips, 0.9), None),
        (f"{args.jobs}-job map, wall ({workers} workers)", map_wall, None),
        (
            f"{args.jobs}-job map, per job x workers",
            map_wall / args.jobs * workers,
            map_wall / args.jobs * workers / floor,
        ),
    ]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"{'measure':<44} {'seconds':>9} {'x python -c pass':>17}")
    for name, seconds, ratio in rows:
        shown = f"{ratio:>17.1f}" if ratio is not None else f"{'':>17}"
        print(f"{name:<44} {seconds:>9.4f} {shown}")


if __name__ == "__main__":
    main()
