"""The benchmark suite runs end to end at tiny sizes (it asserts no time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = [
    "--calls=3",
    "--warmup=1",
    "--jobs=4",
    "--scale-sizes=4,8",
    "--context-files=20",
    "--context-mb=0.1",
    "--context-runs=1",
    "--floor-runs=2",
]


@pytest.mark.slow
def test_run_all_prints_every_table_and_writes_json_at_tiny_sizes(tmp_path):
    # Dask and Parsl take seconds to start: the peers' own adapters are left to real runs.
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH_DIR / "run_all.py"),
            "--systems=idds-cold,ppe",
            *TINY,
            f"--json-dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for heading in ("Round trip", "Throughput", "Cold job floor", "Scale", "Context"):
        assert heading in done.stdout
    assert "idds-fat cold / PPE = " in done.stdout
    for name in ("round_trip", "cold_floor", "scale", "context"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["machine"]["cpus"]
    context = json.loads((tmp_path / "context.json").read_text())
    assert context["second"]["archive_bytes_written"] == 0


def test_run_all_stops_with_a_clear_message_when_the_bench_extra_is_missing(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import run_all

    monkeypatch.setattr(run_all, "missing_peers", lambda keys: ["parsl"])
    with pytest.raises(SystemExit) as stopped:
        run_all.main(["round-trip", "--systems=ppe,parsl"])
    assert "bench extra is missing" in str(stopped.value)
    assert "pip install -e '.[bench]'" in str(stopped.value)


FAULTS_TINY = [
    "--runs=1",
    "--broker-jobs=20",
    "--service-jobs=20",
    "--service-down=1",
    "--caller-jobs=20",
    "--scale-jobs=50",
    "--pause=0.01",
]


@pytest.mark.slow
def test_faults_runs_every_scenario_and_loses_nothing_at_tiny_sizes(tmp_path, activemq_factory):
    # The factory is asked for its marker and its skip-or-fail rule only: the script
    # starts (and kills) its own broker, service and caller.
    rows_file = tmp_path / "faults.json"
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "faults.py"), *FAULTS_TINY, f"--json={rows_file}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(rows_file.read_text())
    assert list(runs) == ["broker", "service", "caller", "scale"]
    rows = {name: only for name, (only,) in runs.items()}  # --runs=1: one row each
    for name, row in rows.items():
        assert row["received"] == row["expected"], (name, row)
        assert (row["lost"], row["doubled"], row["rejected"]) == (0, 0, 0), (name, row)
        assert f"{name:>9}       1" in done.stdout
    assert rows["broker"]["channels"]["rest"] > 0  # REST took over from the killed broker
    assert rows["service"]["recover_s"] is not None  # a result came after the restart
    assert rows["caller"]["received_before_kill"] == 2  # killed mid-map, a tenth in


def test_faults_refuses_an_unknown_scenario_by_name(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import faults

    with pytest.raises(SystemExit, match=r"unknown scenario\(s\) \['nope'\]"):
        faults.main(["--only=broker,nope"])
