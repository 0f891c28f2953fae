"""``idds-fat status`` and ``idds-fat logs``: read the workflows' records, change nothing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from idds_fat.cli.output import (
    echo_json,
    effective_work_dir,
    json_option,
    local_time,
    ordered_states,
    reports_errors,
    state_counts,
    table,
    work_dir_option,
)
from idds_fat.workdir import WorkDirPaths, WorkflowPaths, read_tail
from idds_fat.workflow import catalog

if TYPE_CHECKING:
    from idds_fat.workflow.driver import Driver


@click.command()
@click.argument("workflow_id", metavar="[WORKFLOW]", required=False)
@click.argument("task", metavar="[TASK]", required=False)
@json_option
@work_dir_option
@reports_errors
def status(workflow_id: str | None, task: str | None, as_json: bool, work_dir: Path | None) -> None:
    """Show the workflows, one workflow's tasks, or one task's jobs.

    Without WORKFLOW: every workflow in the work dir, newest first. With WORKFLOW
    (its id or a unique prefix): its tasks and their jobs by state. With TASK too
    (a task id such as t0001, or a unique task name): that task's jobs.
    """
    root = effective_work_dir(work_dir)
    if workflow_id is None:
        _show_workflows(root, as_json)
    elif task is None:
        _show_tasks(root, workflow_id, as_json)
    else:
        _show_jobs(root, workflow_id, task, as_json)


def _show_workflows(root: Path, as_json: bool) -> None:
    workflows = catalog.list_workflows(root)
    if as_json:
        echo_json({"work_dir": str(root), "workflows": [w.to_dict() for w in workflows]})
        return
    if not workflows:
        click.echo(f"no workflows in {WorkDirPaths(root).workflows}")
        return
    rows = [
        (w.id, w.name, w.status, local_time(w.created), w.tasks, w.jobs, state_counts(w.job_states))
        for w in workflows
    ]
    click.echo(table(("ID", "NAME", "STATUS", "CREATED", "TASKS", "JOBS", "JOB STATES"), rows))


def _driver_of(path: Path) -> Driver | None:
    # The driver's module brings the serializer and the result decoding (the result
    # collector, requests): imported only for a workflow that has a driver.
    if not WorkflowPaths(path).driver.body.is_file():
        return None
    from idds_fat.workflow.driver import Driver

    return Driver.of(path)


def _workflow_header(summary: catalog.WorkflowSummary) -> str:
    states = state_counts(summary.job_states)
    tasks = "task" if summary.tasks == 1 else "tasks"
    driver = _driver_of(summary.path)
    return "\n".join(
        [
            f"workflow  {summary.id} ({summary.name})",
            f"status    {summary.status}, backend {summary.backend or '-'}",
            *([f"driver    {driver.describe()}"] if driver is not None else []),
            f"created   {local_time(summary.created)}, updated {local_time(summary.updated)}",
            f"jobs      {summary.jobs} in {summary.tasks} {tasks}: {states}",
            f"path      {summary.path}",
        ]
    )


def _show_tasks(root: Path, workflow_id: str, as_json: bool) -> None:
    summary = catalog.workflow_summary(root, workflow_id)
    tasks = catalog.task_summaries(root, summary.id)
    if as_json:
        described = summary.to_dict()
        if (driver := _driver_of(summary.path)) is not None:
            described["driver"] = {"status": driver.status, **driver.where}
        echo_json({"workflow": described, "tasks": [t.to_dict() for t in tasks]})
        return
    click.echo(_workflow_header(summary))
    if not tasks:
        click.echo("\nno tasks")
        return
    states = ordered_states(s for t in tasks for s in t.job_states)
    headers = ("TASK", "NAME", "FUNCTION", "JOBS", *(s.upper() for s in states))
    rows = [
        (t.id, t.name, t.function, t.jobs, *(t.job_states.get(s, 0) for s in states)) for t in tasks
    ]
    click.echo("\n" + table(headers, rows))


def _show_jobs(root: Path, workflow_id: str, task: str, as_json: bool) -> None:
    summary = catalog.workflow_summary(root, workflow_id)
    jobs = catalog.job_summaries(root, summary.id, task)
    if as_json:
        task_id = jobs[0].task_id if jobs else catalog.resolve_task_id(root, summary.id, task)
        (chosen,) = [t for t in catalog.task_summaries(root, summary.id) if t.id == task_id]
        echo_json(
            {
                "workflow": summary.to_dict(),
                "task": chosen.to_dict(),
                "jobs": [j.to_dict() for j in jobs],
            }
        )
        return
    click.echo(_workflow_header(summary))
    rows = [
        (j.task_id, j.index, j.name, j.status, j.returncode, local_time(j.updated)) for j in jobs
    ]
    click.echo("\n" + table(("TASK", "JOB", "NAME", "STATUS", "EXIT", "UPDATED"), rows))


@click.command()
@click.argument("workflow_id", metavar="WORKFLOW")
@click.argument("task")
@click.argument("job", type=click.IntRange(min=0))
@click.option(
    "--stderr/--stdout",
    "stderr",
    default=False,
    help="Which stream to print.  [default: --stdout]",
)
@click.option(
    "--tail", type=click.IntRange(min=0), default=None, help="Print only the last N lines."
)
@json_option
@work_dir_option
@reports_errors
def logs(
    workflow_id: str,
    task: str,
    job: int,
    stderr: bool,
    tail: int | None,
    as_json: bool,
    work_dir: Path | None,
) -> None:
    """Print what job JOB (its index) of TASK printed, from its log file.

    TASK is a task id such as t0001 or a unique task name. For a job that was
    run again, the log of its last attempt is printed. With --stderr, a job that
    raised ends with the traceback of its exception, as its caller recorded it
    (the job hands its exception back as its result instead of printing it).
    A job running in a warm worker is read from that worker's spool
    (docs/backends/local.md); a job that ended without printing anything has no
    log file and prints nothing.
    """
    found = catalog.job_log_paths(effective_work_dir(work_dir), workflow_id, task, job)
    path = found.stderr if stderr else found.stdout
    stream = "stderr" if stderr else "stdout"
    # Read from the end: memory grows with the lines asked for, not with the log.
    text = read_tail(path, tail, max_bytes=None)
    if text is None and found.status in _ENDED and not path.exists():
        text = ""  # a warm worker makes a job's output files only when it printed
    raised = found.error if stderr and found.status == "failed" and found.error else None
    if text is None and raised is None:
        why = "cannot be read" if path.exists() else "does not exist"
        raise click.ClickException(
            f"no {stream} for job {found.task_id}/{found.index} ({found.name}, "
            f"{found.status}) of workflow {found.workflow_id}: {path} {why}"
        )
    text = text or ""
    if raised is not None and raised not in text:
        text += _raised_section(found, raised)
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:] if tail else [])
    if as_json:
        echo_json({**found.to_dict(), "stream": stream, "path": str(path), "text": text})
    else:
        click.echo(text, nl=False)


#: The statuses of a job that ran and will not run again.
_ENDED = frozenset({"done", "failed", "cancelled", "lost"})


def _raised_section(found: catalog.JobSummary, error: str) -> str:
    heading = f"--- job {found.task_id}/{found.index} raised (recorded by its caller) ---\n"
    return heading + error.rstrip("\n") + "\n"
