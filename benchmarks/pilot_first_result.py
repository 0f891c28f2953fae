"""Where the time around a warm pilot's first result goes (issue 21, the warm first cell).

``slurm_side_by_side.py`` times a map's first result as a user sees it. This
splits that time for pilot mode, set up as the side-by-side sets it up (one
``SlurmCluster``, one pilot of 2 cores), warmed by a first map; then
``--maps`` maps of ``--jobs`` calls that each note when they started and
ended, run back to back (each waits for all its results, as the side-by-side's
warm phase does). For each map it prints, in ms from the
call to ``map``: when ``map`` returned, when the first job started on the
node, how long it ran, and how long its result took from its end to the
caller's ``as_completed``; then the medians::

    .venv/bin/python benchmarks/pilot_first_result.py --maps 8 --jobs 50 --seconds 1

Clocks: the node and the caller are one machine here, so their ``time.time()``
agree to well under a millisecond.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
# Slurm jobs inherit the environment: the nodes import the workload by name.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

from slurm_side_by_side import systems  # noqa: E402
from slurm_workloads import stamped  # noqa: E402

from idds_fat import work  # noqa: E402
from idds_fat.testing import SlurmCluster  # noqa: E402

COLUMNS = ("map returned", "first job started", "job ran", "result to caller", "first result")


def main() -> None:
    """Run the maps and print one row of ms per map, then the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=8, help="maps timed (default 8)")
    parser.add_argument("--jobs", type=int, default=50, help="calls per map (default 50)")
    parser.add_argument("--seconds", type=float, default=1.0, help="each call's length")
    args = parser.parse_args()
    fn = work(stamped)
    root = Path(tempfile.mkdtemp(prefix="bench-pilot-first-"))
    rows = []
    with SlurmCluster(root / "cluster") as cluster:
        os.environ.update(cluster.env)
        # Pilot mode set up exactly as slurm_side_by_side.py runs it.
        pilot = systems(root, cluster.partitions[0], ["pilot"])["pilot"]()
        pilot.start()
        try:
            fn.map([{"seconds": 0.0}] * 2).results(timeout=300)  # the pilot up, warm
            for _ in range(args.maps):
                start = time.time()
                result = fn.map([{"seconds": args.seconds}] * args.jobs)
                returned = time.time()
                first = next(as_completed(list(result.futures)))
                arrived = time.time()
                began, ended = first.result()
                rows.append(
                    (returned - start, began - start, ended - began, arrived - ended)
                    + (arrived - start,)
                )
                result.results(timeout=600)
        finally:
            pilot.close()
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(f"{value * 1000:.2f}" for value in row))
    medians = [statistics.median(column) * 1000 for column in zip(*rows, strict=True)]
    print("median: " + " | ".join(f"{value:.2f}" for value in medians))


if __name__ == "__main__":
    main()
