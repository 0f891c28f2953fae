"""Packed array elements (``jobs_per_worker``) that use their cores, on a real Slurm (2 CPUs)."""

from __future__ import annotations

import os
from pathlib import Path

from idds_fat import Workflow, work
from idds_fat.backends.base import Resources
from idds_fat.backends.slurm import ELEMENTS_PER_TASK, default_jobs_per_worker
from idds_fat.testing import wait_until


@work(jobs_per_worker=4, cores=2)
def two_at_once(i, gate_dir, timeout=120):
    """Leave a mark, wait until a second job of the element has left one (so two run at
    once), then say where this job ran."""
    gate = Path(gate_dir)
    element = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    (gate / f"run-{i}").write_text(element)
    wait_until(
        lambda: len(list(gate.glob("run-*"))) >= min(2 * (i // 2 + 1), 4), "a sibling", timeout
    )
    return i, element, os.getpid()


def test_a_packed_element_runs_one_job_per_core_at_once(slurm_env, tmp_path):
    settings = {"backend": "slurm", "slurm_poll_min": 0.3, "slurm_poll_max": 1.0}
    with Workflow(**settings) as wf:
        futures = two_at_once.map([{"i": i, "gate_dir": str(tmp_path)} for i in range(4)])
        results = futures.results(timeout=180)
        job_dirs = [wf.tracker.request(f"{f.task_id}/{f.job}").workdir for f in futures.futures]
    assert [r[0] for r in results] == [0, 1, 2, 3]
    # One element (4 jobs, K=4) of 2 cores: its jobs waited for each other in pairs, so
    # two ran at once, in two warm workers that each ran two jobs.
    assert len({r[1] for r in results}) == 1
    assert len({r[2] for r in results}) == 2
    # The element writes each job's status, and removes its slots' dirs, after the results.
    statuses = [job_dir / "exit_status" for job_dir in job_dirs]
    wait_until(lambda: all(s.exists() and s.read_text() for s in statuses), "the statuses", 60)
    assert [s.read_text() for s in statuses] == ["0\n"] * 4
    wait_until(lambda: not list(job_dirs[0].glob("pack-slot-*")), "the slots' dirs to go", 60)


def test_the_default_packs_only_large_tasks_in_rounds_of_the_cores():
    assert default_jobs_per_worker(ELEMENTS_PER_TASK, Resources()) == 1  # one job an element
    assert default_jobs_per_worker(ELEMENTS_PER_TASK + 1, Resources()) == 2
    assert default_jobs_per_worker(1000, Resources(cores=1)) == 10
    assert default_jobs_per_worker(1000, Resources(cores=4)) == 12  # rounds of 4 cores
    assert default_jobs_per_worker(250, Resources(cores=2)) == 4
    # What packing would turn into the element's, a large task keeps per job.
    for declared in ({"walltime": 60.0}, {"memory_mb": 512}, {"gpus": 1}):
        assert default_jobs_per_worker(1000, Resources(**declared)) == 1
