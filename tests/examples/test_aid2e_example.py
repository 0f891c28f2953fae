"""The AID2E example: its simulation responds like a tracker, and a short run ends in a plot."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aid2e_detector_design.py"
BASE = {"n_layers": 5, "r_outer": 0.5, "spacing": 1.0, "thickness": 0.003}
TRACKS = 20_000  # per momentum: enough for differences of 10 %, in about 0.1 s


@pytest.fixture(scope="module")
def evaluate():
    """The example's ``@work`` function; outside a workflow it runs in-process."""
    spec = importlib.util.spec_from_file_location("aid2e_detector_design", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda **design: module.evaluate(**{**BASE, **design}, tracks_per_momentum=TRACKS)


def test_more_layers_cost_more_and_resolve_high_momenta_better(evaluate):
    # On thin layers the hit precision limits the resolution, and more hits help.
    few, many = evaluate(n_layers=3, thickness=0.0005), evaluate(n_layers=8, thickness=0.0005)
    assert many["cost"] > few["cost"]
    assert many["resolution_by_p"][10.0] < 0.9 * few["resolution_by_p"][10.0]
    assert many["resolution"] < few["resolution"]


def test_a_longer_lever_arm_resolves_better_and_costs_more(evaluate):
    short, long = evaluate(r_outer=0.3), evaluate(r_outer=0.8)
    assert long["resolution"] < 0.5 * short["resolution"]
    assert long["cost"] > short["cost"]


def test_thicker_layers_resolve_worse_most_at_low_momentum(evaluate):
    thin, thick = evaluate(thickness=0.001), evaluate(thickness=0.01)
    assert thick["resolution"] > thin["resolution"]
    low = thick["resolution_by_p"][1.0] / thin["resolution_by_p"][1.0]
    high = thick["resolution_by_p"][10.0] / thin["resolution_by_p"][10.0]
    assert low > 2 > high > 1  # scattering scales as 1/p, hit smearing does not


def test_a_design_scores_the_same_every_time(evaluate):
    assert evaluate() == evaluate()


def test_an_impossible_design_raises(evaluate):
    with pytest.raises(ValueError, match="no such tracker"):
        evaluate(n_layers=2)


@pytest.mark.slow
def test_a_short_run_prints_a_pareto_front_and_saves_a_png(tmp_path):
    plot = tmp_path / "p.png"
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--trials", "12", "--workers", "3", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = re.search(r"Pareto-optimal designs: (\d+) of 12 trials", run.stdout)
    assert found and int(found.group(1)) >= 1, run.stdout[-2000:]
    # One progress line per trial, each naming a finished design.
    assert len(re.findall(r"^\s+\d+\s+\d+\s+[\d.]+%.*-> ", run.stdout, re.M)) == 12
    table = run.stdout.split("Pareto-optimal designs:")[1].splitlines()[2:]
    assert len([line for line in table if re.match(r"\s+\d+\s+[3-8]\s", line)]) == int(
        found.group(1)
    )


@pytest.mark.slow
def test_a_design_whose_job_raises_is_told_failed_and_the_search_goes_on(monkeypatch):
    import optuna

    from idds_fat import Workflow

    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    module = importlib.import_module("aid2e_detector_design")
    monkeypatch.setattr(module, "N_LAYERS", (1, 8))  # 1 and 2 layers make no tracker
    with Workflow(backend="local", source_dir=EXAMPLE.parent, max_workers=2):
        study = module.optimize(n_trials=10, n_workers=2, seed=1)
    states = [t.state for t in study.trials]
    assert len(states) == 10
    assert optuna.trial.TrialState.FAIL in states
    assert all(t.params["n_layers"] < 3 for t in study.trials if t.state.name == "FAIL")
    assert study.best_trials and all(t.params["n_layers"] >= 3 for t in study.best_trials)
