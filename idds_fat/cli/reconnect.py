"""``idds-fat results`` and ``idds-fat cancel``: attach to a workflow and act on its jobs.

Both reconnect with :meth:`Workflow.attach`, which makes this process the
workflow's caller: it collects the results that arrived meanwhile, watches the
jobs still running and starts those that never started. Leaving an attached
workflow behaves as leaving any workflow: it waits for its unfinished jobs,
or cancels them when the command fails or is interrupted (Ctrl-C).
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from typing import Any

import click

from idds_fat.cli.output import (
    echo_json,
    effective_work_dir,
    json_option,
    reports_errors,
    table,
    work_dir_option,
)
from idds_fat.errors import IddsFatError
from idds_fat.results import AsyncResult
from idds_fat.workflow import Workflow, catalog

# Longest result text in a table cell; --json carries the whole value.
_CELL = 60


def _attach(work_dir: Path, workflow_id: str) -> Workflow:
    attach = getattr(Workflow, "attach", None)
    if attach is None:
        raise IddsFatError("this version of idds-fat cannot reattach to a workflow")
    return attach(workflow_id, work_dir=work_dir)


def job_status(future: AsyncResult) -> str:
    """Return ``pending``, ``cancelled``, ``error`` or ``ok`` for a job's future."""
    if not future.done():
        return "pending"
    if future.cancelled():
        return "cancelled"
    return "error" if future.exception() is not None else "ok"


def _as_json(value: Any) -> Any:
    """Return ``value`` if it is JSON as it is, else ``None`` (``repr`` says what it was)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return value


def job_result(task_id: str, future: AsyncResult) -> dict[str, Any]:
    """Return a JSON-able record of one job: arguments, status, value or error."""
    status = job_status(future)
    record: dict[str, Any] = {
        "task": task_id,
        "job": future.job,
        "kwargs": json.loads(json.dumps(future.kwargs, default=repr)),
        "status": status,
        "value": None,
        "repr": None,
        "error": None,
    }
    if status == "ok":
        value = future.result()
        record["value"], record["repr"] = _as_json(value), repr(value)
    elif status == "error":
        exc = future.exception()
        record["error"] = {"type": type(exc).__name__, "message": str(exc)}
    return record


def _cell(record: dict[str, Any]) -> str:
    if record["error"] is not None:
        first = (record["error"]["message"].splitlines() or [""])[0]
        text = f"{record['error']['type']}: {first}"
    else:
        text = record["repr"] or ""
    return text if len(text) <= _CELL else text[: _CELL - 3] + "..."


def _kwargs_cell(kwargs: Any) -> str:
    if kwargs is None:
        return "-"
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) <= _CELL else text[: _CELL - 3] + "..."


@click.command()
@click.argument("workflow_id", metavar="WORKFLOW")
@click.option("--task", default=None, help="Only this task (its id, e.g. t0001, or unique name).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to wait for unfinished jobs; then they are cancelled.  [default: no limit]",
)
@json_option
@work_dir_option
@reports_errors
def results(
    workflow_id: str, task: str | None, timeout: float | None, as_json: bool, work_dir: Path | None
) -> None:
    """Reconnect to WORKFLOW and print every task's results, in input order.

    Waits for the jobs still running (up to --timeout; the ones unfinished then
    are cancelled, and the command exits 1).
    """
    root = effective_work_dir(work_dir)
    full_id = catalog.resolve_workflow_id(root, workflow_id)
    task_id = catalog.resolve_task_id(root, full_id, task) if task else None
    with _attach(root, full_id) as wf:
        tasks = wf.tasks
        names = wf.task_names
        chosen = [task_id] if task_id else list(tasks)
        futures = [f for t in chosen for f in tasks[t].futures]
        _, pending = concurrent.futures.wait(futures, timeout)
        records = [job_result(t, f) for t in chosen for f in tasks[t].futures]
        if as_json:
            echo_json(
                {
                    "workflow": wf.id,
                    "tasks": [
                        {
                            "id": t,
                            "name": names.get(t),
                            "results": [r for r in records if r["task"] == t],
                        }
                        for t in chosen
                    ],
                }
            )
        else:
            rows = [
                (
                    r["task"],
                    names.get(r["task"]),
                    r["job"],
                    _kwargs_cell(r["kwargs"]),
                    r["status"],
                    _cell(r),
                )
                for r in records
            ]
            click.echo(table(("TASK", "NAME", "JOB", "KWARGS", "STATUS", "RESULT"), rows))
        if pending:
            # Raised inside the workflow, so leaving it cancels these jobs.
            raise IddsFatError(
                f"{len(pending)} of {len(futures)} jobs of workflow {wf.id} unfinished "
                f"after {timeout:g} s; cancelled"
            )


@click.command()
@click.argument("workflow_id", metavar="WORKFLOW")
@click.argument("task", required=False)
@json_option
@work_dir_option
@reports_errors
def cancel(workflow_id: str, task: str | None, as_json: bool, work_dir: Path | None) -> None:
    """Cancel the unfinished jobs of WORKFLOW, or of its TASK only; print how many.

    TASK is a task id such as t0001 or a unique task name. Cancelling one task
    keeps the command attached until the workflow's other jobs have finished.
    """
    root = effective_work_dir(work_dir)
    full_id = catalog.resolve_workflow_id(root, workflow_id)
    task_id = catalog.resolve_task_id(root, full_id, task) if task else None
    with _attach(root, full_id) as wf:
        count = wf.cancel(task_id)
        scope = f"task {task_id} of workflow {wf.id}" if task_id else f"workflow {wf.id}"
        if as_json:
            echo_json({"workflow": wf.id, "task": task_id, "cancelled": count})
        else:
            click.echo(f"cancelled {count} {'job' if count == 1 else 'jobs'} of {scope}")
