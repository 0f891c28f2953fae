"""Measure 4: one big map, caller peak RSS growth and wall time at several sizes.

Each size runs in a fresh interpreter (``run_all.py _scale N``) so that peak
RSS belongs to that size alone. In it: start an idds-fat workflow (warm when
available), run one call so that every part of the caller is loaded, take the
RSS as baseline, then map ``trivial`` over N jobs and wait for all values.
Growth = peak RSS of the process (``getrusage``) - baseline. The caller
process holds the SDK, the embedded service and the local backend; job
processes are not counted.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

from peers import make_system, warm_available
from peers.tasks import trivial

from measures.report import current_rss_mb, peak_rss_mb, safe_ratio, table
from measures.systems import run_in_child

RSS_TARGET_MB = 150.0
"""Issue 7: a 10,000-job map grows the caller by less than 150 MB."""


def measure_scale(jobs: int, workers: int, mode: str) -> dict[str, Any]:
    """Map ``trivial`` over ``jobs`` jobs in this process; return wall time and RSS growth."""
    system = make_system(f"idds-{mode}", workers)
    system.start()
    try:
        system.submit(trivial, 0).result()
        gc.collect()
        baseline = current_rss_mb()
        xs = list(range(jobs))
        start = time.perf_counter()
        values = system.map(trivial, xs)
        wall = time.perf_counter() - start
        if values != xs:
            raise AssertionError(f"{jobs}-job map returned wrong values")
        peak = peak_rss_mb()
        after = current_rss_mb()
    finally:
        system.close()
    return {
        "jobs": jobs,
        "mode": mode,
        "workers": workers,
        "wall_s": wall,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "rss_after_mb": after,
        "growth_mb": peak - baseline,
        "ms_per_job": wall / jobs * 1e3,
        "kb_per_job": (peak - baseline) * 1024 / jobs,
    }


def run_scale(
    sizes: list[int], workers: int, timeout: float, profile_dir: Path | None = None
) -> dict[str, Any]:
    """Measure each size in its own process, smallest first (profiled with ``profile_dir``)."""
    mode = "warm" if warm_available() else "cold"
    runs = []
    for jobs in sorted(sizes):
        print(f"  scale: {jobs} jobs ({mode}) ...", flush=True, file=sys.stderr)
        argv = ["_scale", str(jobs), f"--workers={workers}", f"--mode={mode}"]
        profile = profile_dir / f"scale-{jobs}.raw" if profile_dir is not None else None
        result = run_in_child(argv, timeout, profile)
        result.setdefault("jobs", jobs)
        runs.append(result)
    return {"mode": mode, "workers": workers, "runs": runs, "rss_target_mb": RSS_TARGET_MB}


def scale_report(figures: dict[str, Any]) -> str:
    """Return the scale table, the growth ratios between sizes and the RSS verdict."""
    runs = [r for r in figures["runs"] if "error" not in r]
    rows = [
        (
            r["jobs"],
            r["wall_s"],
            r["ms_per_job"],
            r["baseline_rss_mb"],
            r["growth_mb"],
            r["kb_per_job"],
        )
        for r in runs
    ]
    lines = [
        f"Scale: one map of a trivial function, idds-fat {figures['mode']}, "
        f"{figures['workers']} workers, each size in a fresh process",
        table(
            ["jobs", "wall s", "ms/job", "base RSS MB", "RSS growth MB", "KB/job"],
            rows,
            first_width=8,
        ),
    ]
    if len(runs) >= 2:
        small, big = runs[0], runs[-1]
        size = big["jobs"] / small["jobs"]
        lines.append(
            f"{big['jobs']} vs {small['jobs']} jobs ({size:.1f}x the jobs): wall "
            f"{safe_ratio(big['wall_s'], small['wall_s']):.2f}x, RSS growth "
            f"{safe_ratio(big['growth_mb'], small['growth_mb']) or 0:.2f}x (linear: {size:.1f}x)"
        )
    largest = max(runs, key=lambda r: r["jobs"], default=None)
    if largest is not None:
        verdict = "met" if largest["growth_mb"] < RSS_TARGET_MB else "missed"
        note = "" if largest["jobs"] >= 10_000 else f" (measured at {largest['jobs']} jobs only)"
        lines.append(
            f"caller RSS growth at {largest['jobs']} jobs: {largest['growth_mb']:.1f} MB "
            f"(target < {RSS_TARGET_MB:.0f} MB at 10,000: {verdict}{note})"
        )
    for run in figures["runs"]:
        if "error" in run:
            lines.append(f"{run['jobs']} jobs: not measured ({run['error'].splitlines()[0]})")
    return "\n".join(lines)
