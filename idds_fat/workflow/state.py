"""A workflow's local record: its settings, tasks and jobs, in SQLite under its work dir.

The one home of its schema: :class:`WorkflowState` writes the record (the caller
that runs the workflow), :mod:`idds_fat.workflow.catalog` reads it (the command
line, the monitor), both from the tables and columns defined here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
LATER_JOB_COLUMNS = {"started": "REAL", "ended": "REAL", "value": "REAL", "error": "TEXT"}

# Statuses after which a job does not change (but for a run again): they set ``ended``.
_FINAL = ("done", "failed", "lost", "cancelled")


def job_columns(db: sqlite3.Connection) -> set[str]:
    """Return the names of the columns the ``jobs`` table of ``db`` has.

    Raises:
        sqlite3.Error: the database cannot be read.
    """
    return {row[1] for row in db.execute("PRAGMA table_info(jobs)")}


class WorkflowState:
    """The SQLite record of one workflow (``state.sqlite3`` in its work dir).

    It holds no secret: the HMAC key lives beside it in a file only the user can read.
    Thread-safe: backends report job ends from their own threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        known = job_columns(self._db)
        for column, kind in LATER_JOB_COLUMNS.items():
            if column not in known:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        self._lock = threading.Lock()

    def _run(self, sql: str, rows: Iterable[tuple] | tuple = ()) -> None:
        with self._lock:
            if isinstance(rows, tuple):
                self._db.execute(sql, rows)
            else:
                self._db.execute("BEGIN")
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")

    def record_workflow(self, workflow_id: str, name: str, settings: dict[str, Any]) -> None:
        """Record the workflow as running with ``settings`` (JSON-able, no secrets)."""
        now = time.time()
        self._run(
            "INSERT OR REPLACE INTO workflow VALUES (?, ?, 'running', ?, ?, ?)",
            (workflow_id, name, now, now, json.dumps(settings, default=str)),
        )

    def set_workflow_status(self, status: str) -> None:
        """Record the workflow's status (``running``, ``finished``, ``cancelled``, ``failed``)."""
        self._run("UPDATE workflow SET status = ?, updated = ?", (status, time.time()))

    def record_task(
        self, task_id: str, name: str, function: str, jobs: Iterable[tuple[int, str, str]]
    ) -> None:
        """Record a task and its jobs ``(index, name, spec_key)`` as queued."""
        jobs = list(jobs)
        now = time.time()
        self._run(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?)", (task_id, name, function, len(jobs), now)
        )
        self._run(
            "INSERT INTO jobs (task, job, name, spec, status, updated) "
            "VALUES (?, ?, ?, ?, 'queued', ?)",
            [(task_id, index, job_name, spec, now) for index, job_name, spec in jobs],
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
        with its remote traceback) are kept for the monitoring page.
        """
        now = time.time()
        ended = now if status in _FINAL else None
        self._run(
            "UPDATE jobs SET status = ?, returncode = COALESCE(?, returncode), updated = ?, "
            "ended = COALESCE(?, ended), value = COALESCE(?, value), "
            "error = COALESCE(?, error) WHERE task = ? AND job = ?",
            (status, returncode, now, ended, value, error, task_id, job),
        )

    def set_job_started(self, task_id: str, job: int, backend_ref: str) -> None:
        """Record that a job runs, and how its backend knows it (a pid, an array element)."""
        now = time.time()
        self._run(
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
        ``(index, name, spec_key, status, returncode, backend_ref)``, in index order."""
        with self._lock:
            tasks = self._db.execute("SELECT id, name FROM tasks ORDER BY created, id").fetchall()
            jobs = self._db.execute(
                "SELECT task, job, name, spec, status, returncode, backend_ref FROM jobs "
                "ORDER BY task, job"
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
