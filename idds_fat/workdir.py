"""Where idds-fat keeps its files: the one home of the work-dir layout.

::

    WORK_DIR/                            WorkDirPaths(WORK_DIR)
      cache/                             the default content store
      context-index/                     the tree states the context packer packed
      service/                           the data of ``idds-fat serve``
      workflows/
        ID/                              WorkflowPaths(WORK_DIR/workflows/ID)
          hmac.key                       0600: signs its payloads and results
          connection.json                0600: how ``attach`` reconnects (service, token, caller)
          state.sqlite3                  its record: workflow.state writes, workflow.catalog reads
          job-secrets.json               0600: the secrets its Slurm jobs read
          wrapper_KEY.py                 the node wrapper, as its jobs import it
          workers/                       the local backend's warm workers
            worker-N/, worker-N.log      one worker: its directory, its own log
            worker-N.pid                 its pid and start time, until it is reaped
            worker-N.spool/              JobPaths: its jobs' output before it is copied
              job                        the work dir of the job it runs (or ran last)
          driver/                        the body run away from the caller (workflow.driver)
          jobs/TASK/                     one task (the Slurm backend keeps its arrays here)
            INDEX/, INDEX.ATTEMPT/       JobPaths: a job's first run, and each run again
              stdout.txt, stderr.txt     what the job printed (a warm job: if anything,
                                         and only then the directory itself)
              exit_status                how it ended, when a pack ran it
              result.reply               its result, when the local backend takes it back
              process.pid                a local cold job's pid and start time, while it runs

The backends and the workflow both import this module; it imports nothing of
idds_fat. The node (:mod:`idds_fat.node`), which runs without the SDK, spells
the names of a job's files itself; ``tests/test_workdir.py`` checks that the
two spellings agree.

Everything idds-fat creates under a work dir is the user's alone, whatever the
umask: directories 0700, files 0600 (pickled arguments, results, tracebacks and
keys live here). The helpers every layer creates them with are here:
:func:`private_dir`, :func:`write_private`, :func:`open_private` and
:func:`touch_private` (a SQLite file before SQLite opens it: its ``-wal`` and
``-shm`` files take the database's mode). :func:`read_tail` reads the last lines
of a log from its end.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: The name of a workflow's state database (see :mod:`idds_fat.workflow.state`).
STATE_FILE = "state.sqlite3"


@dataclass(frozen=True)
class JobPaths:
    """The files of one run of a job, in its directory ``root``."""

    root: Path

    @property
    def stdout(self) -> Path:
        """What the job printed on stdout."""
        return self.root / "stdout.txt"

    @property
    def stderr(self) -> Path:
        """What the job printed on stderr."""
        return self.root / "stderr.txt"

    @property
    def exit_status(self) -> Path:
        """The job's exit status and a newline, written by a pack that ran it."""
        return self.root / "exit_status"

    @property
    def reply(self) -> Path:
        """The result a local cold job leaves for its caller (``wrapper --reply-file``)."""
        return self.root / "result.reply"


@dataclass(frozen=True)
class DriverFiles(JobPaths):
    """The files of a workflow's driver, in ``WORKFLOW_DIR/driver/`` (0700, files 0600):
    those of a job run (its output, its exit status when its launcher saw it end) and
    its own."""

    @property
    def body(self) -> Path:
        """The sealed body and settings the driver runs."""
        return self.root / "body.bin"

    @property
    def secrets(self) -> Path:
        """The configured secrets (token, broker password) the driver reads."""
        return self.root / "secrets.json"

    @property
    def where(self) -> Path:
        """Where it runs: ``{"kind", "host", "pid"}`` or ``{"kind", "slurm_job"}``."""
        return self.root / "where.json"

    @property
    def lock(self) -> Path:
        """Held (``flock``) by a local driver from before it starts until it ends."""
        return self.root / "lock"

    @property
    def outcome(self) -> Path:
        """The sealed return value, or exception, of the body."""
        return self.root / "outcome.bin"

    @property
    def script(self) -> Path:
        """The ``sbatch`` script of a Slurm driver."""
        return self.root / "driver.sh"


@dataclass(frozen=True)
class WorkflowPaths:
    """The files of one workflow, in its directory ``root`` (``WORK_DIR/workflows/ID``)."""

    root: Path

    @property
    def workflow_id(self) -> str:
        """The workflow's id: the name of its directory."""
        return self.root.name

    @property
    def hmac_key(self) -> Path:
        """The key that signs its payloads and results (mode 0600)."""
        return self.root / "hmac.key"

    @property
    def connection(self) -> Path:
        """How a later ``attach`` reconnects: service URL, token, cache, caller (mode 0600)."""
        return self.root / "connection.json"

    @property
    def state(self) -> Path:
        """Its SQLite record of settings, tasks and jobs."""
        return self.root / STATE_FILE

    @property
    def job_secrets(self) -> Path:
        """The secrets its Slurm jobs read (mode 0600): the script names the file only."""
        return self.root / "job-secrets.json"

    @property
    def workers(self) -> Path:
        """Where the local backend's warm workers run and log."""
        return self.root / "workers"

    @property
    def driver(self) -> DriverFiles:
        """The files of its driver, when its body runs away from the caller."""
        return DriverFiles(self.root / "driver")

    def spool_naming(self, job: JobPaths) -> JobPaths | None:
        """The spool of the local backend's warm worker that runs ``job`` (or ran it
        last): its jobs' output before the worker copies it into a job's own files.
        None when no worker's spool names the job."""
        return worker_spools(self.workers).get(os.fsencode(job.root))

    @property
    def jobs(self) -> Path:
        """The directories of its tasks."""
        return self.root / "jobs"

    def wrapper(self, key: str) -> Path:
        """The node wrapper whose cache key is ``key``, as a module its jobs import."""
        return self.root / f"wrapper_{key[:16]}.py"

    def task(self, task_id: str) -> Path:
        """The directory of task ``task_id``: its jobs' directories, a backend's own files."""
        return self.jobs / task_id

    def job(self, task_id: str, index: int, attempt: int = 0) -> JobPaths:
        """The files of job ``index`` of a task: ``INDEX/`` for its first run,
        ``INDEX.ATTEMPT/`` when it runs again."""
        name = str(index) if not attempt else f"{index}.{attempt}"
        return JobPaths(self.jobs.joinpath(task_id, name))  # one join: a map asks per job

    def last_run(self, task_id: str, index: int) -> JobPaths:
        """The files of the last run of job ``index`` of a task, among those on disk
        (its first run's when none is)."""
        attempts = [
            int(suffix)
            for path in self.task(task_id).glob(f"{index}.*")
            if (suffix := path.name.rpartition(".")[2]).isdigit()
        ]
        return self.job(task_id, index, max(attempts, default=0))


@dataclass(frozen=True)
class WorkDirPaths:
    """The files under a work dir ``root`` (the ``work_dir`` setting)."""

    root: Path

    @property
    def cache(self) -> Path:
        """The default content store (a ``DirectoryStore``)."""
        return self.root / "cache"

    @property
    def context_index(self) -> Path:
        """Which code-context tree states were packed, and into which archive."""
        return self.root / "context-index"

    @property
    def service(self) -> Path:
        """The default data dir of ``idds-fat serve``."""
        return self.root / "service"

    @property
    def workflows(self) -> Path:
        """The directories of every workflow."""
        return self.root / "workflows"

    def workflow(self, workflow_id: str) -> WorkflowPaths:
        """The files of workflow ``workflow_id`` (which need not exist)."""
        return WorkflowPaths(self.workflows / workflow_id)


def slug(name: str) -> str:
    """Return ``name`` made fit to begin a file name: runs of anything but letters,
    digits, ``_``, ``.`` and ``-`` become one ``-``; at most 40 characters; never empty."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:40] or "workflow"


#: The mode of every directory idds-fat creates in a work dir.
PRIVATE_DIR_MODE = 0o700
#: The mode of every file idds-fat creates in a work dir.
PRIVATE_FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create directory ``path`` and its missing parents, each with mode 0700 whatever
    the umask; return ``path``. Directories that exist keep their mode (a work dir
    the user made is theirs to share).

    Raises:
        OSError: a directory cannot be created, or ``path`` is a file.
    """
    target = Path(path)
    missing = []
    level = target
    while not level.is_dir() and level.parent != level:
        missing.append(level)
        level = level.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(PRIVATE_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made meanwhile by another thread or process
        # mkdir's mode passes through the umask: set it exactly.
        os.chmod(directory, PRIVATE_DIR_MODE)
    return target


def worker_spools(workers: Path) -> dict[bytes, JobPaths]:
    """The spools of the local backend's warm workers in ``workers``, by the work dir
    each names (``worker-N.spool/job``: the job it runs, or ran last)."""
    spools = {}
    for named in workers.glob("*.spool/job"):
        try:
            spools[named.read_bytes()] = JobPaths(named.parent)
        except OSError:  # a worker being replaced
            continue
    return spools


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None if
    unknown or gone: with the pid alone, a pid reused by a later process would pass for
    the one a record names (a caller, a warm worker's or a cold job's pid file)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return fields.rsplit(b")", 1)[1].split()[19].decode()


def touch_private(path: Path) -> Path:
    """Create the empty file ``path`` with mode 0600 unless it exists; return ``path``.

    Raises:
        OSError: the file cannot be created.
    """
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))
    return Path(path)


def open_private(path: Path, append: bool = False) -> BinaryIO:
    """Open ``path`` for writing bytes (truncated, or appended to with ``append``), a
    file created with mode 0600 when it does not exist; an existing file keeps its mode.

    Raises:
        OSError: the file cannot be opened.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, PRIVATE_FILE_MODE), "ab" if append else "wb")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, a file only the user may read or write (mode 0600
    from its creation on, so no other user ever sees it, even briefly).

    An existing file is truncated and keeps its mode.

    Raises:
        OSError: the file cannot be created or written.
    """
    with open_private(path) as handle:
        handle.write(data)


_BLOCK = 8192


def read_tail(path: Path, lines: int | None, max_bytes: int | None) -> str | None:
    """Return the last ``lines`` lines of the file at ``path``, as it has them (line
    ends kept), decoded as UTF-8 with undecodable bytes replaced.

    The file is read backwards from its end, never more than ``max_bytes`` of it;
    when that bound cuts the first line read, the cut line is left out (unless it
    is the only one). ``lines=None``: every line within the bound;
    ``max_bytes=None``: no bound (memory then grows with the lines asked for).
    Lines end at ``\\n`` only, as for ``tail``: a progress bar's ``\\r`` does not
    make a line.

    Returns ``None`` when the file cannot be read (it does not exist, yet or any more).
    """
    try:
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            start = floor = 0 if max_bytes is None else max(0, end - max_bytes)
            if lines is None:
                handle.seek(floor)
                data = handle.read()
            else:
                chunks, found, start = [], 0, end
                while start > floor and found <= lines:
                    step = min(_BLOCK, start - floor)
                    start -= step
                    handle.seek(start)
                    chunks.append(handle.read(step))
                    found += chunks[-1].count(b"\n")
                data = b"".join(reversed(chunks))
    except OSError:
        return None
    *ended, last = data.split(b"\n")
    kept = [line + b"\n" for line in ended] + ([last] if last else [])
    if start > 0 and len(kept) > 1:
        kept = kept[1:]
    if lines is not None:
        kept = kept[-lines:] if lines else []
    return b"".join(kept).decode("utf-8", "replace")
