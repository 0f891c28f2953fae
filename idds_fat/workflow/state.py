"""A workflow's local record: its settings, tasks and jobs, in SQLite under its work dir.

The one home of its schema: :class:`WorkflowState` writes the record (the caller
that runs the workflow), :mod:`idds_fat.workflow.catalog` reads it (the command
line, the monitor), both from the tables and columns defined here.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from idds_fat.workdir import process_start, touch_private

#: The tables of a record as the first release wrote them.
SCHEMA = """
CREATE TABLE IF NOT EXISTS workflow (
    id TEXT PRIMARY KEY, name TEXT, status TEXT, created REAL, updated REAL, settings TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, name TEXT, function TEXT, jobs INTEGER, created REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    task TEXT, job INTEGER, name TEXT, spec TEXT, status TEXT, returncode INTEGER,
    updated REAL, backend_ref TEXT, PRIMARY KEY (task, job)
);
"""

#: Columns of ``jobs`` added after the first release, for the monitoring page: when a
#: job started and ended, its value when that is a real number, its error text. The
#: writer adds them on open, so a record of an older version gains them too; a reader
#: reads them as NULL where a record it opens read-only lacks them. They play the
#: part of a schema version: a new column goes here, and both sides follow.
LATER_JOB_COLUMNS = {
    "started": "REAL",
    "ended": "REAL",
    "value": "REAL",
    "error": "TEXT",
    "arguments": "TEXT",  # a short repr of the call's arguments, written by the caller
    "depends": "TEXT",  # JSON list of the jobs ("t0001/0") whose futures it took as arguments
}

#: Columns of ``workflow`` added later, as for jobs: ``caller`` is who follows the
#: workflow now, JSON ``{"host", "pid", "start"}`` (:func:`caller_identity`), so a
#: reader tells a running workflow from one whose caller went away without closing it.
LATER_WORKFLOW_COLUMNS = {"caller": "TEXT"}

#: Workflow statuses after which it does not change (but for an attach that runs jobs).
FINAL_WORKFLOW = ("finished", "failed", "cancelled")

# Statuses after which a job does not change (but for a run again): they set ``ended``.
_FINAL = ("done", "failed", "lost", "cancelled")


def job_columns(db: sqlite3.Connection, table: str = "jobs") -> set[str]:
    """Return the names of the columns the ``jobs`` (or another) table of ``db`` has.

    Raises:
        sqlite3.Error: the database cannot be read.
    """
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def caller_identity() -> dict[str, Any]:
    """Return who this process is, as the record keeps its caller: host, pid, start."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def caller_gone(caller: dict[str, Any] | None) -> bool:
    """Return True if the process ``caller`` (:func:`caller_identity`) has ended.

    False when it still runs, and when that cannot be told: a caller on another
    host, or a record that names none.
    """
    if not caller or caller.get("host") != socket.gethostname() or not caller.get("pid"):
        return False
    pid = int(caller["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process has this pid: it is not our caller if it started later
    start = caller.get("start")
    return start is not None and process_start(pid) not in (start, None)


class WorkflowState:
    """The SQLite record of one workflow (``state.sqlite3`` in its work dir).

    It holds no secret: the HMAC key lives beside it in a file only the user can read.
    Thread-safe: backends report job ends from their own threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # 0600 before SQLite creates it 0644: its -wal and -shm files take its mode.
        touch_private(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for table, later in (("jobs", LATER_JOB_COLUMNS), ("workflow", LATER_WORKFLOW_COLUMNS)):
            known = job_columns(self._db, table)
            for column, kind in later.items():
                if column not in known:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self._lock = threading.Lock()
        # Whether this follower changed any job (or started the workflow): one that
        # only read a finished workflow's results leaves its record as it was.
        self._changed = False
        # Tasks held (hold_task) until record_task: when each was handed over (its
        # queued time, which its jobs' starts follow) and the changes to its jobs
        # meanwhile, (sql, row) in order.
        self._held: dict[str, tuple[float, list[tuple[str, tuple]]]] = {}

    def _run(self, sql: str, rows: Iterable[tuple] | tuple = ()) -> int:
        """Run a change; return how many rows it changed."""
        with self._lock:
            if isinstance(rows, tuple):
                changed = self._db.execute(sql, rows).rowcount
            else:
                self._db.execute("BEGIN")
                with self._db:  # commits, or rolls back what raised
                    changed = self._db.executemany(sql, rows).rowcount
            if changed > 0:
                self._changed = True
            return changed

    def record_workflow(self, workflow_id: str, name: str, settings: dict[str, Any]) -> None:
        """Record the workflow as running with ``settings`` (JSON-able, no secrets),
        followed by this process."""
        now = time.time()
        self._run(
            "INSERT OR REPLACE INTO workflow "
            "(id, name, status, created, updated, settings, caller) "
            "VALUES (?, ?, 'running', ?, ?, ?, ?)",
            (
                workflow_id,
                name,
                now,
                now,
                json.dumps(settings, default=str),
                json.dumps(caller_identity()),
            ),
        )

    def follow(self) -> None:
        """Record this process as the workflow's caller (``attach``), and the workflow
        as running again if it has unfinished jobs; a finished one keeps its record."""
        with self._lock:
            self._db.execute("UPDATE workflow SET caller = ?", (json.dumps(caller_identity()),))
            unfinished = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
            ).fetchone()[0]
        if unfinished:
            self._run("UPDATE workflow SET status = 'running', updated = ?", (time.time(),))

    def set_workflow_status(self, status: str) -> None:
        """Record the workflow's status (``running``, ``finished``, ``cancelled``, ``failed``)."""
        self._run("UPDATE workflow SET status = ?, updated = ?", (status, time.time()))

    def end_workflow(self, status: str) -> None:
        """Record how the workflow ended (``finished``, ``cancelled``, ``failed``), as its
        caller closes it.

        A follower that changed nothing of a workflow that had ended already (one
        attached to read its results) leaves the record as it was: reading must
        not rewrite when, or how, a workflow ended.
        """
        if not self._changed:
            with self._lock:
                row = self._db.execute("SELECT status FROM workflow").fetchone()
            if row is not None and row[0] in FINAL_WORKFLOW:
                return
        self.set_workflow_status(status)

    def hold_task(self, task_id: str) -> None:
        """Hold the changes to the jobs of ``task_id`` (started, ended) until
        :meth:`record_task` records it, which applies them then, in order; or until
        :meth:`drop_task`. Its jobs may run before it is recorded: warm workers start
        the first chunk of a task from the specs sent inline while the specs are
        stored, and the task is recorded only once those specs are
        (docs/backends/local.md)."""
        with self._lock:
            self._held[task_id] = (time.time(), [])

    def drop_task(self, task_id: str) -> None:
        """Forget the changes held for a task that will not be recorded (its submission failed)."""
        with self._lock:
            self._held.pop(task_id, None)

    def _change(self, task_id: str, sql: str, row: tuple) -> None:
        with self._lock:
            held = self._held.get(task_id)
            if held is not None:
                held[1].append((sql, row))
                return
        self._run(sql, row)

    def record_task(
        self,
        task_id: str,
        name: str,
        function: str,
        jobs: Iterable[tuple[int, str, str | None]],
        arguments: Sequence[str | None] | None = None,
    ) -> None:
        """Record a task and its jobs ``(index, name, spec_key)`` as queued, in one
        transaction.

        A ``spec_key`` of None records a job whose spec is not in the cache yet
        (:meth:`set_spec_keys` records it once it is): ``attach`` fails such a job
        that is still queued, as its caller went away while submitting it.
        ``arguments``, one per job, is the text the monitoring page shows of each
        job's call (a shortened repr made by the caller: the service reads no payload).
        """
        jobs = list(jobs)
        texts = list(arguments) if arguments is not None else [None] * len(jobs)
        with self._lock:
            held = self._held.get(task_id)
            now = time.time() if held is None else held[0]
            self._db.execute("BEGIN")
            with self._db:  # commits, or rolls back what raised
                self._db.execute(
                    "INSERT INTO tasks VALUES (?, ?, ?, ?, ?)",
                    (task_id, name, function, len(jobs), now),
                )
                self._db.executemany(
                    "INSERT INTO jobs (task, job, name, spec, status, updated, arguments) "
                    "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                    [
                        (task_id, index, job_name, spec, now, text)
                        for (index, job_name, spec), text in zip(jobs, texts, strict=True)
                    ],
                )
                # Under the lock to the end: a change that comes now waits, and lands
                # after the held ones, which came first.
                _, changes = self._held.pop(task_id, (now, []))
                for sql, row in changes:
                    self._db.execute(sql, row)
            self._changed = True

    def set_spec_keys(self, task_id: str, keys: Iterable[tuple[int, str]]) -> None:
        """Record the spec keys ``(index, spec_key)`` of jobs of a task recorded without
        them (:meth:`record_task`), in one transaction, whatever their status now: call
        it only once the specs are in the cache, so whoever reads a key can rerun the
        job from it."""
        self._run(
            "UPDATE jobs SET spec = ? WHERE task = ? AND job = ?",
            [(spec, task_id, index) for index, spec in keys],
        )

    def set_waiting(self, task_id: str, depends: Sequence[Sequence[str]]) -> None:
        """Record the jobs of a task as ``waiting`` on the jobs ``depends`` lists for each
        (ids such as ``t0001/0``): they have no spec yet and are not submitted."""
        self._run(
            "UPDATE jobs SET status = 'waiting', depends = ? WHERE task = ? AND job = ?",
            [(json.dumps(list(ids)), task_id, index) for index, ids in enumerate(depends)],
        )

    def set_released(self, task_id: str, jobs: Iterable[tuple[int, str, str]]) -> None:
        """Record the waiting jobs ``(index, name, spec_key)`` of a task as queued, with
        their specs: their inputs are done and they go to the backend."""
        now = time.time()
        self._run(
            "UPDATE jobs SET status = 'queued', spec = ?, updated = ? "
            "WHERE task = ? AND job = ? AND status = 'waiting'",
            [(spec, now, task_id, index) for index, _, spec in jobs],
        )

    def set_job_status(
        self,
        task_id: str,
        job: int,
        status: str,
        returncode: int | None = None,
        value: float | None = None,
        error: str | None = None,
    ) -> None:
        """Record a job's status (``done``, ``failed``, ``lost``, ``cancelled``).

        ``value`` (a real number the job returned) and ``error`` (what it raised,
        with its remote traceback) are kept for the monitoring page. A job that
        ended with this status already is left as recorded: a follower that
        attaches later settles its futures from the stored results again, and
        must not move the times the job ended and was updated.
        """
        now = time.time()
        ended = now if status in _FINAL else None
        self._change(
            task_id,
            "UPDATE jobs SET status = ?, returncode = COALESCE(?, returncode), updated = ?, "
            "ended = COALESCE(?, ended), value = COALESCE(?, value), "
            "error = COALESCE(?, error) WHERE task = ? AND job = ? "
            "AND NOT (status = ? AND ended IS NOT NULL)",
            (status, returncode, now, ended, value, error, task_id, job, status),
        )

    def set_job_started(self, task_id: str, job: int, backend_ref: str) -> None:
        """Record that a job runs, and how its backend knows it (a pid, an array element)."""
        now = time.time()
        self._change(
            task_id,
            "UPDATE jobs SET status = 'running', backend_ref = ?, updated = ?, started = ? "
            "WHERE task = ? AND job = ? AND status IN ('queued', 'running')",
            (backend_ref, now, now, task_id, job),
        )

    def workflow_record(self) -> dict[str, Any]:
        """Return the workflow's id, name, status and settings.

        Raises:
            LookupError: the database holds no workflow.
        """
        with self._lock:
            row = self._db.execute("SELECT id, name, status, settings FROM workflow").fetchone()
        if row is None:
            raise LookupError(f"{self.path} holds no workflow")
        return {"id": row[0], "name": row[1], "status": row[2], "settings": json.loads(row[3])}

    def tasks(self) -> list[tuple[str, str, list[tuple]]]:
        """Return every task as ``(id, name, jobs)``, in submission order; each job is
        ``(index, name, spec_key, status, returncode, backend_ref, arguments)``, in index
        order (``arguments``: the text recorded of its call, or None)."""
        with self._lock:
            tasks = self._db.execute("SELECT id, name FROM tasks ORDER BY created, id").fetchall()
            jobs = self._db.execute(
                "SELECT task, job, name, spec, status, returncode, backend_ref, arguments "
                "FROM jobs ORDER BY task, job"
            ).fetchall()
        by_task: dict[str, list[tuple]] = {}
        for task, *row in jobs:
            by_task.setdefault(task, []).append(tuple(row))
        return [(task, name, by_task.get(task, [])) for task, name in tasks]

    def job_counts(self) -> dict[str, int]:
        """Return the number of jobs in each status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return dict(rows)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
