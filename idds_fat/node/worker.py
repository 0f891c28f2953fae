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
from typing import TYPE_CHECKING

from .deliver import close_stomp_connections, deliver, keep_stomp_connections, reply_message
from .envelope import sha256_hex
from .environments import own_file, rerun_environment
from .errors import EXIT_UNDELIVERED, EXIT_UNREPORTED, DeliveryError, IntegrityError, WrapperError
from .fetch import load_spec
from .pilot import SlotWorker, split_devices
from .run import WarmState, run_job
from .spec import JobSpec, secrets_json, secrets_pipe

if TYPE_CHECKING:  # loaded by the functions using it: a cold job never does (~3 ms)
    from pathlib import Path


def _needs_own_process(spec: JobSpec) -> bool:
    """Whether a job must run in an interpreter of its own (another environment)."""
    environment = spec.environment or {"kind": "current"}
    return environment.get("kind", "current") != "current" or bool(spec.init_env)


def _run_in_child(location: str, secrets: dict, workdir: str) -> int:
    """Run one job cold, as a child process, handing it the secrets on a pipe."""
    import subprocess

    argv = [sys.executable, own_file(), "--spec", location]
    fd = secrets_pipe(secrets_json(secrets))
    try:
        return subprocess.call(argv, cwd=workdir, env=rerun_environment(fd, ""), pass_fds=(fd,))
    finally:
        os.close(fd)


def inline_spec(text: str, key: str) -> bytes:
    """Return the job spec sent inline with a job (its JSON ``text``) if its sha256 is
    ``key``, as a spec read from the cache is checked against its name.

    Raises IntegrityError when it is not.
    """
    data = text.encode()
    if sha256_hex(data) != key:
        raise IntegrityError(f"the job spec sent with the job does not match its sha256 {key}")
    return data


def _keep_spec(workdir: str, key: str, data: bytes) -> str:
    """Write a checked inline spec into the job's dir, named by its key (a child checks
    it again), for a job run in a process of its own: the cache may not hold it yet."""
    path = os.path.join(workdir, key)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
    return path


def _run_warm_job(
    location: str,
    secrets: dict,
    workdir: str,
    reply: bool,
    warm: WarmState,
    rundir: str | None = None,
    inline: tuple[str, str] | None = None,
) -> tuple[int, bytes | None, JobSpec | None]:
    """Run one job in this worker, in ``rundir`` (default: ``workdir``); return
    ``(exit status, message, spec)``.

    With ``inline`` (the spec's JSON and its key, sent with the job), the spec is
    that text, checked against the key; else it is read from ``location``. With
    ``reply``, the result is not delivered: the message that carries it (the
    envelope, or a reference to it in the cache when large) is returned for the
    caller, who is at the other end of this worker's pipe.
    """
    try:
        if inline is not None:
            data = inline_spec(*inline)
            spec = JobSpec.from_json(inline[0])  # the text checked: JSON reads a str faster
        else:
            spec = load_spec(location, secrets["token"])
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED, None, None
    if _needs_own_process(spec):
        _private_job_dir(workdir)  # a cold job runs in its work dir
        if inline is not None:
            location = _keep_spec(workdir, inline[1], data)
        return _run_in_child(location, secrets, workdir), None, None
    envelope = run_job(spec, secrets, rundir or workdir, warm)
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


def _append_private(path: str):
    # 0600 whatever the umask: a job's output can hold what only its user may read.
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


class _Spool:
    """A warm worker's own output files, ``DIR/stdout.txt`` and ``DIR/stderr.txt``
    (0600), opened once: each job writes there, and only a job that printed
    something gets files of its own (creating a file costs more than a small job).
    ``DIR/job`` names the work dir of the job running now, so that the caller of a
    worker that died knows whether it took the job and where its output is."""

    def __init__(self, directory: str) -> None:
        flags = os.O_RDWR | os.O_CREAT
        # O_APPEND: after a truncation the next write, a child's included, starts at 0.
        out, err = os.path.join(directory, "stdout.txt"), os.path.join(directory, "stderr.txt")
        self.out = os.open(out, flags | os.O_APPEND | os.O_TRUNC, 0o600)
        self.err = os.open(err, flags | os.O_APPEND | os.O_TRUNC, 0o600)
        self.job = os.open(os.path.join(directory, "job"), flags | os.O_TRUNC, 0o600)
        self._named = 0  # the length of the name in ``job``

    def start(self, workdir: str) -> None:
        name = os.fsencode(workdir)
        os.pwrite(self.job, name, 0)
        # Jobs of a task have names of one length mostly: truncating to the same length
        # is a system call (~6 us) that changes nothing.
        if len(name) < self._named:
            os.ftruncate(self.job, len(name))
        self._named = len(name)

    def keep(self, workdir: str) -> None:
        """Copy what the job printed into its own files, creating its dir only then."""
        for fd, name in ((self.out, "stdout.txt"), (self.err, "stderr.txt")):
            size = os.fstat(fd).st_size
            if not size:
                continue
            _private_job_dir(workdir)
            with _append_private(os.path.join(workdir, name)) as target:
                offset = 0
                while offset < size:
                    chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
                    if not chunk:
                        break
                    target.write(chunk)
                    offset += len(chunk)
            os.ftruncate(fd, 0)


_spools: dict[str, _Spool] = {}  # by directory: a worker's spool, opened on its first job


def _private_job_dir(workdir: str) -> None:
    try:
        os.mkdir(workdir, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:  # its task dir too (the caller makes that one, 0700)
        os.makedirs(workdir, 0o700, exist_ok=True)
    os.chmod(workdir, 0o700)  # whatever the umask (the job may have changed it)


def _run_command(
    command: dict, secrets: dict, idle: tuple[int, int], warm: WarmState
) -> tuple[int, bytes | None, JobSpec | None]:
    """Run one job of a warm session, its output in its work dir's files.

    With ``command["spool"]`` (a warm worker of the local backend), the output goes
    to that spool first and the work dir is created only if the job printed
    something or runs in a process of its own; the job runs in this worker's own
    directory then. Without it (a pack), the work dir and its files are created
    first and the job runs there.
    """
    # Strings, not Paths, on this path: it runs once a job (a Path costs microseconds).
    workdir = command["workdir"]
    home = os.getcwd()
    spool = None
    spool_dir = command.get("spool")
    if spool_dir:
        spool = _spools.get(spool_dir)
        if spool is None:
            spool = _spools[spool_dir] = _Spool(spool_dir)
        spool.start(workdir)
        _point_output_at(spool.out, spool.err)
        rundir = home
    else:
        os.makedirs(workdir, 0o700, exist_ok=True)
        with (
            _append_private(os.path.join(workdir, "stdout.txt")) as out,
            _append_private(os.path.join(workdir, "stderr.txt")) as err,
        ):
            _point_output_at(out.fileno(), err.fileno())
        rundir = workdir
    try:
        if rundir != home:
            os.chdir(rundir)
        reply = bool(command.get("reply"))
        inline = None
        if command.get("spec_json") is not None:
            inline = (command["spec_json"], str(command.get("spec_key")))
        return _run_warm_job(command["spec"], secrets, workdir, reply, warm, rundir, inline)
    except Exception:  # a bug of ours must not end the session silently
        import traceback

        traceback.print_exc()
        return EXIT_UNREPORTED, None, None
    finally:
        os.chdir(home)
        _point_output_at(*idle)
        if spool is not None:
            try:
                spool.keep(workdir)
            except Exception as exc:  # its result counts more than its output
                print(f"idds-fat wrapper: cannot keep the job's output: {exc}", file=sys.stderr)


class ProcessState:
    """The process-wide state a job of a warm worker may change and the next job must
    not inherit: resource limits, umask, environment variables, Python's signal
    handlers, ``sys.path``, the recursion limit, the switch interval, CPU affinity,
    niceness, user and group ids. (The current directory and descriptors 1 and 2 are put back by
    ``_run_command``; imported modules and their state stay, which is what a warm
    worker is for.)

    A warm worker takes one snapshot and restores it after every job: once
    ``restore`` returned nothing, the state equals the snapshot again.
    """

    def __init__(self) -> None:
        # _signal, not signal: the latter's enum conversions cost a millisecond per job.
        import _signal
        import resource

        named = {}  # an alias (RLIMIT_OFILE is RLIMIT_NOFILE) read once, by its first name
        for name in dir(resource):
            if name.startswith("RLIMIT_"):
                named.setdefault(getattr(resource, name), name)
        self._resources = tuple(named)  # the limits' numbers, in the order of their names
        self.limits = {name: resource.getrlimit(which) for which, name in named.items()}
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        # The encoded mapping: copying it decodes nothing (os.environ's own store).
        self.environ = dict(os.environ._data)  # type: ignore[attr-defined]
        self.handlers = {}
        for signum in _signal.valid_signals():
            try:
                self.handlers[signum] = _signal.getsignal(signum)
            except (OSError, ValueError):
                pass
        self.path = list(sys.path)
        self.recursion_limit = sys.getrecursionlimit()
        self.switch_interval = sys.getswitchinterval()
        self.affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.niceness = os.getpriority(os.PRIO_PROCESS, 0)
        self.ids = (os.getresuid(), os.getresgid(), os.getgroups())

    @classmethod
    def capture(cls) -> ProcessState:
        """Take a snapshot of the state now (a warm worker: before its first job)."""
        return cls()

    def restore(self, memory_limited: bool = False) -> list[str]:
        """Put the snapshot back; return what could not be (then the worker must go).

        ``memory_limited``: the job ran under ``limit_memory``, whose limit is
        lifted here without counting as a change the job made.
        """
        import _signal
        import resource

        kept: list[str] = []
        # Each check reads everything at once first (C loops, ~15 us for all of them): a
        # job mostly changes nothing, and then the slow loops below never run.
        if list(map(resource.getrlimit, self._resources)) != list(self.limits.values()):
            self._restore_limits(memory_limited, kept)
        os.umask(self.umask)
        if os.environ._data != self.environ:  # type: ignore[attr-defined]
            os.environ.clear()
            os.environ.update({os.fsdecode(k): os.fsdecode(v) for k, v in self.environ.items()})
        try:
            handlers_changed = list(map(_signal.getsignal, self.handlers)) != list(
                self.handlers.values()
            )
        except (OSError, ValueError):
            handlers_changed = True
        if handlers_changed:
            for signum, handler in self.handlers.items():
                try:
                    if handler is not None and _signal.getsignal(signum) != handler:
                        _signal.signal(signum, handler)
                except (OSError, ValueError):
                    kept.append(f"the handler of signal {signum}")
        sys.path[:] = self.path
        sys.setrecursionlimit(self.recursion_limit)
        sys.setswitchinterval(self.switch_interval)
        if self.affinity is not None and os.sched_getaffinity(0) != self.affinity:
            try:
                os.sched_setaffinity(0, self.affinity)
            except OSError:
                kept.append("its CPU affinity")
        if (os.getresuid(), os.getresgid(), os.getgroups()) != self.ids:
            try:
                (ruid, euid, suid), (rgid, egid, sgid), groups = self.ids
                os.setgroups(groups)
                os.setresgid(rgid, egid, sgid)
                os.setresuid(ruid, euid, suid)
            except OSError:  # a job that gave up its privileges cannot take them back
                kept.append("its user or group ids")
        if os.getpriority(os.PRIO_PROCESS, 0) != self.niceness:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, self.niceness)
            except OSError:  # lowering niceness again takes privilege
                kept.append("its niceness")
        return kept

    def _restore_limits(self, memory_limited: bool, kept: list[str]) -> None:
        import resource

        for (name, limits), which in zip(self.limits.items(), self._resources, strict=True):
            if resource.getrlimit(which) == limits:
                continue
            try:
                resource.setrlimit(which, limits)
            except (OSError, ValueError):  # a lowered hard limit goes back only for root
                kept.append(name)
                continue
            if not (memory_limited and name == "RLIMIT_AS"):
                print(f"idds-fat wrapper: the job changed {name}; set back", file=sys.stderr)


def limit_memory(memory_mb: int | None) -> bool:
    """Cap this process's address space (``RLIMIT_AS``) at ``memory_mb`` MiB for a job.

    Returns whether a limit was set (``ProcessState.restore`` lifts it). The
    cap counts virtual memory, the interpreter's own included; the hard limit
    is left as it is, so the cap can be lifted again.
    """
    if not memory_mb:
        return False
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(memory_mb) * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return True


class _WarmSession:
    """The ``WarmState`` of a ``with`` block: what its jobs keep (objects and context).

    Its files live in a new directory under ``parent`` (default: the system's
    temporary directory), removed when the block ends.
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        self.parent = parent

    def __enter__(self) -> WarmState:
        import tempfile
        from pathlib import Path

        self.root = Path(tempfile.mkdtemp(prefix="idds-fat-worker-", dir=self.parent))
        self.warm = WarmState(self.root)
        return self.warm

    def __exit__(self, *exc_info) -> None:
        import shutil

        self.warm.leave_context()
        shutil.rmtree(self.root, ignore_errors=True)


def _deliver_after_all(message: bytes | None, spec: JobSpec | None, secrets: dict) -> None:
    """Deliver a result the caller did not record, through the usual channels."""
    if message is None or spec is None:
        return
    try:
        deliver(message, spec, secrets)
    except DeliveryError as exc:
        print(f"idds-fat wrapper: {exc}", file=sys.stderr)


def serve_worker(secrets: dict) -> int:
    """Run jobs one after another as the caller sends them; return 0 when it stops sending.

    Protocol, one JSON object per line: the caller writes
    ``{"spec": LOCATION, "workdir": DIR, "reply": BOOL}`` (and optionally
    ``"memory_mb": N``, ``"spool": SPOOL``, and ``"spec_json": TEXT, "spec_key":
    SHA256``: the spec itself, run if its sha256 is that key, else refused, with
    no read of LOCATION, which the caller may still be writing) to stdin; the worker runs the job
    in ``DIR`` (its stdout and stderr in ``DIR/stdout.txt`` and ``DIR/stderr.txt``;
    with a spool, in the worker's own directory, its output written to
    ``SPOOL/stdout.txt`` and ``SPOOL/stderr.txt`` and copied to ``DIR`` only when
    not empty, ``SPOOL/job`` naming ``DIR`` while it runs) and answers
    ``{"exit": STATUS}`` on its original stdout, with ``"recycle": true`` when
    the job changed process state that cannot be put back (the worker exits
    after this answer, once its results are acknowledged). Without ``reply`` it
    delivers the result as a cold job would; with it, the answer also carries
    the signed result message, base64-encoded, as ``"result"`` (the caller
    verifies it like any other), and the caller must then answer
    ``{"ack": true}`` once it has recorded the result durably, or
    ``{"ack": false}`` when it could not. Acks come in the order of the answers
    that carried results, and may come after the next command: a caller can
    send job N+1 before it records job N's result, so that the worker never
    waits for the caller's bookkeeping (the caller needs no more than one job
    ahead). Until its ack a result is not delivered: on a false ack, or end of
    input before the ack (the caller died, even with the answer unread in the
    pipe), or an answer that cannot be written, the worker delivers it the
    usual way (STOMP, REST). End of input ends the worker, after the job it is
    running.
    """
    control = os.fdopen(os.dup(1), "w", buffering=1)
    stderr = os.dup(2)
    idle = (stderr, stderr)  # between jobs everything goes to our stderr
    _point_output_at(*idle)
    sys.stdin = open(os.devnull)  # jobs must not read the control channel
    commands = os.fdopen(os.dup(0), "r")
    os.dup2(sys.stdin.fileno(), 0)
    # Results answered and not yet acknowledged, oldest first: (message, spec).
    unacked: list[tuple[bytes, JobSpec | None]] = []

    def take_ack(ack: dict) -> None:
        message, spec = unacked.pop(0)
        if not ack["ack"]:
            # The caller could not record it: it goes out the usual way.
            _deliver_after_all(message, spec, secrets)

    keep_stomp_connections()  # one broker connection for all the jobs of this worker
    # The caller starts each worker in a directory of its own, which it removes
    # should it have to kill the worker: nothing is left behind in /tmp.
    with _WarmSession(os.getcwd()) as warm:
        # One snapshot for all the jobs: after each, restore puts it back, or the worker
        # recycles (it found what it could not put back).
        state = ProcessState.capture()
        while line := commands.readline():
            command = json.loads(line)
            if "ack" in command:
                if unacked:
                    take_ack(command)
                continue
            memory_limited = limit_memory(command.get("memory_mb"))
            try:
                status, message, spec = _run_command(command, secrets, idle, warm)
            finally:
                kept = state.restore(memory_limited)
            answer: dict = {"exit": status}
            if message is not None:
                answer["result"] = binascii.b2a_base64(message, newline=False).decode()
                unacked.append((message, spec))
            if kept:
                print(
                    f"idds-fat wrapper: the job changed {', '.join(kept)}; recycling the worker",
                    file=sys.stderr,
                )
                answer["recycle"] = True
            try:
                control.write(json.dumps(answer) + "\n")
            except OSError:  # the caller is gone: its results must still get out
                break
            if kept:
                # Wait for the acks still due; the caller sends no more jobs here.
                while unacked and (line := commands.readline()):
                    if "ack" in (ack := json.loads(line)):
                        take_ack(ack)
                break
        # Written to the pipe is not received: the caller died (or closed our input)
        # before recording these.
        for message, spec in unacked:
            _deliver_after_all(message, spec, secrets)
    close_stomp_connections()
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


def pack_slots(environ: dict | None = None) -> int:
    """How many jobs a packed element runs at once: the cores Slurm gave each of its
    tasks (``SLURM_CPUS_PER_TASK``, set by ``--cpus-per-task``), else 1."""
    environ = os.environ if environ is None else environ
    try:
        return max(1, int(environ.get("SLURM_CPUS_PER_TASK") or 1))
    except ValueError:
        return 1


def run_pack(jobs: list[dict], secrets: dict, slots: int | None = None) -> int:
    """Run several jobs, each delivering its result as soon as it is done.

    With one slot (``slots``, default :func:`pack_slots`: the element's cores),
    the jobs run one after another in this one process; with more, that many
    at a time, each slot a warm worker of its own as in a pilot
    (:func:`_run_pack_in_slots`). Each job's exit status goes to
    ``exit_status`` in its work dir (so a batch system that sees one process
    still learns how each job ended); returns 0 when all of them delivered,
    else the first non-zero status.
    """
    if not jobs:
        return 0
    slots = min(slots or pack_slots(), len(jobs))
    if slots > 1:
        return _run_pack_in_slots(jobs, secrets, slots)
    from pathlib import Path

    idle = (os.dup(1), os.dup(2))
    worst = 0
    # The pack's files (its extracted code context) go in its first job's dir:
    # killed by the batch system, it leaves them there, not in the node's /tmp.
    first = Path(jobs[0]["workdir"])
    first.mkdir(parents=True, exist_ok=True)
    keep_stomp_connections()  # one broker connection for the whole pack
    try:
        with _WarmSession(first) as warm:
            for command in jobs:
                status, _, _ = _run_command(command, secrets, idle, warm)
                if status in _ENDED_BY_SIGTERM:
                    # The batch system is ending this pack (scancel, walltime) and signals
                    # the deepest processes first: a job run as a child dies before this
                    # process hears of it. Stop here: a next job's child would escape the
                    # kill, and an exit status of -15 would hide the scheduler's own
                    # account of the end.
                    return status
                Path(command["workdir"], "exit_status").write_text(f"{status}\n")
                worst = worst or status
    finally:
        close_stomp_connections()
    return worst


def _run_pack_in_slots(jobs: list[dict], secrets: dict, slots: int) -> int:
    """Run a pack's jobs ``slots`` at a time: each slot a thread feeding a warm worker
    (``pilot.SlotWorker``) the next job not yet taken, GPUs in ``CUDA_VISIBLE_DEVICES``
    split among the slots. Stops taking jobs once one was ended by SIGTERM (the batch
    system is ending the element) and returns that status."""
    import threading
    from collections import deque
    from pathlib import Path

    first = Path(jobs[0]["workdir"])
    first.mkdir(parents=True, exist_ok=True)
    waiting = deque(jobs)
    lock = threading.Lock()
    statuses: list[int] = []  # non-zero ones, in the order they came
    ended = threading.Event()
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    shares = split_devices(devices, slots) if devices else [None] * slots

    def slot(k: int) -> None:
        # The worker's own files go in the pack's first job's dir, as a pack's do.
        worker = SlotWorker(secrets, first / f"pack-slot-{k}", shares[k])
        try:
            while not ended.is_set():
                with lock:
                    job = waiting.popleft() if waiting else None
                if job is None:
                    break
                worker.send({**job, "reply": False})
                answer = worker.receive()
                if answer.status in _ENDED_BY_SIGTERM:
                    ended.set()  # as run_pack: no job left to escape the kill
                    with lock:
                        statuses.insert(0, answer.status)
                    break
                Path(job["workdir"], "exit_status").write_text(f"{answer.status}\n")
                if answer.status:
                    with lock:
                        statuses.append(answer.status)
                if answer.recycle:
                    worker.retire()
        finally:
            worker.stop()
            try:
                worker.directory.rmdir()  # its session removed what it held
            except OSError:
                pass

    threads = [threading.Thread(target=slot, args=(k,), name=f"slot-{k}") for k in range(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses[0] if statuses else 0
