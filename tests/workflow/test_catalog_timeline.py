"""The monitoring page's timeline: the last jobs of a workflow, read without sorting them all."""

from __future__ import annotations

import pytest

from idds_fat.workdir import WorkDirPaths
from idds_fat.workflow import catalog
from idds_fat.workflow.state import WorkflowState

WORKFLOW = "timeline-20261130T000000-abcdef"


@pytest.fixture
def recorded(tmp_path):
    """A workflow of three tasks (4, 1 and 6 jobs) with some jobs ended."""
    paths = WorkDirPaths(tmp_path).workflow(WORKFLOW)
    paths.root.mkdir(parents=True)
    state = WorkflowState(paths.state)
    state.record_workflow(WORKFLOW, "timeline", {"backend": "local"})
    for task_id, jobs in (("t0001", 4), ("t0002", 1), ("t0003", 6)):
        state.record_task(
            task_id,
            "f",
            "f",
            [(i, f"f[{i}]", "spec") for i in range(jobs)],
            [f"x={i}" for i in range(jobs)],
        )
    state.set_job_status("t0001", 2, "done", 0, value=2.5)
    state.set_job_status("t0003", 5, "failed", 1, error="ValueError: no")
    state.close()
    return tmp_path


def _ids(timings):
    return [(t.task_id, t.index) for t in timings]


@pytest.mark.parametrize("limit", [0, 1, 5, 6, 7, 11, 50])
def test_the_last_jobs_are_the_tail_of_all_jobs_in_submission_order(recorded, limit):
    every = catalog.job_timings(recorded, WORKFLOW)
    assert _ids(every) == [("t0001", i) for i in range(4)] + [("t0002", 0)] + [
        ("t0003", i) for i in range(6)
    ]
    last = catalog.job_timings(recorded, WORKFLOW, limit=limit)
    assert last == (every[-limit:] if limit else [])


def test_the_last_jobs_carry_their_times_values_and_arguments(recorded):
    by_id = {(t.task_id, t.index): t for t in catalog.job_timings(recorded, WORKFLOW, limit=11)}
    done = by_id[("t0001", 2)]
    assert done.status == "done" and done.value == 2.5 and done.ended is not None
    assert done.arguments == "x=2" and done.queued is not None
    assert by_id[("t0003", 5)].status == "failed"
    assert by_id[("t0002", 0)].ended is None
