"""A workflow's driver: its body run away from the caller (iDDS's ``wf.submit()``).

::

    caller: wf.submit()                            driver: python -m idds_fat.workflow.driver_main
      parts.create: id, work dir, key, code           (a new session here, or a Slurm job)
        context, state record; then detach
      launch: driver/body.bin (sealed: the body,  ->  verifies body.bin with hmac.key, unpickles
        the settings), driver/secrets.json (0600),    Workflow.attach(ID): its own service (or
        driver/where.json; returns ID at once          the configured one) and backend
                                                       with wf: value = body()   (@work -> jobs)
    anyone, later: Workflow.attach(ID)         <--     driver/outcome.bin (sealed: the value, or
      .get_result(): verify, then unpickle             the exception and its traceback)
      no outcome and the driver gone: JobLostError     driver/stderr: its log, the tail when lost

The key and the tokens never travel on a command line or in the environment:
the driver reads the key from the workflow's 0600 ``hmac.key``, as ``attach``
does, and the configured secrets from the 0600 ``driver/secrets.json`` (the
Slurm script unsets the secret ``IDDS_FAT_*`` variables first, as job scripts
do). A local driver holds ``driver/lock`` (``flock``) from before it starts
until it ends, so a reader tells a live driver from a dead one without pids;
a Slurm driver is alive while ``squeue`` lists its job.

This module is what the caller and the readers need; the driver process itself
is :mod:`idds_fat.workflow.driver_main` (it imports the runtime, which imports this).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idds_fat.config import ENV_PREFIX, SECRET_SETTINGS
from idds_fat.errors import IddsFatError, JobLostError
from idds_fat.node.run import _error_body as error_body
from idds_fat.node.spec import SECRETS_ENV
from idds_fat.results.outcome import decode_result
from idds_fat.serialize import dumps_value, loads, open_envelope, register_user_modules, seal
from idds_fat.workdir import (
    DriverFiles,
    WorkflowPaths,
    open_private,
    private_dir,
    read_tail,
    slug,
    write_private,
)

if TYPE_CHECKING:
    from idds_fat.config import Config
    from idds_fat.workflow.runtime import Workflow

logger = logging.getLogger(__name__)

#: Backends whose driver is built: a detached process (``local``, and ``panda``,
#: whose jobs it submits from this machine) or a Slurm job.
DRIVER_KINDS = {"local": "local", "panda": "local", "slurm": "slurm"}
#: The module the driver process runs (``python -m``).
DRIVER_MODULE = "idds_fat.workflow.driver_main"
#: Seconds between two looks at a running driver, at most (local; Slurm: ``squeue``).
_POLL_MAX = {"local": 0.5, "slurm": 2.0}

# Workflows this process drives: their attach follows the jobs, not the driver.
_driving: set[str] = set()


class DriverError(IddsFatError):
    """The driver could not be launched (the message has the launcher's words)."""


def is_driving(workflow_id: str) -> bool:
    """Whether this process is the driver of workflow ``workflow_id``."""
    return workflow_id in _driving


def mark_driving(workflow_id: str) -> None:
    """Record that this process drives ``workflow_id`` (its ``attach`` then follows the jobs)."""
    _driving.add(workflow_id)


# --- the caller: launching -------------------------------------------------------------


def launch(workflow: Workflow, body: Callable[[], Any]) -> Driver:
    """Start the driver of ``workflow`` (created, with its parts stopped) running ``body``.

    Writes the sealed body and the settings, the secrets file and where it runs,
    then starts a detached process (``local``, ``panda``) or submits a Slurm job
    (``slurm``). Returns at once.

    Raises:
        ArgumentError: the body (or a value it closes over) does not pickle.
        DriverError: the process could not be started, or ``sbatch`` refused the job.
    """
    parts, config = workflow.parts, workflow.config
    assert parts.work_dir is not None
    files = WorkflowPaths(parts.work_dir).driver
    private_dir(files.root)
    register_user_modules(workflow.source_dir)  # helper modules travel by value, as for jobs
    public = dataclasses.replace(config, **{name: None for name in SECRET_SETTINGS})
    pickled = dumps_value((body, public), "the workflow body", config.max_argument_bytes)
    header = {
        "kind": "driver-body",
        "workflow": parts.workflow_id,
        "cwd": os.getcwd(),
        "source_dir": str(workflow.source_dir) if workflow.source_dir else None,
    }
    write_private(files.body, seal(header, pickled, parts.key))
    secrets = {name: getattr(config, name) for name in sorted(SECRET_SETTINGS)}
    write_private(files.secrets, json.dumps(secrets).encode())
    kind = DRIVER_KINDS.get(config.backend, "local")
    argv = [sys.executable, "-m", DRIVER_MODULE, "--work-dir", str(config.work_dir)]
    if kind == "slurm":
        queue = workflow.placement.get("queue") or config.slurm_partition
        where = _submit_slurm(files, argv + [parts.workflow_id], queue, config)
    else:
        where = _start_local(files, argv, parts.workflow_id)
    write_private(files.where, json.dumps(where).encode())
    logger.info("workflow %s: driver started (%s)", parts.workflow_id, _where_text(where))
    return Driver(parts.work_dir)


def _without_secrets(environ: dict[str, str]) -> dict[str, str]:
    """The environment minus the secret settings (the driver reads them from its file)."""
    secret = {SECRETS_ENV, *(ENV_PREFIX + name.upper() for name in SECRET_SETTINGS)}
    return {k: v for k, v in environ.items() if k not in secret}


def _start_local(files: DriverFiles, argv: list[str], workflow_id: str) -> dict[str, Any]:
    lock = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Taken before the process starts, handed to it: it is never seen unlocked
        # while the driver lives, and it is free as soon as the driver is gone.
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open_private(files.stdout) as out, open_private(files.stderr) as err:
            try:
                process = subprocess.Popen(
                    [*argv, "--lock-fd", str(lock), workflow_id],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=_without_secrets(dict(os.environ)),
                    start_new_session=True,  # the caller's Ctrl-C or exit does not reach it
                    pass_fds=(lock,),
                )
            except OSError as exc:
                raise DriverError(f"the driver could not be started: {exc}") from None
    finally:
        os.close(lock)
    # While this process lives it reaps the driver (a zombie holds no lock, but
    # keeps its exit status only for its parent) and leaves the status for readers.
    threading.Thread(
        target=_reap, args=(process, files.exit_status), name="idds-fat-driver-reaper", daemon=True
    ).start()
    return {"kind": "local", "host": socket.gethostname(), "pid": process.pid}


def _reap(process: subprocess.Popen, status_file: Path) -> None:
    returncode = process.wait()
    try:
        write_private(status_file, f"{returncode}\n".encode())
    except OSError:  # the work dir went away: nobody will ask
        pass


_SLURM_SCRIPT = """#!/bin/bash
{directives}
# The driver of idds-fat workflow {workflow}: its @work calls go to Slurm from here.
# Secrets are in the workflow's 0600 files, never in the environment: sbatch
# passes the caller's on, so its secret settings go first.
unset {unset}
exec {command}
"""


def _submit_slurm(
    files: DriverFiles, argv: list[str], queue: str | None, config: Config
) -> dict[str, Any]:
    directives = [
        f"--job-name=idds-fat-driver-{slug(argv[-1])}",
        f"--output={files.stdout}",
        f"--error={files.stderr}",
        f"--chdir={os.getcwd()}",
        *([f"--partition={queue}"] if queue else []),
        *([f"--account={config.slurm_account}"] if config.slurm_account else []),
        *config.slurm_options,
    ]
    script = _SLURM_SCRIPT.format(
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        workflow=argv[-1],
        unset=" ".join([SECRETS_ENV, *(ENV_PREFIX + s.upper() for s in sorted(SECRET_SETTINGS))]),
        command=shlex.join(argv),
    )
    write_private(files.script, script.encode())
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(files.script)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DriverError(f"sbatch could not submit the driver: {exc}") from None
    if done.returncode != 0:
        raise DriverError(f"sbatch refused the driver: {(done.stderr or done.stdout).strip()}")
    return {"kind": "slurm", "slurm_job": done.stdout.strip().split(";")[0]}


def _where_text(where: dict[str, Any]) -> str:
    if where.get("kind") == "slurm":
        return f"Slurm job {where.get('slurm_job')}"
    return f"process {where.get('pid')} on {where.get('host')}"


# --- the driver process: its inputs and its outcome ----------------------------------------


def read_body(workflow_dir: Path) -> tuple[Callable[[], Any], Config]:
    """Return what the driver of the workflow in ``workflow_dir`` runs: the body and
    the settings (without secrets).

    Verifies ``body.bin`` first; then moves this process to the caller's directory
    and puts the code context on ``sys.path`` (as the caller had them: the body
    may name modules there), and only then unpickles.

    Raises:
        IntegrityError: ``body.bin`` does not verify under the workflow's key.
        IddsFatError: it is not this workflow's body.
    """
    paths = WorkflowPaths(workflow_dir)
    files = paths.driver
    header, body = open_envelope(files.body.read_bytes(), paths.hmac_key.read_bytes())
    if header.get("kind") != "driver-body" or header.get("workflow") != paths.workflow_id:
        raise IddsFatError(f"{files.body} is not the driver body of {paths.workflow_id}")
    if os.path.isdir(header.get("cwd") or ""):
        os.chdir(header["cwd"])
    for directory in (header.get("source_dir"), header.get("cwd")):
        if directory and directory not in sys.path:
            sys.path.insert(0, directory)
    return loads(body)


def read_secrets(workflow_dir: Path) -> dict[str, str]:
    """Return the configured secrets the driver runs with (those that are set)."""
    raw = json.loads(WorkflowPaths(workflow_dir).driver.secrets.read_text())
    return {name: value for name, value in raw.items() if value is not None}


def write_outcome(workflow_dir: Path, ok: bool, value: Any, tb_text: str = "") -> None:
    """Seal the body's return value (``ok``) or its exception (with ``tb_text``, its
    traceback) with the workflow's key into ``driver/outcome.bin``, atomically.

    A value that does not pickle is written as the error saying so.
    """
    paths = WorkflowPaths(workflow_dir)
    files = paths.driver
    if ok:
        try:
            body, status = dumps_value(value, "the body's return value", 1 << 62), "ok"
        except Exception as exc:
            import traceback

            body, status = (
                dumps_value(error_body(exc, traceback.format_exc()), "", 1 << 62),
                "error",
            )
    else:
        body, status = (
            dumps_value(error_body(value, tb_text), "the body's exception", 1 << 62),
            "error",
        )
    header = {"kind": "driver-outcome", "workflow": paths.workflow_id, "status": status}
    tmp = files.outcome.with_name(f".outcome.{os.getpid()}.tmp")
    write_private(tmp, seal(header, body, paths.hmac_key.read_bytes()))
    os.replace(tmp, files.outcome)


# --- readers: following a driver ----------------------------------------------------------


class Driver:
    """The driver of the workflow in ``workflow_dir``, as a reader follows it.

    Its :attr:`status` is ``running`` (or ``starting``), ``finished``, ``failed``
    (the body raised) or ``lost`` (it ended without an outcome); :meth:`result`
    waits for the body's value.
    """

    def __init__(self, workflow_dir: Path) -> None:
        self.paths = WorkflowPaths(Path(workflow_dir))
        self.files = self.paths.driver

    @classmethod
    def of(cls, workflow_dir: Path) -> Driver | None:
        """Return the driver of the workflow in ``workflow_dir``; None if it has none."""
        driver = cls(workflow_dir)
        return driver if driver.files.body.is_file() else None

    @property
    def where(self) -> dict[str, Any]:
        """Where it runs (``{}`` while it is being launched)."""
        try:
            return json.loads(self.files.where.read_text())
        except (OSError, ValueError):
            return {}

    def outcome(self) -> tuple[bool, Any] | None:
        """Return ``(True, value)`` or ``(False, exception)`` once the body ended, else None.

        The outcome is verified with the workflow's key before it is unpickled.

        Raises:
            IntegrityError: the outcome file does not verify (forged or corrupted).
        """
        try:
            data = self.files.outcome.read_bytes()
        except FileNotFoundError:
            return None
        header, body = open_envelope(data, self.paths.hmac_key.read_bytes())
        if (
            header.get("kind") != "driver-outcome"
            or header.get("workflow") != self.paths.workflow_id
        ):
            raise IddsFatError(
                f"{self.files.outcome} is not the outcome of {self.paths.workflow_id}"
            )
        return decode_result(header, body)

    def alive(self) -> bool:
        """Whether the driver may still run (True when that cannot be told from here)."""
        where = self.where
        if where.get("kind") == "slurm":
            return _slurm_listed(str(where["slurm_job"]))
        if where and where.get("host") != socket.gethostname():
            return True  # its lock is on another host's view of the file system
        return _locked(self.files.lock)

    @property
    def status(self) -> str:
        """``starting``, ``running``, ``finished``, ``failed`` or ``lost``."""
        if not self.files.outcome.is_file():
            if self.alive():
                return "running" if self.where else "starting"
            if not self.files.outcome.is_file():  # it may have written it as it ended
                return "lost"
        try:
            outcome = self.outcome()
        except Exception:  # unreadable or forged: not a success
            return "failed"
        return "finished" if outcome and outcome[0] else "failed"

    def describe(self) -> str:
        """One line: where it runs and its status (for ``idds-fat status``)."""
        where = self.where
        return f"{self.status}, {_where_text(where) if where else 'being launched'}"

    def lost(self) -> JobLostError:
        """Return the error of a driver that ended without an outcome: how it ended,
        and the last lines of its stderr."""
        where = self.where
        status = None
        try:
            status = int(self.files.exit_status.read_text().strip())
        except (OSError, ValueError):
            pass
        if where.get("kind") == "slurm":
            reason, status = _slurm_end(str(where["slurm_job"]), status)
        elif status is not None and status < 0:
            import signal

            reason = f"its process was killed by {signal.Signals(-status).name}"
        else:
            reason = "its process ended without writing the body's outcome"
        tail = read_tail(self.files.stderr, lines=20, max_bytes=16384)
        return JobLostError(
            f"driver of workflow {self.paths.workflow_id} ({_where_text(where)})",
            status,
            reason,
            tail or "",
            str(self.files.stderr) if tail is not None else None,
        )

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the body to end; return its value.

        Raises:
            Exception: what the body raised, with its remote traceback as ``__cause__``.
            JobLostError: the driver ended without an outcome (killed, crashed).
            TimeoutError: it had not ended after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.02
        ceiling = _POLL_MAX.get(self.where.get("kind", "local"), 0.5)
        while True:
            outcome = self.outcome()
            if outcome is None and not self.alive():
                outcome = self.outcome()  # it may have written it as it ended
                if outcome is None:
                    raise self.lost()
            if outcome is not None:
                ok, value = outcome
                if ok:
                    return value
                raise value
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the driver of workflow {self.paths.workflow_id} had not ended after "
                    f"{timeout:g} s; it runs on"
                )
            pause = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(pause, 0.0))  # polling a file another process writes
            interval = min(interval * 1.5, ceiling)


def _locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _slurm(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _slurm_listed(job: str) -> bool:
    """Whether ``squeue`` still lists the job (True when Slurm does not answer)."""
    done = _slurm(["squeue", "-h", "-j", job, "-o", "%T"])
    if done is None:
        return True
    if done.returncode != 0:
        return "Invalid job id" not in done.stderr
    return bool(done.stdout.strip())


def _slurm_end(job: str, status: int | None) -> tuple[str, int | None]:
    """How Slurm says the job ended, and its exit status (signal: negative)."""
    done = _slurm(["scontrol", "show", "job", "-o", job])
    if done is None or done.returncode != 0 or "JobState=" not in done.stdout:
        return f"Slurm job {job} left the queue without the body's outcome", status
    fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
    code, _, signal_number = fields.get("ExitCode", "").partition(":")
    if signal_number.isdigit() and int(signal_number):
        status = -int(signal_number)
    elif code.isdigit():
        status = int(code)
    return (
        f"Slurm job {job} ended in state {fields.get('JobState', '?')} "
        f"(exit code {fields.get('ExitCode', '?')}) without the body's outcome",
        status,
    )
