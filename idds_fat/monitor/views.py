"""What the monitoring API answers: JSON-able views of the workflows under a work dir.

The shapes extend those of ``idds-fat status --json``: a workflow is
:meth:`WorkflowSummary.to_dict`, a task :meth:`TaskSummary.to_dict`, a job
:meth:`JobSummary.to_dict`, so a script written against one reads the other.
"""

from __future__ import annotations

import pwd
import time
from pathlib import Path
from typing import Any

from idds_fat.workdir import read_tail
from idds_fat.workflow import catalog

# Jobs drawn on a workflow's timeline: the last ones submitted. A browser draws a
# few hundred bars at once without effort; ten thousand would stall each refresh.
TIMELINE_LIMIT = 500
# Lines of a job's stderr shown on the page, and the bytes read to find them.
STDERR_TAIL_LINES = 40
_STDERR_TAIL_BYTES = 32768


def workflows_view(work_dir: Path) -> dict[str, Any]:
    """Return every workflow under ``work_dir``, newest first, as ``status --json`` does.

    Each workflow also names its ``user``: the owner of its directory.
    """
    return {
        "work_dir": str(work_dir),
        "workflows": [_with_user(w) for w in catalog.list_workflows(work_dir)],
    }


def _with_user(summary: catalog.WorkflowSummary) -> dict[str, Any]:
    try:
        uid = summary.path.stat().st_uid
    except OSError:
        return {**summary.to_dict(), "user": None}
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no name here (a container, a shared file system)
        user = str(uid)
    return {**summary.to_dict(), "user": user}


def workflow_view(work_dir: Path, workflow_id: str) -> dict[str, Any]:
    """Return one workflow: its summary, its tasks with their values, and a job timeline.

    ``workflow`` and ``tasks`` are what ``idds-fat status WORKFLOW --json`` prints;
    each task also has ``values`` (``count``, ``min``, ``max`` of the real
    numbers its jobs returned, or ``None``). ``timeline`` holds the
    :data:`TIMELINE_LIMIT` jobs submitted last (``jobs``, times in seconds since
    the epoch, each with its ``arguments`` and ``value`` for the table of trials),
    how many there are in all (``total``) and where it ends (``end``): the
    workflow's end once it ended (or its caller went away), else ``now``, the
    service's clock, which running jobs' bars reach.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        IddsFatError: its record cannot be read.
    """
    detail = catalog.workflow_detail(work_dir, workflow_id)
    summary, tasks, values = detail.summary, detail.tasks, detail.values
    timings = catalog.job_timings(work_dir, summary.id, limit=TIMELINE_LIMIT)
    now = time.time()
    return {
        "workflow": _with_user(summary),
        "tasks": [{**t.to_dict(), "values": _values(values.get(t.id))} for t in tasks],
        "timeline": {
            "jobs": [j.to_dict() for j in timings],
            "total": summary.jobs,
            "end": summary.ended if summary.ended is not None else now,
        },
        "now": now,
    }


def _values(found: tuple[int, float, float] | None) -> dict[str, Any] | None:
    if found is None:
        return None
    count, low, high = found
    return {"count": count, "min": low, "max": high}


def job_view(work_dir: Path, workflow_id: str, task: str, job: int) -> dict[str, Any]:
    """Return one job as ``status WORKFLOW TASK --json`` lists it, plus its stderr's last lines.

    ``stderr_tail`` is ``None`` when the job wrote no stderr file (yet); ``error``
    carries what the job raised, with its remote traceback, once the caller got it.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        TaskNotFound: the workflow has no such task, or the task no such job.
    """
    found = catalog.job_log_paths(work_dir, workflow_id, task, job)
    tail = read_tail(found.stderr, STDERR_TAIL_LINES, _STDERR_TAIL_BYTES)
    return {**found.to_dict(), "stderr_tail": tail}
