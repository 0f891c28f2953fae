"""Many jobs in one interpreter: a warm worker (jobs sent on stdin) and a pack (a jobs file).

Both keep verified cache objects and the extracted code context between jobs
(``WarmState``), point each job's output at its own work dir, and hand each
result on as soon as its job is done.
"""

from __future__ import annotations

import binascii
import json
import os
import sys
from pathlib import Path

from .deliver import deliver, reply_message
from .environments import own_file, secrets_environment
from .errors import EXIT_UNDELIVERED, EXIT_UNREPORTED, DeliveryError, WrapperError
from .fetch import load_spec
from .run import WarmState, run_job
from .spec import JobSpec


def _needs_own_process(spec: JobSpec) -> bool:
    """Whether a job must run in an interpreter of its own (another environment)."""
    environment = spec.environment or {"kind": "current"}
    return environment.get("kind", "current") != "current" or bool(spec.init_env)


def _run_in_child(location: str, secrets: dict, workdir: Path) -> int:
    """Run one job cold, as a child process, handing it the secrets in its environment."""
    import subprocess

    argv = [sys.executable, own_file(), "--spec", location]
    return subprocess.call(argv, cwd=workdir, env=secrets_environment(secrets, ""))


def _run_warm_job(
    location: str, secrets: dict, workdir: Path, reply: bool, warm: WarmState
) -> tuple[int, bytes | None, JobSpec | None]:
    """Run one job in this worker; return ``(exit status, message, spec)``.

    With ``reply``, the result is not delivered: the message that carries it
    (the envelope, or a reference to it in the cache when large) is returned
    for the caller, who is at the other end of this worker's pipe.
    """
    try:
        spec = load_spec(location, secrets["token"])
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED, None, None
    if _needs_own_process(spec):
        return _run_in_child(location, secrets, workdir), None, None
    envelope = run_job(spec, secrets, workdir, warm)
    try:
        if reply:
            return 0, reply_message(envelope, spec, secrets), spec
        deliver(envelope, spec, secrets)
    except WrapperError as exc:
        print(f"idds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNDELIVERED, None, None
    return 0, None, None


def _point_output_at(stdout_fd: int, stderr_fd: int) -> None:
    # At the descriptor level, so that child processes and C code write there too.
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)


def _run_command(
    command: dict, secrets: dict, idle: tuple[int, int], warm: WarmState
) -> tuple[int, bytes | None, JobSpec | None]:
    """Run one job of a warm session in its work dir, its output in that dir's files."""
    workdir = Path(command["workdir"])
    home = Path.cwd()
    workdir.mkdir(parents=True, exist_ok=True)
    with (
        open(workdir / "stdout.txt", "ab") as out,
        open(workdir / "stderr.txt", "ab") as err,
    ):
        _point_output_at(out.fileno(), err.fileno())
    try:
        os.chdir(workdir)
        reply = bool(command.get("reply"))
        return _run_warm_job(command["spec"], secrets, workdir, reply, warm)
    except Exception:  # a bug of ours must not end the session silently
        import traceback

        traceback.print_exc()
        return EXIT_UNREPORTED, None, None
    finally:
        os.chdir(home)
        _point_output_at(*idle)


class _WarmSession:
    """The ``WarmState`` of a ``with`` block: what its jobs keep (objects and context).

    Its files live in a new directory under ``parent`` (default: the system's
    temporary directory), removed when the block ends.
    """

    def __init__(self, parent: Path | None = None) -> None:
        self.parent = parent

    def __enter__(self) -> WarmState:
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="idds-fat-worker-", dir=self.parent))
        self.warm = WarmState(self.root)
        return self.warm

    def __exit__(self, *exc_info) -> None:
        import shutil

        self.warm.leave_context()
        shutil.rmtree(self.root, ignore_errors=True)


def serve_worker(secrets: dict) -> int:
    """Run jobs one after another as the caller sends them; return 0 when it stops sending.

    Protocol, one JSON object per line: the caller writes
    ``{"spec": LOCATION, "workdir": DIR, "reply": BOOL}`` to stdin; the worker
    runs the job in ``DIR`` (its stdout and stderr in ``DIR/stdout.txt`` and
    ``DIR/stderr.txt``) and answers ``{"exit": STATUS}`` on its original stdout.
    Without ``reply`` it delivers the result as a cold job would; with it, the
    answer also carries the signed result message, base64-encoded, as
    ``"result"`` (the caller verifies it like any other). If that answer cannot
    be written (the caller died), the result is delivered the usual way. End
    of input ends the worker, after the job it is running.
    """
    control = os.fdopen(os.dup(1), "w", buffering=1)
    stderr = os.dup(2)
    idle = (stderr, stderr)  # between jobs everything goes to our stderr
    _point_output_at(*idle)
    sys.stdin = open(os.devnull)  # jobs must not read the control channel
    commands = os.fdopen(os.dup(0), "r")
    os.dup2(sys.stdin.fileno(), 0)
    # The caller starts each worker in a directory of its own, which it removes
    # should it have to kill the worker: nothing is left behind in /tmp.
    with _WarmSession(Path.cwd()) as warm:
        for line in commands:
            status, message, spec = _run_command(json.loads(line), secrets, idle, warm)
            answer = {"exit": status}
            if message is not None:
                answer["result"] = binascii.b2a_base64(message, newline=False).decode()
            try:
                control.write(json.dumps(answer) + "\n")
            except OSError:  # the caller is gone: its result must still get out
                if message is not None and spec is not None:
                    try:
                        deliver(message, spec, secrets)
                    except DeliveryError as exc:
                        print(f"idds-fat wrapper: {exc}", file=sys.stderr)
                break
    return 0


def read_pack(jobs_file: str, pack: str) -> list[dict]:
    """Return the jobs of pack ``pack`` in a jobs file, in order.

    A jobs file has one line per job, ``PACK<TAB>WORKDIR<TAB>SPEC``; relative
    work dirs are relative to the current directory.
    """
    jobs = []
    with open(jobs_file, encoding="utf-8") as handle:
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 3 and fields[0] == pack:
                jobs.append({"workdir": os.path.abspath(fields[1]), "spec": fields[2]})
    return jobs


# How a job's child reports SIGTERM: killed by it, or a shell's 128 + 15.
_ENDED_BY_SIGTERM = (-15, 143)


def run_pack(jobs: list[dict], secrets: dict) -> int:
    """Run several jobs in this one process, each delivering its result as soon as it is done.

    Each job's exit status goes to ``exit_status`` in its work dir (so a batch
    system that sees one process still learns how each job ended); returns 0
    when all of them delivered, else the first non-zero status.
    """
    if not jobs:
        return 0
    idle = (os.dup(1), os.dup(2))
    worst = 0
    # The pack's files (its extracted code context) go in its first job's dir:
    # killed by the batch system, it leaves them there, not in the node's /tmp.
    first = Path(jobs[0]["workdir"])
    first.mkdir(parents=True, exist_ok=True)
    with _WarmSession(first) as warm:
        for command in jobs:
            status, _, _ = _run_command(command, secrets, idle, warm)
            if status in _ENDED_BY_SIGTERM:
                # The batch system is ending this pack (scancel, walltime) and signals the
                # deepest processes first: a job run as a child dies before this process
                # hears of it. Stop here: a next job's child would escape the kill, and an
                # exit status of -15 would hide the scheduler's own account of the end.
                return status
            Path(command["workdir"], "exit_status").write_text(f"{status}\n")
            worst = worst or status
    return worst
