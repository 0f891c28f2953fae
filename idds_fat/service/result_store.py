"""The service's durable store of result envelopes, one SQLite file."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

from idds_fat.node.envelope import peek
from idds_fat.workdir import private_dir, touch_private

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow TEXT NOT NULL,
    task TEXT,
    job INTEGER,
    attempt INTEGER,
    digest TEXT NOT NULL,
    received REAL NOT NULL,
    envelope BLOB NOT NULL,
    UNIQUE (workflow, digest)
);
CREATE INDEX IF NOT EXISTS results_by_workflow ON results (workflow, seq);
"""

#: Columns added after the first release (added on open to a store that lacks them):
#: ``holder``, the reader that has the envelope already (``add(..., holder=...)``).
_LATER_COLUMNS = {"holder": "TEXT"}


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ResultStore:
    """Result envelopes by workflow, in arrival order, kept for ``ttl_seconds``.

    The store does not verify envelopes (it has no key): it only reads their
    header to index them. Identical bytes are stored once; two different
    envelopes for the same (task, job, attempt) are both kept, so a forged
    message can never block the real one: the caller verifies and dedupes.
    Thread-safe: one connection guarded by a lock. The file and its ``-wal`` and
    ``-shm`` companions are 0600, in a directory created 0700.
    """

    def __init__(self, db_path: Path, ttl_seconds: float) -> None:
        self.db_path = Path(db_path)
        self.ttl_seconds = ttl_seconds
        private_dir(self.db_path.parent)
        # Created 0600 before SQLite opens it: its -wal and -shm files take its mode.
        touch_private(self.db_path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            known = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
            for column, kind in _LATER_COLUMNS.items():
                if column not in known:
                    self._db.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")

    def add(self, workflow: str, envelope: bytes, holder: str | None = None) -> int | None:
        """Store ``envelope`` for ``workflow``; return its sequence number.

        Posting the same bytes again returns the existing sequence number.
        ``None`` is returned only if the row vanished between insert and lookup
        (purged concurrently). ``holder`` names the reader that has the envelope
        already (a caller that got it over a warm worker's pipe keeps this copy
        for ``attach`` and ``idds-fat results``): :meth:`since` passes over it
        for that reader only.

        Raises:
            ValueError: ``envelope`` is not an envelope, or its header names
                another workflow.
        """
        header, _ = peek(envelope)
        if header.get("workflow") != workflow:
            raise ValueError(
                f"envelope is for workflow {header.get('workflow')!r}, not {workflow!r}"
            )
        task = header.get("task")
        row = (
            workflow,
            task if isinstance(task, str) else None,
            _int_or_none(header.get("job")),
            _int_or_none(header.get("attempt")),
            hashlib.sha256(envelope).hexdigest(),
            time.time(),
            sqlite3.Binary(envelope),
            holder,
        )
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO results"
                " (workflow, task, job, attempt, digest, received, envelope, holder)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            if cursor.rowcount == 1:
                return cursor.lastrowid
            found = self._db.execute(
                "SELECT seq FROM results WHERE workflow = ? AND digest = ?", (workflow, row[4])
            ).fetchone()
        return found[0] if found else None

    def since(
        self,
        workflow: str,
        cursor: int,
        limit: int,
        task: str | None = None,
        job: int | None = None,
        holder: str | None = None,
    ) -> list[tuple[int, bytes | None]]:
        """Return up to ``limit`` ``(seq, envelope)`` of ``workflow`` with seq > ``cursor``
        (only those whose header names ``task`` and ``job``, when given: a dependent
        job reading its input's result).

        Rows come oldest first, so the last seq returned is the reader's next cursor.
        ``holder``: the reader asking; the envelopes kept for it (``add(...,
        holder=...)``) are left out, and when they are the newest rows, a last
        ``(seq, None)`` moves its cursor past them, so it never reads them again.
        """
        where, params = "workflow = ? AND seq > ?", [workflow, cursor]
        if task is not None:
            where, params = where + " AND task = ?", [*params, task]
        if job is not None:
            where, params = where + " AND job = ?", [*params, job]
        if holder is not None:
            where, params = where + " AND holder IS NOT ?", [*params, holder]
        page = f"SELECT seq, envelope FROM results WHERE {where} ORDER BY seq LIMIT ?"
        last = None
        with self._lock:
            if holder is None:
                rows = self._db.execute(page, (*params, limit)).fetchall()
            else:
                # One read transaction: a row another writer adds between the page and
                # the newest seq must not be passed over.
                self._db.execute("BEGIN")
                try:
                    rows = self._db.execute(page, (*params, limit)).fetchall()
                    if len(rows) < limit:
                        last = self._db.execute(
                            "SELECT MAX(seq) FROM results WHERE workflow = ?", (workflow,)
                        ).fetchone()[0]
                finally:
                    self._db.execute("COMMIT")
        found: list[tuple[int, bytes | None]] = [(seq, bytes(envelope)) for seq, envelope in rows]
        if last is not None and last > (rows[-1][0] if rows else cursor):
            found.append((last, None))
        return found

    def purge(self, now: float | None = None) -> int:
        """Delete results received more than ``ttl_seconds`` before ``now``; return how many."""
        cutoff = (time.time() if now is None else now) - self.ttl_seconds
        with self._lock:
            deleted = self._db.execute("DELETE FROM results WHERE received < ?", (cutoff,)).rowcount
        if deleted:
            logger.info("purged %d expired results from %s", deleted, self.db_path)
        return deleted

    def close(self) -> None:
        """Close the database; the store may not be used afterwards."""
        with self._lock:
            self._db.close()
