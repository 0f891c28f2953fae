"""Read-only views of the workflows recorded under a work dir, for the command line.

Every workflow keeps its record in ``WORK_DIR/workflows/ID/state.sqlite3`` (the
layout is :mod:`idds_fat.workdir`'s, the schema :mod:`idds_fat.workflow.state`'s).
This module opens those databases read-only, so it can look at a workflow that
another process is still running, and never changes them. A workflow may be
named by its full id or a unique prefix of it (:func:`resolve_workflow_id`,
which ``Workflow.attach`` uses too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idds_fat.errors import IddsFatError
from idds_fat.workdir import STATE_FILE as STATE_FILE  # where a test finds it
from idds_fat.workdir import JobPaths, WorkDirPaths
from idds_fat.workflow.state import (
    FINAL_WORKFLOW,
    LATER_JOB_COLUMNS,
    caller_gone,
    job_columns,
)

#: The status a reader shows for a workflow recorded as running whose caller (the
#: process that ran or last attached to it) has ended without closing it.
CALLER_GONE = "caller gone"

# Seconds a reader waits for a writer's lock before giving up.
_BUSY_TIMEOUT = 5.0


class WorkflowNotFound(IddsFatError, LookupError):
    """No workflow (or no single workflow) matches an id under the work dir searched.

    ``workflow_id`` is what was asked for, ``work_dir`` where it was looked for,
    and ``candidates`` the ids it is a prefix of when it is ambiguous.
    """

    def __init__(self, workflow_id: str, work_dir: Path, candidates: tuple[str, ...] = ()) -> None:
        where = WorkDirPaths(work_dir).workflows
        if candidates:
            shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
            message = (
                f"workflow id {workflow_id!r} is ambiguous in {where}: "
                f"{len(candidates)} workflows start with it ({shown})"
            )
        else:
            message = f"no workflow {workflow_id!r} in {where}"
        super().__init__(message)
        self.workflow_id = workflow_id
        self.work_dir = work_dir
        self.candidates = candidates


class TaskNotFound(IddsFatError, LookupError):
    """A workflow has no such task, or no such job in a task; the message lists what it has."""


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="seconds")


@dataclass(frozen=True)
class WorkflowSummary:
    """One workflow as its state database records it.

    Attributes:
        id, name, status: the workflow's id, readable name and last recorded status
            (``running``, ``finished``, ``failed``, ``cancelled``; ``unreadable``
            when its database could not be read; ``caller gone`` (:data:`CALLER_GONE`)
            when it is recorded as running but the process that followed it on this
            host has ended without closing it).
        created: seconds since the epoch.
        updated: the last time anything of it was recorded (it, or any of its jobs).
        ended: when it finished, failed or was cancelled (None while it runs; for
            ``caller gone``, the last time anything was recorded).
        caller: who followed it last, ``{"host", "pid", "start"}``, if recorded.
        backend: the backend it ran on (from its recorded settings).
        tasks, jobs: how many tasks and jobs it submitted.
        job_states: number of jobs in each status (``queued``, ``done``, ``failed``,
            ``lost``, ``cancelled``).
        path: its directory (state, logs).
    """

    id: str
    name: str
    status: str
    created: float | None
    updated: float | None
    backend: str | None
    tasks: int
    jobs: int
    job_states: dict[str, int] = field(hash=False)
    path: Path
    ended: float | None = None
    caller: dict[str, Any] | None = field(default=None, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (times as ISO 8601 in UTC, the path as a string)."""
        caller = self.caller or {}
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "ended": _iso(self.ended),
            "caller": {"host": caller.get("host"), "pid": caller.get("pid")} if caller else None,
            "backend": self.backend,
            "tasks": self.tasks,
            "jobs": self.jobs,
            "job_states": dict(self.job_states),
            "path": str(self.path),
        }


@dataclass(frozen=True)
class TaskSummary:
    """One task of a workflow: its id (``t0001``), name, function, jobs and their states."""

    workflow_id: str
    id: str
    name: str
    function: str
    jobs: int
    created: float | None
    job_states: dict[str, int] = field(hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (``created`` as ISO 8601 in UTC)."""
        return {
            "workflow": self.workflow_id,
            "id": self.id,
            "name": self.name,
            "function": self.function,
            "jobs": self.jobs,
            "created": _iso(self.created),
            "job_states": dict(self.job_states),
        }


@dataclass(frozen=True)
class JobSummary:
    """One job of a task: its index, name, status, return code and log files.

    ``started`` and ``ended`` (seconds since the epoch), ``value`` (the real
    number it returned), ``error`` (what it raised, with the remote traceback)
    and ``arguments`` (a shortened repr of its call's arguments, made by its
    caller) are ``None`` when not known, as in records written before they were kept.
    ``depends`` is the JSON list, as recorded, of the jobs whose futures it took as
    arguments (``dependencies`` reads it); such a job is ``waiting`` until they are done.
    """

    workflow_id: str
    task_id: str
    index: int
    name: str
    status: str
    returncode: int | None
    updated: float | None
    stdout: Path
    stderr: Path
    started: float | None = None
    ended: float | None = None
    value: float | None = None
    error: str | None = None
    arguments: str | None = None
    depends: str | None = None

    @property
    def dependencies(self) -> list[str]:
        """The jobs (``t0001/0``) whose futures it took as arguments."""
        return list(json.loads(self.depends)) if self.depends else []

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (times as ISO 8601 in UTC, paths as strings)."""
        return {
            "workflow": self.workflow_id,
            "task": self.task_id,
            "job": self.index,
            "name": self.name,
            "status": self.status,
            "returncode": self.returncode,
            "updated": _iso(self.updated),
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "value": self.value,
            "error": self.error,
            "arguments": self.arguments,
            "depends": self.dependencies,
            "stdout": str(self.stdout),
            "stderr": str(self.stderr),
        }


@dataclass(frozen=True)
class JobTiming:
    """When one job was queued, started and ended, for a timeline of a workflow's jobs.

    Times are seconds since the epoch (``queued`` is its task's submission);
    ``started`` and ``ended`` are ``None`` when not (yet) known. ``value`` is the
    real number the job returned, if it returned one; ``arguments`` the text
    recorded of its call (for HPO, its hyper-parameters), if any.
    """

    task_id: str
    index: int
    name: str
    status: str
    queued: float | None
    started: float | None
    ended: float | None
    value: float | None
    arguments: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict, times as seconds since the epoch (a plot needs numbers)."""
        return {
            "task": self.task_id,
            "job": self.index,
            "name": self.name,
            "status": self.status,
            "queued": self.queued,
            "started": self.started,
            "ended": self.ended,
            "value": self.value,
            "arguments": self.arguments,
        }


@contextlib.contextmanager
def _open_state(path: Path) -> Iterator[sqlite3.Connection]:
    # mode=ro: a running workflow's database must never be changed (or created) here.
    uri = path.resolve().as_uri() + "?mode=ro"
    if not path.with_name(path.name + "-wal").exists():
        # No -wal file: no process has it open. A read-only open would still create
        # -wal and -shm beside it; immutable reads it as the plain file it is now.
        uri += "&immutable=1"
    db = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT)
    try:
        yield db
    finally:
        db.close()


def _state_path(work_dir: Path, workflow_id: str) -> Path:
    return WorkDirPaths(Path(work_dir)).workflow(workflow_id).state


@contextlib.contextmanager
def _reading(work_dir: Path, workflow_id: str) -> Iterator[tuple[str, sqlite3.Connection]]:
    """Open the state of a workflow (id or unique prefix) read-only; yield its full id and db.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        IddsFatError: its state database cannot be read.
    """
    full_id = resolve_workflow_id(work_dir, workflow_id)
    path = _state_path(work_dir, full_id)
    try:
        with _open_state(path) as db:
            yield full_id, db
    except sqlite3.Error as exc:
        raise IddsFatError(f"cannot read {path}: {exc}") from exc


def _recorded_ids(work_dir: Path) -> list[str]:
    paths = WorkDirPaths(work_dir)
    if not paths.workflows.is_dir():
        return []
    # A directory without its database is a workflow still starting (or not ours).
    found = (paths.workflow(p.name) for p in paths.workflows.iterdir())
    return sorted(w.workflow_id for w in found if w.state.is_file())


def resolve_workflow_id(work_dir: Path, workflow_id: str) -> str:
    """Return the full id of the workflow named by ``workflow_id`` or a unique prefix of it.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
    """
    work_dir = Path(work_dir)
    ids = _recorded_ids(work_dir)
    if workflow_id in ids:
        return workflow_id
    matches = tuple(i for i in ids if workflow_id and i.startswith(workflow_id))
    if len(matches) == 1:
        return matches[0]
    raise WorkflowNotFound(workflow_id, work_dir, matches)


def _status_groups(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """``(status, count, last updated, last ended)`` of the jobs, one row per status."""
    ended_term = "MAX(ended)" if "ended" in job_columns(db) else "NULL"
    # One pass over the jobs for the counts and the last times (a pass is
    # 0.1-0.2 s at 100,000 jobs, and the page asks every second).
    return db.execute(
        f"SELECT status, COUNT(*), MAX(updated), {ended_term} FROM jobs GROUP BY status"
    ).fetchall()


def _task_groups(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """Every task in submission order, with what its jobs say, in one pass over the jobs:
    ``(id, name, function, jobs, created, states, last updated, last ended, values,
    least, greatest)``.

    ``states`` packs ``status`` and count pairs (:func:`_unpack_states`); ``values``
    counts the jobs that returned a real number (0 where a record has no ``value``
    column), ``least`` and ``greatest`` are their extremes. One row per task, not
    one per task and status: each row fetched hands the GIL over once, and in a
    busy caller each hand-over waits for the other threads.
    """
    known = job_columns(db)
    ended = "MAX(ended)" if "ended" in known else "NULL"
    values = (
        "COUNT(value) AS found, MIN(value) AS least, MAX(value) AS greatest"
        if "value" in known
        else "0 AS found, NULL AS least, NULL AS greatest"
    )
    return db.execute(
        "SELECT t.id, t.name, t.function, t.jobs, t.created, g.states, g.updated, g.ended, "
        "COALESCE(g.found, 0), g.least, g.greatest FROM tasks AS t LEFT JOIN ("
        " SELECT task, group_concat(status || char(31) || n, char(30)) AS states,"
        " MAX(updated) AS updated, MAX(ended) AS ended, SUM(found) AS found,"
        " MIN(least) AS least, MAX(greatest) AS greatest FROM ("
        f"  SELECT task, status, COUNT(*) AS n, MAX(updated) AS updated, {ended} AS ended,"
        f"  {values} FROM jobs GROUP BY task, status"
        " ) GROUP BY task"
        ") AS g ON g.task = t.id ORDER BY t.created, t.id"
    ).fetchall()


def _unpack_states(packed: str | None) -> dict[str, int]:
    if not packed:
        return {}
    pairs = (pair.split("\x1f") for pair in packed.split("\x1e"))
    return dict(sorted((status, int(count)) for status, count in pairs))


def _summary(work_dir: Path, workflow_id: str) -> WorkflowSummary:
    paths = WorkDirPaths(work_dir).workflow(workflow_id)
    try:
        with _open_state(paths.state) as db:
            by_status = _status_groups(db)
            states = dict(sorted((status, count) for status, count, _, _ in by_status))
            last = [
                max((r[i] for r in by_status if r[i] is not None), default=None) for i in (2, 3)
            ]
            return _summary_of(db, workflow_id, paths.root, states, last)
    except sqlite3.Error:
        # One damaged record must not hide the others from a listing.
        return WorkflowSummary(
            workflow_id, "", "unreadable", None, None, None, 0, 0, {}, paths.root
        )


def _summary_of(
    db: sqlite3.Connection,
    workflow_id: str,
    path: Path,
    states: dict[str, int],
    last_job: list[float | None],
) -> WorkflowSummary:
    """The summary of the workflow whose record ``db`` is, given its jobs' counts by status
    and the last times any job was updated and ended."""
    caller_term = "caller" if "caller" in job_columns(db, "workflow") else "NULL"
    row = db.execute(
        f"SELECT name, status, created, updated, settings, {caller_term} FROM workflow LIMIT 1"
    ).fetchone()
    tasks = db.execute("SELECT COUNT(*), COALESCE(SUM(jobs), 0) FROM tasks").fetchone()
    if row is None:
        return WorkflowSummary(workflow_id, "", "starting", None, None, None, 0, 0, {}, path)
    name, status, created, updated, settings, caller_json = row
    try:
        backend = json.loads(settings or "{}").get("backend")
    except (ValueError, AttributeError):
        backend = None
    try:
        caller = json.loads(caller_json) if caller_json else None
    except ValueError:
        caller = None
    # A workflow's own row changes only when its status does; its jobs tell when it moved.
    updated = max((t for t in (updated, *last_job) if t is not None), default=None)
    ended = row[3] if status in FINAL_WORKFLOW else None
    return WorkflowSummary(
        workflow_id,
        name,
        status,
        created,
        updated,
        backend,
        tasks[0],
        tasks[1],
        states,
        path,
        ended,
        caller if isinstance(caller, dict) else None,
    )


def _with_caller_checked(summary: WorkflowSummary) -> WorkflowSummary:
    """Show a running workflow whose caller has ended as :data:`CALLER_GONE`.

    Checked at each read, not kept: the caller may end long after the record settled.
    """
    if summary.status != "running" or not caller_gone(summary.caller):
        return summary
    return dataclasses.replace(summary, status=CALLER_GONE, ended=summary.updated)


def _state_stamp(path: Path) -> tuple[int, ...] | None:
    """What changes whenever a state database does: its and its WAL's size and mtime."""
    stamp: list[int] = []
    for part in (path, path.with_name(path.name + "-wal")):
        try:
            info = part.stat()
        except FileNotFoundError:
            stamp += [-1, -1]
            continue
        except OSError:
            return None
        stamp += [info.st_size, info.st_mtime_ns]
    return tuple(stamp)


# (work dir, workflow id) -> (state stamp, summary): a monitoring page lists every
# workflow each second, and most of them finished long ago.
_listed: dict[tuple[Path, str], tuple[tuple[int, ...], WorkflowSummary]] = {}
_listed_lock = threading.Lock()
_SETTLED_NS = 5_000_000_000


def _summary_if_changed(work_dir: Path, workflow_id: str) -> WorkflowSummary:
    stamp = _state_stamp(_state_path(work_dir, workflow_id))
    with _listed_lock:
        known = _listed.get((work_dir, workflow_id))
    # A database written in the last seconds is read again whatever its stamp:
    # mtimes tick coarsely, and a WAL rewritten in place keeps its size.
    settled = stamp is not None and time.time_ns() - max(stamp[1], stamp[3]) > _SETTLED_NS
    if settled and known is not None and known[0] == stamp:
        return _with_caller_checked(known[1])
    summary = _summary(work_dir, workflow_id)
    if stamp is not None:
        with _listed_lock:
            _listed[(work_dir, workflow_id)] = (stamp, summary)
    return _with_caller_checked(summary)


def list_workflows(work_dir: Path) -> list[WorkflowSummary]:
    """Return a summary of every workflow recorded under ``work_dir``, newest first.

    A workflow whose database cannot be read is listed with status ``unreadable``.
    Summaries are kept between calls and read again only from databases that
    changed since (their size or mtime, or their WAL's).
    """
    work_dir = Path(work_dir)
    summaries = [_summary_if_changed(work_dir, i) for i in _recorded_ids(work_dir)]
    return sorted(summaries, key=lambda s: (s.created or 0.0, s.id), reverse=True)


def workflow_summary(work_dir: Path, workflow_id: str) -> WorkflowSummary:
    """Return the summary of one workflow, named by its id or a unique prefix.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
    """
    return _with_caller_checked(
        _summary(Path(work_dir), resolve_workflow_id(work_dir, workflow_id))
    )


def task_summaries(work_dir: Path, workflow_id: str) -> list[TaskSummary]:
    """Return the tasks of a workflow (id or unique prefix), in the order they were submitted.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        IddsFatError: its state database cannot be read.
    """
    with _reading(work_dir, workflow_id) as (full_id, db):
        groups = db.execute("SELECT task, status, COUNT(*) FROM jobs GROUP BY task, status")
        return _tasks_of(db, full_id, groups.fetchall())


def _tasks_of(
    db: sqlite3.Connection, workflow_id: str, groups: list[tuple[Any, ...]]
) -> list[TaskSummary]:
    """The tasks recorded in ``db``, their jobs counted from ``groups``, rows that start
    ``(task, status, count, ...)``: one grouped query, not one count per task (a
    thousand of them each time the monitoring page asked)."""
    counts: dict[str, dict[str, int]] = {}
    for task_id, status, count, *_ in groups:
        counts.setdefault(task_id, {})[status] = count
    rows = db.execute(
        "SELECT id, name, function, jobs, created FROM tasks ORDER BY created, id"
    ).fetchall()
    return [
        TaskSummary(
            workflow_id,
            tid,
            name,
            function,
            jobs,
            created,
            dict(sorted(counts.get(tid, {}).items())),
        )
        for tid, name, function, jobs, created in rows
    ]


@dataclass(frozen=True)
class WorkflowDetail:
    """One workflow as the monitoring page shows it: its summary, its tasks, and per task
    the real numbers its jobs returned, ``{task_id: (count, least, greatest)}`` (tasks
    with none left out)."""

    summary: WorkflowSummary
    tasks: list[TaskSummary]
    values: dict[str, tuple[int, float, float]]


def workflow_detail(work_dir: Path, workflow_id: str) -> WorkflowDetail:
    """Return a workflow's summary, tasks and values, read in one pass over its jobs.

    The same as :func:`workflow_summary`, :func:`task_summaries` and
    :func:`task_values` together, and read in one transaction, so the counts agree
    with each other.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        IddsFatError: its state database cannot be read.
    """
    with _reading(work_dir, workflow_id) as (full_id, db):
        db.execute("BEGIN")  # one snapshot for every read below
        rows = _task_groups(db)
        states: dict[str, int] = {}
        last: list[float | None] = [None, None]
        tasks, values = [], {}
        for tid, name, function, jobs, created, packed, updated, ended, *found in rows:
            counts = _unpack_states(packed)
            tasks.append(TaskSummary(full_id, tid, name, function, jobs, created, counts))
            for status, count in counts.items():
                states[status] = states.get(status, 0) + count
            last = [_latest(last[0], updated), _latest(last[1], ended)]
            if found[0]:
                values[tid] = (found[0], found[1], found[2])
        path = WorkDirPaths(Path(work_dir)).workflow(full_id).root
        summary = _summary_of(db, full_id, path, dict(sorted(states.items())), last)
    return WorkflowDetail(_with_caller_checked(summary), tasks, values)


def _latest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def resolve_task_id(work_dir: Path, workflow_id: str, task: str) -> str:
    """Return the id of the task named ``task``: its id (``t0001``) or its unique name.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        TaskNotFound: no task (or several tasks) has this id or name.
    """
    tasks = task_summaries(work_dir, workflow_id)
    for summary in tasks:
        if summary.id == task:
            return summary.id
    named = [s.id for s in tasks if s.name == task]
    if len(named) == 1:
        return named[0]
    known = ", ".join(f"{s.id} ({s.name})" for s in tasks) or "none"
    full_id = tasks[0].workflow_id if tasks else resolve_workflow_id(work_dir, workflow_id)
    if named:
        raise TaskNotFound(
            f"task name {task!r} is ambiguous in workflow {full_id}: use one of {named}"
        )
    raise TaskNotFound(f"workflow {full_id} has no task {task!r}; its tasks: {known}")


def _later_columns(db: sqlite3.Connection) -> list[str]:
    """Return ``started, ended, value, error, arguments`` as SELECT terms, NULL where a
    record lacks them."""
    known = job_columns(db)
    return [c if c in known else "NULL" for c in LATER_JOB_COLUMNS]


def job_timings(work_dir: Path, workflow_id: str, limit: int | None = None) -> list[JobTiming]:
    """Return the jobs of every task of a workflow, in submission order, for a timeline.

    With ``limit``, only the ``limit`` jobs submitted last.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        IddsFatError: its state database cannot be read.
    """
    with _reading(work_dir, workflow_id) as (_, db):
        started, ended, value, _, arguments, *_ = (
            f"j.{c}" if c != "NULL" else c for c in _later_columns(db)
        )
        columns = (
            f"j.task, j.job, j.name, j.status, t.created, {started}, {ended}, {value}, {arguments}"
        )
        if limit is None:
            rows = db.execute(
                f"SELECT {columns} FROM jobs AS j JOIN tasks AS t ON t.id = j.task "
                "ORDER BY t.created, j.task, j.job"
            ).fetchall()
            return [JobTiming(*row) for row in rows]
        # The last jobs task by task, newest task first, each read backwards along the
        # (task, job) key: sorting the whole join to keep its tail took a second at
        # 100,000 jobs, on every refresh of the monitoring page.
        rows = []
        tasks = db.execute("SELECT id FROM tasks ORDER BY created DESC, id DESC")
        for (task_id,) in tasks.fetchall():
            if len(rows) >= limit:
                break
            rows += db.execute(
                f"SELECT {columns} FROM jobs AS j JOIN tasks AS t ON t.id = j.task "
                "WHERE j.task = ? ORDER BY j.job DESC LIMIT ?",
                (task_id, limit - len(rows)),
            ).fetchall()
    rows.reverse()
    return [JobTiming(*row) for row in rows]


def task_values(work_dir: Path, workflow_id: str) -> dict[str, tuple[int, float, float]]:
    """Return, per task that has any, how many jobs returned a real number, the least and the
    greatest, as ``{task_id: (count, min, max)}``.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        IddsFatError: its state database cannot be read.
    """
    with _reading(work_dir, workflow_id) as (_, db):
        if _later_columns(db)[2] == "NULL":
            return {}
        rows = db.execute(
            "SELECT task, COUNT(value), MIN(value), MAX(value) FROM jobs "
            "WHERE value IS NOT NULL GROUP BY task"
        ).fetchall()
    return {task: (count, low, high) for task, count, low, high in rows}


def job_summaries(work_dir: Path, workflow_id: str, task: str) -> list[JobSummary]:
    """Return the jobs of one task (its id or unique name), in index order.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        TaskNotFound: the workflow has no such task.
        IddsFatError: its state database cannot be read.
    """
    full_id = resolve_workflow_id(work_dir, workflow_id)
    task_id = resolve_task_id(work_dir, full_id, task)
    with _reading(work_dir, full_id) as (_, db):
        rows = db.execute(
            f"SELECT job, name, status, returncode, updated, {', '.join(_later_columns(db))} "
            "FROM jobs WHERE task = ? ORDER BY job",
            (task_id,),
        ).fetchall()
    workflow = WorkDirPaths(Path(work_dir)).workflow(full_id)
    jobs = []
    for index, name, status, returncode, updated, *later in rows:
        # A job run again (its result was lost) has a dir per run: show the last.
        run = workflow.last_run(task_id, index)
        jobs.append(
            JobSummary(
                full_id,
                task_id,
                index,
                name,
                status,
                returncode,
                updated,
                run.stdout,
                run.stderr,
                *later,
            )
        )
    return jobs


def job_log_paths(work_dir: Path, workflow_id: str, task: str, job: int) -> JobSummary:
    """Return job ``job`` of a task, with the paths of its ``stdout`` and ``stderr``.

    The files may not exist yet (the job has not started), at all (a warm job
    that printed nothing has none) or any more. For a job that was run again,
    the paths are those of its last attempt; for a job running in a local warm
    worker, before it has files of its own, those of the worker's spool.

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        TaskNotFound: the workflow has no such task, or the task no such job.
    """
    jobs = job_summaries(work_dir, workflow_id, task)
    for summary in jobs:
        if summary.index == job:
            if summary.status == "running" and not summary.stderr.exists():
                workflow = WorkDirPaths(Path(work_dir)).workflow(summary.workflow_id)
                spool = workflow.spool_naming(JobPaths(summary.stderr.parent))
                if spool is not None:
                    return dataclasses.replace(summary, stdout=spool.stdout, stderr=spool.stderr)
            return summary
    task_id = jobs[0].task_id if jobs else task
    raise TaskNotFound(f"task {task_id} has no job {job}; its jobs are 0 to {len(jobs) - 1}")
