"""Issue 18's scale and STOMP benchmarks run end to end at tiny sizes (they assert no time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_scale_measures_a_map_and_many_tasks_and_probes_status_meanwhile(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH_DIR / "scale.py"),
            "--sizes=40",
            "--tasks=3",
            "--task-jobs=5",
            "--status-interval=0.5",
            f"--json-dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "scale_issue18.json").read_text())["runs"]
    assert [(r["kind"], r["tasks"], r["jobs"]) for r in runs] == [("map", 1, 40), ("tasks", 3, 15)]
    for run in runs:
        assert run["probe_failures"] == []
        assert run["peak_rss_mb"] >= run["baseline_rss_mb"] > 0
        # The idle floor is measured for every probe, before the jobs run.
        assert {k: v["n"] > 0 for k, v in run["idle"].items()} == {
            "page": True,
            "api": True,
            "status WF": True,
            "status": True,
        }
    assert "Response times (ms)" in done.stdout


@pytest.mark.slow
def test_stomp_fan_in_and_hop_lose_nothing_at_tiny_sizes(activemq_factory):
    # The factory is asked for its marker and skip rule only: the script starts its broker.
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH_DIR / "result_channels.py"),
            "--parts=fanin,hop",
            "--publishers=3",
            "--fanin-messages=12",
            "--hop-messages=5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 publisher processes" in done.stdout
    assert "channels {'stomp': 12}; lost 0, wrong values 0" in done.stdout
    assert "collector received 15 (with 3 to connect), rejected 0" in done.stdout
    assert "bare stomp.py send -> receive" in done.stdout
