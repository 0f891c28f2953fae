"""Measures 1 and 2: round trip of one trivial call, and throughput of 1,000-job maps.

Each system is measured in a process of its own (``run_all.py _system KEY``),
so no system's leftover threads or workers run while another is measured. In
that process: start the system (timed: "startup"), run ``warmup`` calls that
are not counted, then ``calls`` sequential round trips of ``trivial``
(submit, then block on the result), then for ``trivial`` and ``sleep_10ms``
a small warm-up map and a ``jobs``-job map (jobs/s = jobs / wall of the map,
from the first submit to the last value in the caller), then close (timed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peers import make_system
from peers.tasks import sleep_10ms, trivial

from measures.profile import profiled, top_frames
from measures.report import quantile, ratio_line, safe_ratio, table

BENCH_DIR = Path(__file__).resolve().parents[1]
RUN_ALL = BENCH_DIR / "run_all.py"
PARTS = ("round-trip", "throughput")


def measure_system(
    key: str, workers: int, calls: int, warmup: int, jobs: int, parts: tuple[str, ...]
) -> dict[str, Any]:
    """Start system ``key``, measure the ``parts`` asked for, close it; return the figures."""
    system = make_system(key, workers)
    result: dict[str, Any] = {"key": key, "label": system.label, "workers": workers}
    start = time.perf_counter()
    system.start()
    result["startup_s"] = time.perf_counter() - start
    try:
        if "round-trip" in parts:
            for i in range(warmup):
                system.submit(trivial, i).result()
            times = []
            for i in range(calls):
                start = time.perf_counter()
                value = system.submit(trivial, i).result()
                times.append(time.perf_counter() - start)
                if value != i:
                    raise AssertionError(f"{system.label}: trivial({i}) returned {value!r}")
            result["round_trip"] = {
                "calls": calls,
                "warmup": warmup,
                "p50_ms": quantile(times, 0.5) * 1e3,
                "p99_ms": quantile(times, 0.99) * 1e3,
                "mean_ms": sum(times) / len(times) * 1e3,
                "min_ms": min(times) * 1e3,
            }
        if "throughput" in parts:
            result["throughput"] = {}
            for fn in (trivial, sleep_10ms):
                system.map(fn, list(range(2 * workers)))
                xs = list(range(jobs))
                start = time.perf_counter()
                values = system.map(fn, xs)
                wall = time.perf_counter() - start
                if values != xs:
                    raise AssertionError(f"{system.label}: {fn.__name__} map returned wrong values")
                result["throughput"][fn.__name__] = {
                    "jobs": jobs,
                    "wall_s": wall,
                    "jobs_per_s": jobs / wall,
                    "slot_ms_per_job": wall * workers / jobs * 1e3,
                }
    finally:
        start = time.perf_counter()
        system.close()
        result["shutdown_s"] = time.perf_counter() - start
    result["versions"] = system.versions()
    return result


def child_env() -> dict[str, str]:
    """The environment of a system's process: ``peers.tasks`` importable by every worker."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    return env


def run_in_child(argv: list[str], timeout: float, profile: Path | None = None) -> dict[str, Any]:
    """Run ``run_all.py ARGV`` in a fresh interpreter; return the JSON its last line prints.

    With ``profile`` (a ``.raw`` path) the child runs under py-spy and a summary
    is written beside it (``.top.txt``). A failure or a timeout is returned as
    ``{"error": ...}`` with the tail of stderr.
    """
    command = [sys.executable, str(RUN_ALL), *argv]
    if profile is not None:
        command = profiled(command, profile)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=child_env()
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(argv)}"}
    if profile is not None and profile.exists():
        summary = profile.with_suffix(".top.txt")
        summary.write_text(top_frames(profile) + "\n")
        print(f"  profile: {profile}, {summary}", file=sys.stderr)
    # py-spy writes its own lines to stdout: the result is the last JSON object.
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"error": f"exit status {done.returncode}: {' '.join(argv)}\n{tail}"}
    return json.loads(lines[-1])


def run_systems(
    keys: list[str],
    workers: int,
    calls: int,
    warmup: int,
    jobs: int,
    parts: tuple[str, ...],
    timeout: float,
    profile_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Measure each system in ``keys`` in its own process, one after the other.

    With ``profile_dir``, idds-fat's processes are profiled (see :mod:`measures.profile`).
    """
    results = []
    for key in keys:
        print(f"  measuring {key} ...", file=sys.stderr, flush=True)
        argv = ["_system", key, f"--workers={workers}", f"--calls={calls}"]
        argv += [f"--warmup={warmup}", f"--jobs={jobs}", f"--parts={','.join(parts)}"]
        profile = None
        if profile_dir is not None and key.startswith("idds-"):
            profile = profile_dir / f"{key}-{'-'.join(parts)}.raw"
        result = run_in_child(argv, timeout, profile)
        result.setdefault("key", key)
        if "error" in result:
            print(f"  {key} failed: {result['error']}", file=sys.stderr)
        results.append(result)
    return results


def _ours(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r["key"].startswith("idds-") and "error" not in r]


def _peers(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if not r["key"].startswith("idds-") and "error" not in r]


def round_trip_report(results: list[dict[str, Any]]) -> str:
    """Return the round-trip table, with idds-fat / peer ratios under it."""
    measured = [r for r in results if "round_trip" in r]
    if not measured:
        return "round trip: nothing measured"
    first = measured[0]["round_trip"]
    rows = [
        (
            r["label"],
            r["startup_s"],
            r["round_trip"]["p50_ms"],
            r["round_trip"]["p99_ms"],
            r["round_trip"]["mean_ms"],
        )
        for r in measured
    ]
    lines = [
        f"Round trip of one trivial call: {first['calls']} sequential calls after "
        f"{first['warmup']} warm-up calls, {measured[0]['workers']} workers",
        table(["system", "startup s", "p50 ms", "p99 ms", "mean ms"], rows),
    ]
    for ours in _ours(measured):
        for peer in _peers(measured):
            a, b = ours["round_trip"], peer["round_trip"]
            parts = [
                ("p50", safe_ratio(a["p50_ms"], b["p50_ms"])),
                ("p99", safe_ratio(a["p99_ms"], b["p99_ms"])),
            ]
            lines.append(ratio_line(ours["label"], peer["label"], parts, "lower is faster"))
    lines += _failures(results)
    return "\n".join(lines)


def throughput_report(results: list[dict[str, Any]]) -> str:
    """Return the throughput table (jobs/s), with idds-fat / peer ratios under it."""
    measured = [r for r in results if "throughput" in r]
    if not measured:
        return "throughput: nothing measured"
    jobs = measured[0]["throughput"]["trivial"]["jobs"]
    rows = [
        (
            r["label"],
            r["throughput"]["trivial"]["jobs_per_s"],
            r["throughput"]["trivial"]["wall_s"],
            r["throughput"]["sleep_10ms"]["jobs_per_s"],
            r["throughput"]["sleep_10ms"]["wall_s"],
        )
        for r in measured
    ]
    workers = measured[0]["workers"]
    lines = [
        f"Throughput: a {jobs}-job map, {workers} workers "
        f"(10 ms sleep: at most {workers * 100} jobs/s)",
        table(["system", "trivial jobs/s", "wall s", "sleep jobs/s", "wall s"], rows),
    ]
    for ours in _ours(measured):
        for peer in _peers(measured):
            a, b = ours["throughput"], peer["throughput"]
            parts = [
                (name, safe_ratio(a[fn]["jobs_per_s"], b[fn]["jobs_per_s"]))
                for name, fn in (("trivial", "trivial"), ("10 ms sleep", "sleep_10ms"))
            ]
            lines.append(
                ratio_line(ours["label"], peer["label"], parts, "jobs/s, higher is faster")
            )
    lines += _failures(results)
    return "\n".join(lines)


def _failures(results: list[dict[str, Any]]) -> list[str]:
    return [
        f"{r['key']}: not measured ({r['error'].splitlines()[0]})" for r in results if "error" in r
    ]
