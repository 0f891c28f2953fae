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
from idds_fat.workdir import WorkDirPaths
from idds_fat.workflow import Workflow, catalog
from idds_fat.workflow.driver import Driver

# Job states of the record that mean "not finished yet".
_UNFINISHED = ("queued", "running")
# Seconds to let an attached workflow collect the results of its finished jobs.
_SETTLE_SECONDS = 30.0
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
    if not kwargs:
        return "-"
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) <= _CELL else text[: _CELL - 3] + "..."


def _finished_jobs(root: Path, workflow_id: str, tasks: list[str]) -> tuple[set, int]:
    """Return the (task, index) of the jobs the record says finished, and all jobs' count."""
    jobs = [j for t in tasks for j in catalog.job_summaries(root, workflow_id, t)]
    return {(j.task_id, j.index) for j in jobs if j.status not in _UNFINISHED}, len(jobs)


def _settle(wf: Workflow, finished: set, timeout: float | None = None) -> None:
    # An attached workflow completes the futures of its finished jobs from the
    # result store a moment after attach returns; acting before would miss them.
    # Never longer than the command's --timeout: that one must hold.
    settling = [f for t, m in wf.tasks.items() for f in m.futures if (t, f.job) in finished]
    limit = _SETTLE_SECONDS if timeout is None else min(timeout, _SETTLE_SECONDS)
    concurrent.futures.wait(settling, limit)


def _echo_results(workflow_id: str, records: list[dict], names: dict, as_json: bool) -> None:
    if as_json:
        tasks = list(dict.fromkeys(r["task"] for r in records))
        echo_json(
            {
                "workflow": workflow_id,
                "tasks": [
                    {
                        "id": t,
                        "name": names.get(t),
                        "results": [r for r in records if r["task"] == t],
                    }
                    for t in tasks
                ],
            }
        )
        return
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


@click.command()
@click.argument("workflow_id", metavar="WORKFLOW")
@click.option("--task", default=None, help="Only this task (its id, e.g. t0001, or unique name).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to wait for unfinished jobs (then left running).  [default: no limit]",
)
@json_option
@work_dir_option
@reports_errors
def results(
    workflow_id: str, task: str | None, timeout: float | None, as_json: bool, work_dir: Path | None
) -> None:
    """Reconnect to WORKFLOW and print every task's results, in input order.

    Waits for the jobs still running, up to --timeout: those unfinished then
    are shown as pending and left running, and the command exits 1. For a
    workflow whose body runs as a driver (``wf.submit()``), prints the body's
    return value once it ends (exit 1 if it raised or its driver was lost).
    """
    root = effective_work_dir(work_dir)
    full_id = catalog.resolve_workflow_id(root, workflow_id)
    driver = Driver.of(WorkDirPaths(root).workflow(full_id).root)
    if driver is not None and task is None:
        _driver_result(full_id, driver, timeout, as_json)
        return
    task_id = catalog.resolve_task_id(root, full_id, task) if task else None
    chosen = [task_id] if task_id else [t.id for t in catalog.task_summaries(root, full_id)]
    finished, _ = _finished_jobs(root, full_id, chosen)
    with _attach(root, full_id) as wf:
        _settle(wf, finished, timeout)
        tasks = wf.tasks
        futures = [f for t in chosen for f in tasks[t].futures]
        _, pending = concurrent.futures.wait(futures, timeout)
        records = [job_result(t, f) for t in chosen for f in tasks[t].futures]
        _echo_results(wf.id, records, wf.task_names, as_json)
        if not all(f.done() for m in tasks.values() for f in m.futures):
            wf.detach()  # other tasks' jobs run on; a later `results` collects them
        if pending:
            raise IddsFatError(
                f"{len(pending)} of {len(futures)} jobs of workflow {wf.id} unfinished "
                f"after {timeout:g} s; still running"
            )


def _driver_result(workflow_id: str, driver: Driver, timeout: float | None, as_json: bool) -> None:
    """Print the value the driver's body returned (waiting up to ``timeout``); raise
    IddsFatError, with the body's error, if it raised or the driver was lost."""
    try:
        value = driver.result(timeout)
    except TimeoutError as exc:
        raise IddsFatError(str(exc)) from None
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
        if as_json:
            echo_json({"workflow": workflow_id, "driver": driver.status, "error": error})
        raise IddsFatError(
            f"the body of workflow {workflow_id} failed: {error['type']}: {exc}"
        ) from None
    if as_json:
        echo_json(
            {
                "workflow": workflow_id,
                "driver": "finished",
                "value": _as_json(value),
                "repr": repr(value),
            }
        )
    else:
        click.echo(f"workflow {workflow_id}: its body returned\n{value!r}")


@click.command()
@click.argument("workflow_id", metavar="WORKFLOW")
@click.argument("task", required=False)
@json_option
@work_dir_option
@reports_errors
def cancel(workflow_id: str, task: str | None, as_json: bool, work_dir: Path | None) -> None:
    """Cancel the unfinished jobs of WORKFLOW, or of its TASK only; print how many.

    TASK is a task id such as t0001 or a unique task name. The other tasks'
    jobs run on.
    """
    root = effective_work_dir(work_dir)
    full_id = catalog.resolve_workflow_id(root, workflow_id)
    task_id = catalog.resolve_task_id(root, full_id, task) if task else None
    chosen = [task_id] if task_id else [t.id for t in catalog.task_summaries(root, full_id)]
    finished, total = _finished_jobs(root, full_id, chosen)
    count = 0
    if len(finished) < total:  # attaching to a finished workflow would be for nothing
        with _attach(root, full_id) as wf:
            _settle(wf, finished)
            count = wf.cancel(task_id)
            if task_id is None:
                wf.close(cancel=True)  # records the workflow as cancelled, not finished
            else:
                wf.detach()  # the other tasks' jobs run on; nothing to wait for here
    scope = f"task {task_id} of workflow {full_id}" if task_id else f"workflow {full_id}"
    if as_json:
        echo_json({"workflow": full_id, "task": task_id, "cancelled": count})
    else:
        click.echo(f"cancelled {count} {'job' if count == 1 else 'jobs'} of {scope}")
