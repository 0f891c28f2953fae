"""The slurm backend's pilot mode against a real single-node Slurm (2 CPUs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from idds_fat import Workflow, work
from idds_fat.backends.pilot import SlurmPilotBackend
from idds_fat.errors import JobLostError
from idds_fat.testing import wait_until


def _settings(**extra):
    return {
        "backend": "slurm",
        "slurm_mode": "pilot",
        "slurm_poll_min": 0.3,
        "slurm_poll_max": 1.0,
        **extra,
    }


def _squeue(job_ids):
    if not job_ids:
        return ""
    done = subprocess.run(
        ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True
    )
    return done.stdout


@work
def where(i):
    return i, os.environ.get("SLURM_JOB_ID"), os.getpid()


@work
def marked(i, gate_dir, wait_for_runs=0, timeout=120):
    """Leave a mark ``run-I-PILOT``, wait until ``wait_for_runs`` marks or a ``go`` file
    exist, then return what this job saw."""
    gate = Path(gate_dir)
    (gate / f"run-{i}-{os.environ.get('SLURM_JOB_ID')}").touch()
    wait_until(
        lambda: (gate / "go").exists() or len(list(gate.glob("run-*"))) >= wait_for_runs > 0,
        "the gate",
        timeout,
    )
    return i, os.environ.get("SLURM_JOB_ID"), os.environ.get("CUDA_VISIBLE_DEVICES")


def _runs(gate: Path) -> list[tuple[int, str]]:
    """The ``(job index, pilot)`` of each mark left so far."""
    found = []
    for path in gate.glob("run-*"):
        _, index, pilot = path.name.split("-", 2)
        found.append((int(index), pilot))
    return found


def test_map_runs_through_warm_pilots(slurm_env):
    with Workflow(**_settings(slurm_pilots=1, slurm_max_pilots=2)) as wf:
        assert isinstance(wf.parts.backend, SlurmPilotBackend)
        results = where.map([{"i": i} for i in range(30)]).results()
        started = wf.parts.backend.pilots_started()
    assert [r[0] for r in results] == list(range(30))
    assert all(r[1] for r in results)  # each ran inside a Slurm job
    # Warm: 30 jobs ran in the few worker processes the pilots had, not 30 interpreters.
    assert len({r[2] for r in results}) <= started
    assert wf.stats["received"] == 30
    # No broker: every result came in its job's report, none through the REST store.
    assert wf.stats["local"] == 30 and wf.stats["rest"] == 0


@work
def dies_at(i, fatal):
    import sys

    if i == fatal:
        print(f"job {i} ends its worker", file=sys.stderr, flush=True)
        os._exit(17)
    print(f"job {i} ran")
    return i


def test_a_job_that_kills_its_worker_is_lost_with_its_stderr_and_the_jobs_behind_it_run(
    slurm_env,
):
    # Trivial jobs: a slot sends its worker several at once, so the worker dies with
    # jobs queued behind the fatal one; those must run in the slot's next worker.
    with Workflow(**_settings(slurm_pilots=1, slurm_max_pilots=1, max_resubmits=0)):
        warm = dies_at.map([{"i": i, "fatal": -1} for i in range(40)]).results()
        futures = dies_at.map([{"i": i, "fatal": 25} for i in range(60)]).futures
        lost = futures[25].exception(timeout=120)
        values = [f.result(timeout=120) for k, f in enumerate(futures) if k != 25]
    assert warm == list(range(40))
    assert values == [i for i in range(60) if i != 25]  # none lost behind the fatal job
    assert isinstance(lost, JobLostError)
    assert "exit status 17" in str(lost) and "job 25 ends its worker" in lost.stderr_tail


def test_pilots_run_jobs_from_their_leases_before_the_specs_are_stored(slurm_env):
    ended_first: list[bool] = []
    with Workflow(**_settings(slurm_pilots=1, slurm_max_pilots=1)) as wf:
        cache = wf.parts.cache
        assert cache is not None
        put_many = cache.put_many

        def stored_late(items):
            # The first batch of specs waits for a job to end: a pilot that read its
            # spec from the cache could not run one before this returns.
            if not ended_first:
                futures = wf.tracker.futures()
                wait_until(lambda: any(f.done() for f in futures), "a job to end", 120)
                ended_first.append(True)
            return put_many(items)

        cache.put_many = stored_late  # type: ignore[method-assign]
        results = where.map([{"i": i} for i in range(12)]).results()
        assert all(cache.exists(r.spec_key) for r in wf.tracker.requests())
    assert [r[0] for r in results] == list(range(12))
    assert ended_first == [True]


def test_killed_pilot_loses_and_doubles_no_result(slurm_env, tmp_path):
    with Workflow(**_settings(slurm_pilots=2, slurm_max_pilots=2)) as wf:
        futures = marked.map([{"i": i, "gate_dir": str(tmp_path)} for i in range(8)])
        wait_until(lambda: len({p for _, p in _runs(tmp_path)}) == 2, "both pilots running")
        victim = _runs(tmp_path)[0][1]
        running = {i for i, p in _runs(tmp_path) if p == victim}
        subprocess.run(["scancel", victim], check=True)
        wait_until(lambda: victim not in _squeue([victim]), "the pilot to leave Slurm")
        (tmp_path / "go").touch()
        results = futures.results(timeout=300)
    assert [r[0] for r in results] == list(range(8))
    # What the killed pilot was running ran again in another pilot.
    for i in running:
        assert any(p != victim for j, p in _runs(tmp_path) if j == i)
    assert all(r[1] != victim for r in results if r[0] in running)
    assert wf.stats["received"] == 8  # one result per job: none lost, none doubled


def test_idle_pilot_leaves_while_the_workflow_is_open(slurm_env):
    with Workflow(**_settings(slurm_pilots=1, slurm_max_pilots=1, slurm_pilot_idle=2)) as wf:
        backend = wf.parts.backend
        assert where(1)[0] == 1
        pilot = backend.pilots_started() and _squeue(backend.pilots()).split()
        assert pilot  # still there right after its job
        wait_until(lambda: backend.pilots() == [], "the idle pilot to leave", 60)
        assert _squeue(pilot) == ""
        # A job that comes later gets a new pilot.
        assert where(2)[0] == 2
        assert backend.pilots_started() == 2


def test_pilots_are_added_while_jobs_wait(slurm_env, tmp_path):
    with Workflow(**_settings(slurm_pilots=1, slurm_max_pilots=2)) as wf:
        backend = wf.parts.backend
        futures = marked.map([{"i": i, "gate_dir": str(tmp_path)} for i in range(6)])
        # One pilot of one core runs one job; the five waiting bring a second pilot.
        wait_until(lambda: len({p for _, p in _runs(tmp_path)}) == 2, "a second pilot at work")
        assert backend.pilots_started() == 2  # up to the limit, not one per job
        (tmp_path / "go").touch()
        results = futures.results(timeout=120)
    assert len({r[1] for r in results}) == 2
    assert _squeue(backend.pilots()) == ""  # closing the workflow ended them


def test_pilot_splits_its_gpus_among_its_slots(slurm_env, tmp_path, monkeypatch):
    # sbatch passes the caller's environment on: the pilot sees this fake device list.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    settings = _settings(slurm_pilots=1, slurm_max_pilots=1, slurm_pilot_cores=2)
    with Workflow(**settings):
        # Each job waits until two have started: both slots run at once.
        calls = [{"i": i, "gate_dir": str(tmp_path), "wait_for_runs": 2} for i in range(2)]
        results = marked.map(calls).results(timeout=120)
    assert sorted(r[2] for r in results) == ["0,1", "2,3"]
    assert len({r[1] for r in results}) == 1  # one pilot, two slots
