"""The monitoring page's view of one workflow: its summary, task counts and values in one pass."""

from __future__ import annotations

import pytest

from idds_fat.workdir import WorkDirPaths
from idds_fat.workflow import catalog
from idds_fat.workflow.state import WorkflowState

WORKFLOW = "detail-20261130T000000-abcdef"

# task -> (jobs, {job: (status, value)}); the jobs not named stay queued.
ENDED = {
    "t0001": (5, {0: ("done", 2.5), 1: ("done", -1.0), 3: ("failed", None)}),
    "t0002": (1, {}),
    "t0003": (6, {0: ("lost", None), 2: ("done", None), 4: ("cancelled", None), 5: ("done", 7.0)}),
    "t0004": (3, {0: ("done", 0.5), 1: ("done", 0.25), 2: ("done", 1e300)}),
}


@pytest.fixture
def recorded(tmp_path):
    """A workflow of four tasks whose jobs are queued, done (with and without values),
    failed, lost and cancelled."""
    paths = WorkDirPaths(tmp_path).workflow(WORKFLOW)
    paths.root.mkdir(parents=True)
    state = WorkflowState(paths.state)
    state.record_workflow(WORKFLOW, "detail", {"backend": "local"})
    for task_id, (jobs, ended) in ENDED.items():
        state.record_task(
            task_id, f"name-{task_id}", "f", [(i, f"f[{i}]", "spec") for i in range(jobs)]
        )
        for job, (status, value) in ended.items():
            state.set_job_status(task_id, job, status, 0, value=value)
    state.close()
    return tmp_path


def _expected_counts(jobs: int, ended: dict[int, tuple[str, float | None]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in range(jobs):
        status = ended[job][0] if job in ended else "queued"
        counts[status] = counts.get(status, 0) + 1
    return counts


def test_each_task_counts_the_jobs_in_each_status(recorded):
    detail = catalog.workflow_detail(recorded, WORKFLOW[:10])
    assert [t.id for t in detail.tasks] == list(ENDED)
    for task in detail.tasks:
        assert task.job_states == _expected_counts(*ENDED[task.id]), task.id
        assert list(task.job_states) == sorted(task.job_states)  # as task_summaries orders them
    assert detail.tasks == catalog.task_summaries(recorded, WORKFLOW)


def test_the_workflow_counts_are_the_sums_of_its_tasks_counts(recorded):
    detail = catalog.workflow_detail(recorded, WORKFLOW)
    total: dict[str, int] = {}
    for jobs, ended in ENDED.values():
        for status, count in _expected_counts(jobs, ended).items():
            total[status] = total.get(status, 0) + count
    assert detail.summary.job_states == dict(sorted(total.items()))
    assert (detail.summary.tasks, detail.summary.jobs) == (4, 15)
    assert detail.summary == catalog.workflow_summary(recorded, WORKFLOW)


def test_each_task_with_values_has_their_count_least_and_greatest(recorded):
    detail = catalog.workflow_detail(recorded, WORKFLOW)
    assert detail.values == {
        "t0001": (2, -1.0, 2.5),
        "t0003": (1, 7.0, 7.0),
        "t0004": (3, 0.25, 1e300),
    }
    assert detail.values == catalog.task_values(recorded, WORKFLOW)


def test_an_unknown_workflow_is_named_in_the_error(recorded):
    with pytest.raises(catalog.WorkflowNotFound, match="nothing"):
        catalog.workflow_detail(recorded, "nothing")
