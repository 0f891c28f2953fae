"""The graph HPO example: run as jobs, it computes exactly what plain Python computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hpo_graph.py"


def _run(*args: str, tmp_path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--json", "--iterations", "4", "--points", "5", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={"IDDS_FAT_WORK_DIR": str(tmp_path / "work"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_graph_of_dependent_rounds_matches_plain_python(tmp_path):
    jobs = _run(tmp_path=tmp_path)
    plain = _run("--in-process", tmp_path=tmp_path)
    # Every suggestion took every earlier (point, score) future: a wrong value, order or
    # substitution anywhere in the 40-job graph changes the later rounds' points.
    assert jobs == plain
    assert jobs["jobs"] == 40
    status = subprocess.run(
        [str(Path(sys.executable).parent / "idds-fat"), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"IDDS_FAT_WORK_DIR": str(tmp_path / "work"), "PATH": "/usr/bin:/bin"},
    )
    (workflow,) = json.loads(status.stdout)["workflows"]  # the in-process runs made none
    assert workflow["job_states"] == {"done": 40}
    assert jobs["score"] == max(jobs["round_best"])
    other_seed = _run("--in-process", "--seed", "2", tmp_path=tmp_path)
    assert other_seed["point"] != plain["point"]  # the seeds reach the suggestions
