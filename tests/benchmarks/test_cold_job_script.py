"""benchmarks/cold_job.py runs end to end at a tiny size (it asserts no time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from idds_fat.wrapper_source import NODE_DIR

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def test_cold_job_times_the_floor_this_trees_wrapper_and_another_copy():
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "cold_job.py"), "--runs=2", f"--node=copy={NODE_DIR}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("  ")[0].strip() for line in done.stdout.splitlines()}
    assert {'python -c "import cloudpickle"', "cold job (this tree)", "cold job (copy)"} <= rows
    assert "medians of 2 interleaved runs" in done.stdout
