"""Steering from the monitoring page: cancel a task's jobs, or a whole workflow's."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idds_fat.workflow import catalog
from idds_fat.workflow.current import open_workflow

if TYPE_CHECKING:
    from idds_fat.workflow.runtime import Workflow

#: Reconnects to a workflow as :meth:`Workflow.attach` does: ``attach(id, work_dir=...)``.
#: Given by whoever mounts the page, so the monitor does not import the workflow runtime
#: (which starts the service that mounts the page).
Attach = Callable[..., "Workflow"]

# Job states of the record that mean "not finished yet".
_UNFINISHED = ("queued", "running")
# Seconds to let an attached workflow collect the results of its finished jobs.
_SETTLE_SECONDS = 30.0


def cancel_jobs(
    work_dir: Path, workflow_id: str, task: str | None, attach: Attach
) -> dict[str, Any]:
    """Cancel the unfinished jobs of a workflow, or of one of its tasks; say how many.

    A workflow open in this process (the embedded service runs in its caller) is
    cancelled directly: its caller's futures end as cancelled and its other
    tasks run on. Any other workflow is attached to with ``attach``, as
    ``idds-fat cancel`` does.
    Returns ``{"workflow": id, "task": id or None, "cancelled": n}``, the shape
    of ``idds-fat cancel --json``.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        TaskNotFound: the workflow has no such task.
        IddsFatError: another live process follows the workflow, or it cannot be
            attached to.
    """
    work_dir = Path(work_dir)
    full_id = catalog.resolve_workflow_id(work_dir, workflow_id)
    task_id = catalog.resolve_task_id(work_dir, full_id, task) if task else None
    live = open_workflow(full_id)
    if live is not None:
        count = live.cancel(task_id)
    else:
        count = _cancel_attached(work_dir, full_id, task_id, attach)
    return {"workflow": full_id, "task": task_id, "cancelled": count}


def _cancel_attached(work_dir: Path, full_id: str, task_id: str | None, attach: Attach) -> int:
    chosen = [task_id] if task_id else [t.id for t in catalog.task_summaries(work_dir, full_id)]
    jobs = [j for t in chosen for j in catalog.job_summaries(work_dir, full_id, t)]
    finished = {(j.task_id, j.index) for j in jobs if j.status not in _UNFINISHED}
    if len(finished) == len(jobs):
        return 0  # attaching to a finished workflow would be for nothing
    with attach(full_id, work_dir=work_dir) as wf:
        # The attached workflow completes its finished jobs' futures from the result
        # store a moment after attach returns; cancelling before would count them.
        settling = [f for t, m in wf.tasks.items() for f in m.futures if (t, f.job) in finished]
        concurrent.futures.wait(settling, _SETTLE_SECONDS)
        count = wf.cancel(task_id)
        if task_id is None:
            wf.close(cancel=True)  # records the workflow as cancelled
        else:
            wf.detach()  # the other tasks' jobs run on
    return count
