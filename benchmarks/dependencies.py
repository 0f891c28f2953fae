"""Futures as arguments on the local backend: the cost of one edge, and the caller's memory.

Measures, in one run on this machine:

* **per link**: a chain of ``--chain`` trivial jobs (each ``inc`` takes the
  previous one's future), submitted all at once; the time from the first
  submit to the last value, divided by the chain's length. Each link is a
  result arriving, the next job's call pickled and its spec stored, and a
  warm worker running it: the whole round trip one edge of a graph costs.
  For scale, the same number of independent ``inc`` jobs submitted at once
  (``--chain`` jobs on ``max_workers`` warm workers) is timed too.
* **memory of a waiting graph**: ``--chains`` chains of ``--length`` jobs whose
  roots wait on a file, so nothing else runs: the caller's resident memory
  growth per job held, at a tenth of the graph and at all of it (the same per
  job means memory grows linearly). Then the roots are released and the whole
  graph runs to its end (``--run-graph``), or is cancelled from its roots,
  which cancels every job waiting on them.

    .venv/bin/python benchmarks/dependencies.py [--chain 1000] [--chains 100] \
        [--length 100] [--run-graph]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idds_fat import Workflow  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def gated(value: int, path: str) -> int:
    from idds_fat.testing import wait_until

    wait_until(lambda: os.path.exists(path), path, 3600)
    return value


def rss_mb() -> float:
    """The resident memory of this process now, in MB (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def chain(length: int, work_dir: str) -> None:
    with Workflow("chain", backend="local", work_dir=work_dir, progress=False) as wf:
        wf.submit(inc, 0).result(120)  # start the workers before timing
        started = time.perf_counter()
        last = wf.submit(inc, 0)
        for _ in range(length - 1):
            last = wf.submit(inc, last)
        submitted = time.perf_counter() - started
        assert last.result(3600) == length
        total = time.perf_counter() - started
        started = time.perf_counter()
        flat = [wf.submit(inc, i) for i in range(length)]
        assert [f.result(3600) for f in flat][-1] == length
        independent = time.perf_counter() - started
        workers = wf.config.max_workers
    print(f"chain of {length} trivial jobs on local ({workers} warm workers)")
    per_job = 1e3 / length
    print(f"  submitting all links:       {submitted:8.3f} s ({submitted * per_job:.2f} ms/job)")
    print(f"  first submit to last value: {total:8.3f} s")
    print(f"  per link:                   {total * per_job:8.2f} ms")
    print(f"  {length} independent jobs: {independent:8.3f} s ({independent * per_job:.2f} ms/job)")


def graph(chains: int, length: int, run: bool, work_dir: str) -> None:
    gate = Path(tempfile.mkdtemp()) / "gate"
    with Workflow("graph", backend="local", work_dir=work_dir, progress=False) as wf:
        wf.submit(inc, 0).result(120)
        base = rss_mb()
        roots, ends, marks = [], [], [(0, 0.0)]
        checkpoints = {max(chains * k // 10, 1) for k in (1, 4, 7, 10)}
        for c in range(chains):
            last = wf.submit(gated, 0, str(gate))
            roots.append(last)
            for _ in range(length - 1):
                last = wf.submit(inc, last)
            ends.append(last)
            if c + 1 in checkpoints:
                marks.append(((c + 1) * length, rss_mb() - base))
        # The slope between checkpoints: the same from first to last means linear growth.
        for (before, low), (jobs, grown) in zip(marks, marks[1:], strict=False):
            slope = (grown - low) * 2**20 / (jobs - before)
            print(f"  {jobs:6d} jobs held: +{grown:6.1f} MB, {slope:5.0f} B/job since {before}")
        started = time.perf_counter()
        if run:
            gate.touch()
            assert [e.result(36000) for e in ends] == [length - 1] * chains
            print(f"  ran the {chains * length} jobs in {time.perf_counter() - started:.1f} s")
        else:
            for root in roots:
                root.kill()
            assert all(e.cancelled() for e in ends)
            print(f"  cancelled from its roots in {time.perf_counter() - started:.2f} s")
            gate.touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chain", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=100)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--run-graph", action="store_true", help="run it, instead of cancelling")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        if args.chain:
            chain(args.chain, work_dir)
        if args.chains and args.length:
            print(f"graph of {args.chains} chains of {args.length} jobs, roots held back")
            graph(args.chains, args.length, args.run_graph, work_dir)


if __name__ == "__main__":
    main()
