"""The ``local`` backend: jobs run the real wrapper in processes on this machine.

Warm (the default): each of ``max_workers`` long-lived worker processes
(``wrapper --worker``) runs job after job, so the interpreter start, the
wrapper's imports, the payloads of a task and the extracted code context are
paid once per worker. Cold: one new interpreter per job, as on a batch slot.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import threading
from binascii import a2b_base64
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from idds_fat.backends.base import (
    Backend,
    BackendSetup,
    ExitCallback,
    JobExit,
    JobRequest,
    Resources,
    StartCallback,
    killed_by,
)
from idds_fat.backends.gpus import detect_gpus
from idds_fat.config import ENV_PREFIX, SECRET_SETTINGS, Config
from idds_fat.node.environments import ENV_CACHE_ENV
from idds_fat.node.spec import SECRETS_ENV, SECRETS_FD_ENV, secrets_pipe
from idds_fat.workdir import (
    JobPaths,
    WorkflowPaths,
    open_private,
    private_dir,
    process_start,
    worker_spools,
    write_private,
)
from idds_fat.wrapper_source import launch_command

logger = logging.getLogger(__name__)


class _CannotStart(Exception):
    """The interpreter jobs run with could not be executed at all (the message says why)."""


def _popen(argv: list[str], secrets: bytes | None = None, **options: object) -> subprocess.Popen:
    """Start ``argv`` (``secrets`` on a pipe it inherits, named by ``IDDS_FAT_JOB_SECRETS_FD``);
    raise _CannotStart, naming it, when its program cannot be executed."""
    fd = None
    if secrets is not None:
        fd = secrets_pipe(secrets)
        options["env"] = {**options["env"], SECRETS_FD_ENV: str(fd)}  # type: ignore[dict-item]
        options["pass_fds"] = (fd,)
    try:
        return subprocess.Popen(argv, **options)  # type: ignore[call-overload]
    except OSError as exc:
        if exc.filename != argv[0]:  # e.g. the working directory, not the program
            raise
        raise _CannotStart(
            f"the interpreter {argv[0]} could not be started: {exc.strerror or exc}"
        ) from None
    finally:
        if fd is not None:
            os.close(fd)


def _ended_before_start(python: str, returncode: int, between_jobs: bool = False) -> str:
    """Why a job is lost whose interpreter ended before the job started."""
    how = f"was {killed_by(returncode)}" if returncode < 0 else "exited"
    if between_jobs:  # it had run others: not a start-up failure
        return f"its warm worker (the interpreter {python}) {how} before the job started"
    return f"the interpreter {python} {how} before the job started"


class _JobThreads:
    """Up to ``size`` daemon threads that run the calls given to ``submit``, in order.

    Not a ``ThreadPoolExecutor``: the interpreter joins its threads at exit, so
    a caller that detached (or exits) would wait for every job those threads
    still follow, though the jobs run on without it. A thread may also take the
    next queued call itself (``take_next``), to hand a warm worker its next job
    before it is done with the last one.
    """

    def __init__(self, size: int, prefix: str) -> None:
        self._size = size
        self._prefix = prefix
        self._calls: collections.deque[tuple[Callable[..., None], tuple]] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # threads waiting for a call
        self._changed = threading.Condition(threading.Lock())
        self._stopped = False

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` on a free thread (starting one if fewer are waiting than
        calls are queued and there are fewer than ``size``). Raises RuntimeError after
        ``shutdown``."""
        with self._changed:
            if self._stopped:
                raise RuntimeError("the local backend is shut down")
            self._calls.append((fn, args))
            if len(self._calls) > self._waiting and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._changed.notify()

    def take_next(self, fn: Callable[..., None]) -> tuple | None:
        """Take the next queued call if it is a call of ``fn``; return its arguments
        (the caller runs it now), else None."""
        with self._changed:
            if self._calls and self._calls[0][0] == fn:
                return self._calls.popleft()[1]
            return None

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._calls and not self._stopped:
                    self._waiting += 1
                    self._changed.wait()
                    self._waiting -= 1
                if not self._calls:
                    return
                fn, args = self._calls.popleft()
            try:
                fn(*args)
            except BaseException:  # the thread must go on serving
                logger.exception("a local backend thread failed")

    def shutdown(self, wait: bool = True, cancel_calls: bool = False) -> None:
        """Take no more calls; drop those not started if ``cancel_calls``; with
        ``wait``, return once every call taken has run."""
        with self._changed:
            self._stopped = True
            threads = list(self._threads)
            if cancel_calls:
                self._calls.clear()
            self._changed.notify_all()
        if wait:
            for thread in threads:
                thread.join()


class _WarmWorker:
    """One ``wrapper --worker`` process: it reads job commands on stdin, answers on stdout.

    It runs in ``home`` (its files go there) and logs to ``home.log``. Its jobs
    print to its spool, ``home.spool/stdout.txt`` and ``stderr.txt``, which it
    copies into a job's own files only when the job printed something;
    ``home.spool/job`` names the work dir of the job it runs. An
    answer that carries a result leaves the worker ``unacked`` until ``ack``:
    it delivers that result itself unless told the caller recorded it. The next
    job may be sent before that ack (``send``, then ``receive`` its answer).
    """

    def __init__(
        self, argv: list[str], env: Mapping[str, str], home: Path, secrets: bytes | None = None
    ) -> None:
        self.home = home
        self.log = home.with_name(home.name + ".log")
        self.spool = JobPaths(home.with_name(home.name + ".spool"))
        self.jobs_run = 0  # jobs it answered for
        self.unacked = 0  # answers that carried a result not yet acknowledged
        self.recycle = False  # its last job changed process state it could not put back
        private_dir(home)
        private_dir(self.spool.root)
        with open_private(self.log, append=True) as log:
            self.proc = _popen(
                argv,
                secrets,
                cwd=home,
                env=dict(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # its own process group, so cancel kills children too
            )
        # Who it is, for a later caller: should this caller die between handing it a
        # job and recording that, the job's record says queued while the worker runs
        # it (LocalBackend.adopt_unrecorded). Removed when it is reaped.
        self.pid_file = _worker_pid_file(self.spool)
        _write_process_file(self.pid_file, self.proc.pid)

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def send(self, job: JobRequest, reply: bool) -> bool:
        """Hand ``job`` to the worker (with ``reply``, its result comes back here, to
        be acked with ``ack``); return False if the worker is gone. It may still be
        running the job before: it reads this one when done."""
        command: dict[str, object] = {
            "spec": job.spec_location,
            "workdir": os.fspath(job.workdir),
            "reply": reply,
            "spool": str(self.spool.root),
        }
        if job.resources.memory_mb:
            command["memory_mb"] = job.resources.memory_mb
        if job.spec_json is not None:
            # The worker checks it against its key and reads no spec from the cache.
            command["spec_json"] = job.spec_json
            command["spec_key"] = job.spec_key
        try:
            self.proc.stdin.write((json.dumps(command) + "\n").encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def receive(self) -> JobExit | None:
        """Wait for the answer to the oldest job sent; None if the worker died."""
        try:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
        except (OSError, ValueError):
            return None
        if not line:
            return None
        self.jobs_run += 1
        answer = json.loads(line.decode())
        result = answer.get("result")
        self.unacked += result is not None
        self.recycle = bool(answer.get("recycle"))
        return JobExit(int(answer["exit"]), result=None if result is None else a2b_base64(result))

    def run(self, job: JobRequest, reply: bool) -> JobExit | None:
        """Run ``job`` (``send``, then ``receive``); None if the worker died."""
        if not self.send(job, reply):
            return None
        return self.receive()

    def took(self, job: JobRequest) -> bool:
        """Whether the worker started ``job`` (or had, when it ended): its spool names it."""
        try:
            return (self.spool.root / "job").read_bytes() == os.fsencode(job.workdir)
        except OSError:
            return False

    def keep_output(self, job: JobRequest) -> Path | None:
        """Copy what a job the worker died in printed from the spool into the job's own
        files (the worker could not); return the file that holds its stderr then, or
        None when it printed nothing there."""
        log: Path | None = None
        for spooled, kept in (
            (self.spool.stdout, job.paths.stdout),
            (self.spool.stderr, job.paths.stderr),
        ):
            try:
                data = spooled.read_bytes()
            except OSError:
                continue
            if not data:
                continue
            try:
                private_dir(job.workdir)
                with open_private(kept, append=True) as handle:
                    handle.write(data)
            except OSError:  # the spool is evidence too
                kept = spooled
            if spooled == self.spool.stderr:
                log = kept
        return log

    def ack(self, recorded: bool) -> None:
        """Tell the worker whether the result of the oldest answer not yet acked was
        recorded durably (if not, or if this cannot be said, it delivers the result
        itself)."""
        if not self.unacked:
            return
        self.unacked -= 1
        try:
            self.proc.stdin.write(_ACKS[recorded])  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):  # closed: at end of input it delivers the result
            pass

    def close(self) -> None:
        """Tell the worker to exit after the job it runs (closing its input)."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass

    def reap(self) -> int:
        """Wait for the worker to exit and close our end of its pipes; return its status."""
        returncode = self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.pid_file.unlink(missing_ok=True)
        return returncode


_ACKS = {flag: (json.dumps({"ack": flag}) + "\n").encode() for flag in (True, False)}


class _Sent:
    """A job handed to a warm worker: the worker, and the walltime clock that kills it
    (set ``expired`` first), if the job has a walltime."""

    __slots__ = ("worker", "timer", "expired")

    def __init__(self, worker: _WarmWorker) -> None:
        self.worker = worker
        self.timer: threading.Timer | None = None
        self.expired = False


class LocalBackend(Backend):
    """Runs up to ``max_workers`` jobs at once in processes of this machine.

    Warm mode (``mode="warm"``) keeps one long-lived worker process per slot
    that runs job after job; cold mode starts ``PYTHON WRAPPER --spec SPEC``
    per job. With ``direct_results``, results come straight back instead of
    being posted: over a warm worker's pipe, or in a cold job's
    ``result.reply`` file (left only while the caller that started it lives).
    Either way a job's stdout and stderr end up in ``stdout.txt`` and
    ``stderr.txt`` of its own work dir (a warm worker's jobs print to its spool,
    copied there only when not empty: a silent job has no work dir), and cancelling it kills its
    process group (a warm worker is replaced by a fresh one). A job asking for
    ``gpus=N`` runs cold, waits for N free devices of ``gpus`` and sees only
    them through ``CUDA_VISIBLE_DEVICES``; ``walltime`` kills a job when
    exceeded; ``memory_mb`` caps the job's address space (``RLIMIT_AS``) while
    it runs. ``cores`` is not enforced on this backend. A result handed back
    over a warm worker's pipe counts as delivered only once the workflow
    recorded it (``on_exit`` returned) and the worker was told so; until then
    the worker delivers it itself should the caller die. A worker whose job
    changed process state it could not put back is replaced.
    Each job or worker process gets ``secrets`` (the job secrets' JSON) on a
    pipe it inherits, never in its environment.
    """

    name = "local"
    # jobs_per_worker: warm workers already run many jobs each.
    supported_parameters = frozenset({"gpus", "walltime", "jobs_per_worker", "memory_mb"})

    def __init__(
        self,
        *,
        python: str,
        wrapper_path: Path,
        env: Mapping[str, str],
        on_exit: ExitCallback,
        max_workers: int,
        workers_dir: Path,
        gpus: Sequence[str] = (),
        on_start: StartCallback | None = None,
        mode: str = "warm",
        direct_results: bool = False,
        secrets: Mapping[str, object] | None = None,
    ) -> None:
        if mode not in ("warm", "cold"):
            raise ValueError(f"mode must be 'warm' or 'cold', not {mode!r}")
        self._mode = mode
        self._workers_dir = workers_dir  # warm worker N runs in worker-N/, logs to worker-N.log
        self._direct_results = direct_results
        self._slot = threading.local()  # each pool thread drives at most one warm worker
        self._workers: set[_WarmWorker] = set()
        self._worker_count = 0
        self._python = python
        self._python_status: int | None = None  # how it ran an empty program, once asked
        self._python_probe = threading.Lock()
        self._launch = launch_command(python, wrapper_path)
        self._env = dict(env)
        self._secrets = None if secrets is None else json.dumps(dict(secrets)).encode()
        self._on_exit = on_exit
        self._on_start = on_start
        self._adopted: dict[str, int] = {}  # job id -> pid of a job an earlier caller started
        self._detached = threading.Event()
        self._all_gpus = tuple(gpus)
        self._free_gpus = list(gpus)
        self._lock = threading.Lock()
        self._gpu_freed = threading.Condition(self._lock)
        self._procs: dict[str, subprocess.Popen] = {}
        self._live: set[str] = set()  # submitted and not yet ended
        self._cancelled: set[str] = set()
        self._task_dirs: set[str] = set()  # made by _start_warm
        self._pool = _JobThreads(max_workers, "idds-fat-local")

    @classmethod
    def create(cls, config: Config, setup: BackendSetup) -> LocalBackend:
        """Run ``config.max_workers`` jobs at once with ``config.python``, warm or
        cold as ``config.local_mode`` says (worker logs under the work dir's ``workers/``).

        Jobs get their secrets on a pipe (``IDDS_FAT_JOB_SECRETS_FD``), not this
        process's secret settings (``IDDS_FAT_TOKEN``, ...) in their environment,
        and the GPUs of ``config.gpu_devices`` (else those ``nvidia-smi -L`` lists).
        Their ``IDDS_FAT_ENV_CACHE_DIR`` (which a node's environment sets and which
        wins there) is ``config.env_cache_dir``: the caller's setting, absolute, by
        its precedence, not the variable as this process got it.
        """
        env = dict(os.environ)
        for name in [SECRETS_ENV, *(ENV_PREFIX + s.upper() for s in SECRET_SETTINGS)]:
            env.pop(name, None)
        env.pop(ENV_CACHE_ENV, None)
        if config.env_cache_dir is not None:
            env[ENV_CACHE_ENV] = str(config.env_cache_dir)
        gpus = config.gpu_devices if config.gpu_devices is not None else detect_gpus()
        return cls(
            python=config.python,
            wrapper_path=setup.wrapper_path,
            env=env,
            on_exit=setup.on_exit,
            max_workers=config.max_workers,
            gpus=gpus,
            on_start=setup.on_start,
            mode=config.local_mode,
            workers_dir=WorkflowPaths(setup.work_dir).workers,
            direct_results=setup.direct_results,
            secrets=setup.secrets,
        )

    def check(self, resources: Resources) -> None:
        """Raise ValueError if a job asks for more GPUs than this machine has."""
        wanted = resources.gpus or 0
        if wanted > len(self._all_gpus):
            have = ", ".join(self._all_gpus) or "none"
            raise ValueError(
                f"a job asks for {wanted} GPU(s) but this machine has {len(self._all_gpus)} "
                f"(devices: {have}; set the gpu_devices setting to list them)"
            )

    def runs_inline_specs(self, resources: Resources) -> bool:
        """Whether jobs asking for ``resources`` run in warm workers, which take their
        specs inline: in warm mode, jobs without GPUs (those run cold, from the cache)."""
        return self._mode == "warm" and not resources.gpus

    def submit(self, jobs: Sequence[JobRequest]) -> None:
        """Queue ``jobs``; they start as workers free up."""
        for job in jobs:
            self.check(job.resources)
        with self._lock:
            self._live.update(job.job_id for job in jobs)
        for job in jobs:
            self._pool.submit(self._run, job)

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Drop queued jobs among ``job_ids`` and kill running ones (whole process group)."""
        with self._lock:
            self._cancelled.update(job_ids)
            procs = [self._procs[j] for j in job_ids if j in self._procs]
            adopted = [self._adopted[j] for j in job_ids if j in self._adopted]
            self._gpu_freed.notify_all()
        for proc in procs:
            _kill_group(proc.pid)
        for pid in adopted:
            _kill_group(pid)

    def adopt(self, jobs: Sequence[tuple[JobRequest, str]]) -> None:
        """Watch job processes an earlier caller started (by pid) until they end.

        They are not this process's children, so their exit status is unknown:
        they are reported with ``returncode`` ``None`` and the workflow decides
        by whether their result arrived. Cancelling kills their process group.
        """
        for job, ref in jobs:
            self._follow(job, int(ref))

    def adopt_unrecorded(self, jobs: Sequence[JobRequest]) -> list[JobRequest]:
        """Follow, as :meth:`adopt` does, those of ``jobs`` (recorded as never started)
        that a process an earlier caller started took after all; return them.

        An earlier caller that died (or was stopped, then killed) between handing a
        job to a process and recording its start left it recorded queued: a warm
        worker whose spool names the job (``workers/worker-N.spool/job``), or a cold
        job's process (``process.pid`` in its work dir). Such a process delivers the
        result itself, so the job must not run again: while it lives (its pid, with
        the start time recorded, as pids are reused) it is watched and recorded as
        running; one that ended already is reported ended now, and the workflow
        settles the job by whether its result arrived. Call it before submitting
        anything. A warm worker that has not yet read the job it was handed when this
        looks goes unseen: it reads it as soon as it has answered the job before.
        Raises nothing: a file that cannot be read names no process.
        """
        taken = self._taken_by_workers()
        followed = []
        for job in jobs:
            process = taken.get(os.fsencode(job.workdir))
            if process is None:
                process = _read_process_file(job.workdir / _COLD_PROCESS_FILE)
            if process is None:
                continue
            pid, start = process
            followed.append(job)
            if pid is not None and self._on_start is not None:
                self._on_start(job, str(pid))
            self._follow(job, pid, start)
        return followed

    def _follow(self, job: JobRequest, pid: int | None, start: str | None = None) -> None:
        """Watch ``job``'s process, not a child of this one (None: it ended already),
        until it ends; a cancel kills its process group."""
        with self._lock:
            self._live.add(job.job_id)
            if pid is not None:
                self._adopted[job.job_id] = pid
        self._pool.submit(self._watch_adopted, job, pid, start)

    def _taken_by_workers(self) -> dict[bytes, tuple[int | None, str | None]]:
        """The work dir each earlier warm worker's spool names (the job it runs, or ran
        last), with that worker's pid and start time (None, None when it is gone)."""
        taken = {}
        for workdir, spool in worker_spools(self._workers_dir).items():
            process = _read_process_file(_worker_pid_file(spool))
            taken[workdir] = process or (None, None)  # no pid file: reaped, so gone
        return taken

    def _watch_adopted(self, job: JobRequest, pid: int | None, start: str | None = None) -> None:
        # Polling is the only way to follow a process that is not our child. With its
        # start time known, a pid reused by a later process is not taken for it.
        while (
            pid is not None
            and _alive(pid)
            and (start is None or process_start(pid) == start)
            and job.job_id not in self._cancelled
        ):
            if self._detached.wait(0.2):
                return
        with self._lock:
            self._adopted.pop(job.job_id, None)
            self._live.discard(job.job_id)
        # What its caller, killed, could not remove: it names no process any more.
        (job.workdir / _COLD_PROCESS_FILE).unlink(missing_ok=True)
        cancelled = job.job_id in self._cancelled
        reason = "cancelled" if cancelled else "it ended while no caller was watching"
        # A cold job whose caller died just after it checked may have left its result.
        self._report(job, JobExit(None, reason, cancelled=cancelled, result=_take_reply(job)))

    def shutdown(self, cancel: bool = False, wait: bool = True) -> None:
        """Wait for all jobs to end, cancelling them first if ``cancel``; stop the workers.

        With ``wait=False``, stop at once: jobs not started yet are dropped (they
        stay queued in the workflow's record), adopted jobs are no longer
        watched, and this process's own job processes run on alone.
        """
        if not wait and not cancel:
            self._detached.set()
            self._pool.shutdown(wait=False, cancel_calls=True)
            for worker in self._close_workers():  # each ends after the job it runs
                # Reap it when it does: an unreaped zombie looks alive to a later adopt().
                threading.Thread(target=worker.reap, daemon=True).start()
            return
        if cancel:
            with self._lock:
                live = list(self._live)
            # Queued jobs still pass through _run, which reports them as cancelled.
            self.cancel(live)
        self._pool.shutdown(wait=True)
        for worker in self._close_workers():
            worker.reap()

    def _close_workers(self) -> list[_WarmWorker]:
        with self._lock:
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.close()
        return workers

    def _take_gpus(self, job: JobRequest) -> list[str] | None:
        wanted = job.resources.gpus or 0
        if not wanted:
            return None
        with self._gpu_freed:
            while len(self._free_gpus) < wanted and job.job_id not in self._cancelled:
                self._gpu_freed.wait()
            if job.job_id in self._cancelled:
                return []
            taken, self._free_gpus = self._free_gpus[:wanted], self._free_gpus[wanted:]
            return taken

    def _give_gpus(self, devices: list[str] | None) -> None:
        if devices:
            with self._gpu_freed:
                self._free_gpus.extend(devices)
                self._gpu_freed.notify_all()

    def _run(self, job: JobRequest) -> None:
        sent: _Sent | None = None
        while True:
            following = self._run_one(job, sent)
            if following is None:
                return
            job, sent = following

    def _run_one(
        self, job: JobRequest, sent: _Sent | None
    ) -> tuple[JobRequest, _Sent | None] | None:
        """Run ``job`` (already handed to a warm worker if ``sent``) and report its end;
        return the next job, taken from the queue and handed to the same warm worker
        before this one was reported, if any."""
        if sent is None and job.job_id in self._cancelled:
            with self._lock:
                self._live.discard(job.job_id)
            self._report(job, JobExit(None, "cancelled", cancelled=True))
            return None
        devices = None if sent is not None else self._take_gpus(job)
        try:
            if sent is not None:
                outcome = self._finish_warm(job, sent)
            else:
                outcome = self._run_process(job, devices)
        except _CannotStart as exc:  # a setting to fix, not a bug: no traceback
            outcome = JobExit(None, str(exc))
        except Exception as exc:  # report, never lose the job silently
            logger.exception("local job %s could not run", job.name)
            outcome = JobExit(None, f"could not start: {exc}")
        finally:
            self._give_gpus(devices)
            with self._lock:
                self._procs.pop(job.job_id, None)
                self._live.discard(job.job_id)
        if job.job_id in self._cancelled:
            outcome = JobExit(outcome.returncode, "cancelled", cancelled=True)
        worker: _WarmWorker | None = getattr(self._slot, "worker", None)
        # Prefetch: the worker gets its next job before this one's end is recorded
        # (a result kept, a future settled, SQLite rows written), so it does not wait
        # for the caller's bookkeeping; this result is acked once recorded, as ever.
        following = self._prefetch(worker) if worker is not None else None
        recorded = self._report(job, outcome)
        if worker is not None:
            # Only now is the result the worker handed back safe with the caller.
            worker.ack(recorded)
            if worker.recycle:
                self._retire(worker)
        return following

    def _prefetch(self, worker: _WarmWorker) -> tuple[JobRequest, _Sent | None] | None:
        """Take the next queued job, and hand it to ``worker`` if it is one a warm
        worker runs; None when no job is queued."""
        if self._mode != "warm" or worker.recycle or self._detached.is_set() or not worker.alive:
            return None
        taken = self._pool.take_next(self._run)
        if taken is None:
            return None
        job: JobRequest = taken[0]
        if job.resources.gpus or job.job_id in self._cancelled:
            return job, None  # run after this one's report, as its own thread would have
        try:
            return job, self._start_warm(job, worker)
        except Exception as exc:  # its work dir cannot be made: run it the usual way
            logger.warning("could not hand job %s to a warm worker ahead: %s", job.name, exc)
            return job, None

    def _report(self, job: JobRequest, outcome: JobExit) -> bool:
        """Hand the job's end to ``on_exit``; return whether that went through."""
        if self._detached.is_set() and outcome.result is None:
            return True  # nobody follows these jobs here any more; attach() watches them again
        try:
            self._on_exit(job, outcome)
        except Exception:  # the pool would swallow it silently
            logger.exception("handling the end of job %s failed", job.name)
            return False
        return True

    def _run_process(self, job: JobRequest, devices: list[str] | None) -> JobExit:
        if self._mode == "warm" and devices is None:
            return self._run_warm(job)
        return self._run_cold(job, devices)

    def _warm_worker(self) -> _WarmWorker:
        worker: _WarmWorker | None = getattr(self._slot, "worker", None)
        if worker is not None and worker.alive:
            return worker
        with self._lock:
            if not self._worker_count:
                # After attach: an earlier caller's worker-N may still run; a new worker
                # must not truncate its spool or overwrite its pid file.
                self._worker_count = _last_worker_number(self._workers_dir)
            self._worker_count += 1
            number = self._worker_count
        home = self._workers_dir / f"worker-{number}"
        worker = _WarmWorker([*self._launch, "--worker"], self._env, home, self._secrets)
        with self._lock:
            self._workers.add(worker)
        self._slot.worker = worker
        return worker

    def _retire(self, worker: _WarmWorker) -> int:
        """Forget a worker that died (killed by a cancel or a walltime, or crashed)."""
        with self._lock:
            self._workers.discard(worker)
        if getattr(self._slot, "worker", None) is worker:
            self._slot.worker = None
        worker.close()
        returncode = worker.reap()
        # Killed, it could not remove its files (the code context it extracted).
        shutil.rmtree(worker.home, ignore_errors=True)
        return returncode

    def _run_warm(self, job: JobRequest) -> JobExit:
        sent = self._start_warm(job, self._warm_worker())
        if isinstance(sent, JobExit):
            return sent
        return self._finish_warm(job, sent)

    def _start_warm(self, job: JobRequest, worker: _WarmWorker) -> _Sent | JobExit:
        """Hand ``job`` to ``worker`` and start its walltime clock; a JobExit if it was
        cancelled first."""
        # The task's dir only, once per task: the worker makes the job's own dir when
        # the job has something to put there.
        task_dir = os.path.dirname(job.workdir)
        if task_dir not in self._task_dirs:
            private_dir(Path(task_dir))
            self._task_dirs.add(task_dir)
        with self._lock:
            if job.job_id in self._cancelled:
                return JobExit(None, "cancelled", cancelled=True)
            self._procs[job.job_id] = worker.proc
        sent = _Sent(worker)
        walltime = job.resources.walltime
        if walltime is not None:

            def expire(pid: int = worker.proc.pid) -> None:
                sent.expired = True  # before the kill that ends the wait for an answer
                _kill_group(pid)

            sent.timer = threading.Timer(walltime, expire)
            sent.timer.daemon = True
            sent.timer.start()
        # A worker that is gone shows when its answer does not come (_finish_warm).
        worker.send(job, reply=self._direct_results)
        if self._on_start is not None:
            self._on_start(job, str(worker.proc.pid))
        return sent

    def _finish_warm(self, job: JobRequest, sent: _Sent) -> JobExit:
        """Wait for the answer to ``job``, handed to a warm worker by ``_start_warm``."""
        worker = sent.worker
        try:
            ended = worker.receive()
        finally:
            if sent.timer is not None:
                sent.timer.cancel()
        if ended is not None:
            return ended
        returncode = self._retire(worker)
        took = worker.took(job)
        log = worker.keep_output(job) if took else None
        if sent.expired:
            return JobExit(
                returncode, f"walltime of {job.resources.walltime:g} s exceeded", log=log
            )
        if not took:
            # The worker names each job in its spool first thing: it never took this
            # one, and what it printed is in its own log.
            reason = _ended_before_start(self._python, returncode, worker.jobs_run > 0)
            return JobExit(returncode, reason, log=worker.log, no_result=True)
        # The worker died with the job, which is how it ended. It never answered, so no
        # status of its says a channel took the result (an exit 0 is not the job's).
        reason = _died_in_job(returncode, job, "its warm worker")
        return JobExit(returncode, reason, log=log, no_result=True)

    def _run_cold(self, job: JobRequest, devices: list[str] | None) -> JobExit:
        env = dict(self._env)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        private_dir(job.workdir)
        argv = [*self._launch, "--spec", job.spec_location]
        if self._direct_results:
            job.paths.reply.unlink(missing_ok=True)
            argv += ["--reply-file", str(job.paths.reply)]
        with open_private(job.paths.stdout) as out, open_private(job.paths.stderr) as err:
            with self._lock:
                if job.job_id in self._cancelled:
                    return JobExit(None, "cancelled", cancelled=True)
                try:
                    proc = _popen(
                        argv,
                        self._secrets,
                        cwd=job.workdir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,  # its own group, so cancel kills children too
                    )
                except _CannotStart as exc:
                    # Nothing ran, so nothing printed: leave no empty logs to point at.
                    job.paths.stdout.unlink(missing_ok=True)
                    job.paths.stderr.unlink(missing_ok=True)
                    return JobExit(None, str(exc))
                self._procs[job.job_id] = proc
            if job.resources.memory_mb:
                _limit_memory(proc.pid, job.resources.memory_mb)
            process_file = job.workdir / _COLD_PROCESS_FILE
            _write_process_file(process_file, proc.pid)
            if self._on_start is not None:
                self._on_start(job, str(proc.pid))
            walltime = job.resources.walltime
            try:
                returncode = proc.wait(timeout=walltime)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                return JobExit(proc.wait(), f"walltime of {walltime:g} s exceeded")
            finally:
                process_file.unlink(missing_ok=True)
        if returncode > 0 and returncode == self._empty_program_status():
            # The interpreter fails the same way with nothing to run: it never ran the job.
            return JobExit(returncode, _ended_before_start(self._python, returncode))
        if returncode < 0 and job.resources.memory_mb:
            return JobExit(returncode, _died_in_job(returncode, job))
        return JobExit(returncode, result=_take_reply(job) if returncode == 0 else None)

    def _empty_program_status(self) -> int | None:
        """Return the exit status of the interpreter running an empty program (asked
        once, when a cold job fails); None when it cannot tell."""
        with self._python_probe:
            if self._python_status is None:
                try:
                    self._python_status = subprocess.run(
                        [self._python, "-c", ""],
                        env=self._env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=60,
                    ).returncode
                except (OSError, subprocess.TimeoutExpired):
                    return None
            return self._python_status


def _limit_memory(pid: int, memory_mb: int) -> None:
    """Cap the address space of a cold job's process (just started) at ``memory_mb`` MiB."""
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
        cap = memory_mb * 1024 * 1024
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.prlimit(pid, resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError) as exc:  # it ended already, or the limit is refused
        logger.warning("could not limit the memory of process %d: %s", pid, exc)


# How a process dies that runs out of memory under RLIMIT_AS (C code that does not
# check malloc, an abort) or that the kernel's out-of-memory killer chose.
_OUT_OF_MEMORY_SIGNALS = (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT)


def _died_in_job(returncode: int, job: JobRequest, process: str = "its process") -> str:
    """Why a job is lost whose ``process`` ended while it ran, without a result."""
    how = f"was {killed_by(returncode)}" if returncode < 0 else "exited"
    reason = f"{process} {how} while the job ran"
    memory_mb = job.resources.memory_mb
    if memory_mb and returncode in _OUT_OF_MEMORY_SIGNALS:
        reason += (
            f"; it was limited to memory_mb={memory_mb} (address space, RLIMIT_AS): "
            "most likely out of memory"
        )
    return reason


def _take_reply(job: JobRequest) -> bytes | None:
    """Read and remove the result a cold job left in its work dir, if it left one."""
    path = job.paths.reply
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("could not read the result %s left: %s", job.name, exc)
        return None
    path.unlink(missing_ok=True)
    return data


#: In a cold job's work dir while its process runs: its pid and start time, for a
#: later caller should this one die before it records the start (adopt_unrecorded).
_COLD_PROCESS_FILE = "process.pid"


def _worker_pid_file(spool: JobPaths) -> Path:
    """A warm worker's pid file, ``worker-N.pid``, beside its spool ``worker-N.spool``."""
    return spool.root.with_suffix(".pid")


def _write_process_file(path: Path, pid: int) -> None:
    """Write ``pid`` and its start time to ``path``; log, do not raise, if it cannot be."""
    try:
        write_private(path, f"{pid} {process_start(pid)}".encode())
    except OSError as exc:  # the job runs all the same; a later attach may rerun it
        logger.warning("could not write %s: %s", path, exc)


def _read_process_file(path: Path) -> tuple[int | None, str | None] | None:
    """Read what :func:`_write_process_file` wrote: the pid and start time of a process
    that still runs, ``(None, None)`` for one that ended, None when there is no file."""
    try:
        pid_text, start = path.read_text().split()
        pid = int(pid_text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # its writer died while writing: it had just started
        return (None, None)
    if not _alive(pid) or process_start(pid) != start:
        return (None, None)
    return (pid, start)


def _last_worker_number(workers_dir: Path) -> int:
    """The highest N among the ``worker-N`` files and directories in ``workers_dir``
    (0 when there are none)."""
    try:
        names = os.listdir(workers_dir)
    except OSError:
        return 0
    numbers = [
        int(number)
        for name in names
        if name.startswith("worker-")
        and (number := name[len("worker-") :].split(".", 1)[0]).isdigit()
    ]
    return max(numbers, default=0)


def _kill_group(pid: int) -> None:
    # Each job leads its own process group (start_new_session), so this takes its children too.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's: the pid was reused
        return False
    return True
