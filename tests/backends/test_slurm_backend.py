"""The slurm backend against a real single-node Slurm (slurmctld + slurmd on loopback)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idds_fat import JobLostError, Workflow, work, workflow
from idds_fat.backends import SlurmError
from idds_fat.testing import wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _settings(**extra):
    return {"backend": "slurm", "slurm_poll_min": 0.3, "slurm_poll_max": 1.0, **extra}


@work
def block_until(path, value=None, timeout=120):
    wait_until(lambda: os.path.exists(path), path, timeout)
    return value


def _slurm_ids(wf, futures):
    return [wf.parts.backend._where[f"{f.task_id}/{f.job}"] for f in futures]


def test_hpo_example_loop_runs_on_slurm(slurm_env):
    spec = importlib.util.spec_from_file_location("hpo_bayes_on_slurm", EXAMPLES / "hpo_bayes.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = workflow(source_dir=EXAMPLES, **_settings())(example.optimize)
    best = run(2, 10, 1)
    assert 0.5 < best["score"] <= 1.0
    assert set(best["params"]) == {"n_estimators", "max_depth", "learning_rate", "subsample"}


def test_relative_work_dir_runs_jobs_that_start_in_another_directory(
    slurm_env, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The jobs start in another directory than this one, as a site's --chdir does.
    settings = _settings(work_dir="wd", slurm_options=[f"--chdir={elsewhere}"])
    with Workflow(**settings) as wf:
        assert block_until.map([{"path": "/", "value": i} for i in range(2)]).results() == [0, 1]
    assert wf.work_dir.parent == tmp_path / "wd" / "workflows"


def test_array_with_a_failing_and_a_killed_element_keeps_the_others(slurm_env, tmp_path):
    @work(map_results=True)
    def element(i, gate):
        if i == 1:
            raise ValueError("element 1 fails on purpose")
        if i == 2:
            Path(gate, "started").touch()
            time.sleep(600)
        return i * 10

    with Workflow(**_settings()) as wf:
        results = element.map([{"i": i, "gate": str(tmp_path)} for i in range(5)])
        wait_until(lambda: (tmp_path / "started").exists(), what="element 2 to start")
        array, index = _slurm_ids(wf, [results.futures[2]])[0]
        subprocess.run(["scancel", f"{array}_{index}"], check=True)
        results.wait(timeout=120)
    assert [results[i] for i in (0, 3, 4)] == [0, 30, 40]
    with pytest.raises(ValueError, match="element 1 fails on purpose"):
        results[1]
    with pytest.raises(JobLostError, match="CANCELLED") as lost:
        results[2]
    assert "Slurm state CANCELLED" in str(lost.value)


def test_resources_show_up_in_scontrol(slurm_env, tmp_path):
    gate = tmp_path / "go"
    sized = work(cores=1, memory_mb=200, walltime=150)(block_until.fn)
    with Workflow(**_settings()) as wf:
        future = sized.submit(str(gate), "sized")
        wait_until(lambda: future.job is not None and wf.parts.backend._where, what="submission")
        array, index = _slurm_ids(wf, [future])[0]
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", f"{array}_{index}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        gate.touch()
        assert future.result(timeout=120) == "sized"
    assert "NumCPUs=1" in shown or "MinCPUsNode=1" in shown
    assert "MinMemoryNode=200M" in shown
    assert "TimeLimit=00:03:00" in shown
    assert "JobName=idds-fat-t0001" in shown


def test_cancelling_a_task_scancels_every_element(slurm_env, tmp_path):
    with Workflow(**_settings()) as wf:
        results = block_until.map([{"path": str(tmp_path / "never")} for _ in range(3)])
        wait_until(lambda: len(wf.parts.backend._live) == 3, what="submission")
        ids = _slurm_ids(wf, results.futures)
        assert results.kill() == 3

        def gone():
            listing = subprocess.run(
                ["squeue", "-h", "-r", "-o", "%i", "-j", ids[0][0]],
                capture_output=True,
                text=True,
            ).stdout.split()
            return not set(listing) & {f"{a}_{i}" for a, i in ids}

        wait_until(gone, what="scancel to take effect")
    assert all(f.cancelled() for f in results.futures)


def test_sbatch_refusal_is_a_clear_error_at_the_call(slurm_env):
    with Workflow(**_settings(slurm_partition="nosuchpartition")):
        with pytest.raises(SlurmError, match="sbatch failed: .*[Pp]artition"):
            block_until("/nonexistent", timeout=1)


def test_jobs_per_worker_packs_jobs_into_array_elements(slurm_env):
    @work(jobs_per_worker=3)
    def packed(i):
        if i == 4:
            raise ValueError("job 4 fails on purpose")
        print(f"job {i} says hello")
        return i, os.getpid()

    with Workflow(**_settings()) as wf:
        results = packed.map([{"i": i} for i in range(7)])
        results.wait(timeout=120)
        elements = _slurm_ids(wf, results.futures)
        job_dirs = [wf.tracker.request(f"{f.task_id}/{f.job}").workdir for f in results.futures]
    assert [index for _, index in elements] == [0, 0, 0, 1, 1, 1, 2]
    assert len({array for array, _ in elements}) == 1  # one sbatch for the task
    values = {i: results[i] for i in (0, 1, 2, 3, 5, 6)}
    assert [v[0] for v in values.values()] == [0, 1, 2, 3, 5, 6]
    # One interpreter per element: the jobs of a pack share a pid, packs do not.
    pids = [values[0][1], values[3][1], values[6][1]]
    assert values[1][1] == values[2][1] == pids[0] and values[5][1] == pids[1]
    assert len(set(pids)) == 3
    with pytest.raises(ValueError, match="job 4 fails on purpose"):
        results[4]  # a failing job does not stop the rest of its pack (job 5 ran)
    for i, job_dir in enumerate(job_dirs):
        assert (job_dir / "exit_status").read_text() == "0\n"
        if i != 4:
            assert (job_dir / "stdout.txt").read_text() == f"job {i} says hello\n"


def test_packed_jobs_in_a_venv_run_in_it_on_slurm(slurm_env, tmp_path):
    from idds_fat import Venv
    from idds_fat.testing import environments as build

    wheels = build.make_wheelhouse(tmp_path / "wheels")
    venv = Venv(["fatprobe"], pip_options=build.offline_pip_options(wheels))

    @work(environment=venv, jobs_per_worker=2)
    def probe(i):
        import sys

        import fatprobe  # only the job's venv has it

        return i, fatprobe.VALUE, sys.executable

    env_cache = tmp_path / "envs"
    with Workflow(env_cache_dir=env_cache, **_settings()):
        results = probe.map([{"i": i} for i in range(3)]).results(timeout=120)
    assert [i for i, _, _ in results] == [0, 1, 2]
    assert {value for _, value, _ in results} == {"only in the job's environment"}
    assert {python for _, _, python in results} != {sys.executable}
    assert all(python.startswith(str(env_cache)) for _, _, python in results)
    builds = (env_cache / "builds.log").read_text().splitlines()
    assert len(builds) == 1  # two elements, three jobs, one venv built
