"""The ``local`` backend: jobs run the real wrapper in processes on this machine.

Warm (the default): each of ``max_workers`` long-lived worker processes
(``wrapper --worker``) runs job after job, so the interpreter start, the
wrapper's imports, the payloads of a task and the extracted code context are
paid once per worker. Cold: one new interpreter per job, as on a batch slot.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
from base64 import b64decode
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from idds_fat.config import Config
from idds_fat.node.environments import ENV_CACHE_ENV
from idds_fat.node.spec import SECRETS_ENV
from idds_fat.workdir import WorkflowPaths
from idds_fat.wrapper_source import launch_command

logger = logging.getLogger(__name__)


class _CannotStart(Exception):
    """The interpreter jobs run with could not be executed at all (the message says why)."""


def _popen(argv: list[str], **options: object) -> subprocess.Popen:
    """Start ``argv``; raise _CannotStart, naming it, when its program cannot be executed."""
    try:
        return subprocess.Popen(argv, **options)  # type: ignore[call-overload]
    except OSError as exc:
        if exc.filename != argv[0]:  # e.g. the working directory, not the program
            raise
        raise _CannotStart(
            f"the interpreter {argv[0]} could not be started: {exc.strerror or exc}"
        ) from None


def _ended_before_start(python: str, returncode: int, between_jobs: bool = False) -> str:
    """Why a job is lost whose interpreter ended before the job started."""
    how = f"was {killed_by(returncode)}" if returncode < 0 else "exited"
    if between_jobs:  # it had run others: not a start-up failure
        return f"its warm worker (the interpreter {python}) {how} before the job started"
    return f"the interpreter {python} {how} before the job started"


class _WarmWorker:
    """One ``wrapper --worker`` process: it reads job commands on stdin, answers on stdout.

    It runs in ``home`` (its files go there) and logs to ``home.log``.
    """

    def __init__(self, argv: list[str], env: Mapping[str, str], home: Path) -> None:
        self.home = home
        self.log = home.with_name(home.name + ".log")
        self.jobs_run = 0  # jobs it answered for
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = _popen(
                argv,
                cwd=home,
                env=dict(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                start_new_session=True,  # its own process group, so cancel kills children too
            )

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def run(self, job: JobRequest, reply: bool) -> JobExit | None:
        """Run ``job`` (with ``reply``, its result comes back here); None if the worker died."""
        command = {"spec": job.spec_location, "workdir": str(job.workdir), "reply": reply}
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError, ValueError):
            return None
        if not line:
            return None
        self.jobs_run += 1
        answer = json.loads(line)
        result = answer.get("result")
        return JobExit(int(answer["exit"]), result=None if result is None else b64decode(result))

    def close(self) -> None:
        """Tell the worker to exit after the job it runs (closing its input)."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass


class LocalBackend(Backend):
    """Runs up to ``max_workers`` jobs at once in processes of this machine.

    Warm mode (``mode="warm"``) keeps one long-lived worker process per slot
    that runs job after job; cold mode starts ``PYTHON WRAPPER --spec SPEC``
    per job. With ``direct_results``, results come straight back instead of
    being posted: over a warm worker's pipe, or in a cold job's
    ``result.reply`` file (left only while the caller that started it lives).
    Either way a job runs in its own work dir, with stdout and stderr kept in
    ``stdout.txt`` and ``stderr.txt`` there, and cancelling it kills its
    process group (a warm worker is replaced by a fresh one). A job asking for
    ``gpus=N`` runs cold, waits for N free devices of ``gpus`` and sees only
    them through ``CUDA_VISIBLE_DEVICES``; ``walltime`` kills a job when
    exceeded. ``cores`` and ``memory_mb`` are not enforced on this backend.
    """

    name = "local"
    # jobs_per_worker: warm workers already run many jobs each.
    supported_parameters = frozenset({"gpus", "walltime", "jobs_per_worker"})

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
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="idds-fat-local")

    @classmethod
    def create(cls, config: Config, setup: BackendSetup) -> LocalBackend:
        """Run ``config.max_workers`` jobs at once with ``config.python``, warm or
        cold as ``config.local_mode`` says (worker logs under the work dir's ``workers/``).

        Jobs get their secrets in their environment (``IDDS_FAT_JOB_SECRETS``),
        and the GPUs of ``config.gpu_devices`` (else those ``nvidia-smi -L`` lists).
        Their ``IDDS_FAT_ENV_CACHE_DIR`` (which a node's environment sets and which
        wins there) is ``config.env_cache_dir``: the caller's setting, absolute, by
        its precedence, not the variable as this process got it.
        """
        env = dict(os.environ)
        env[SECRETS_ENV] = json.dumps(dict(setup.secrets))
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
            pid = int(ref)
            with self._lock:
                self._adopted[job.job_id] = pid
                self._live.add(job.job_id)
            self._pool.submit(self._watch_adopted, job, pid)

    def _watch_adopted(self, job: JobRequest, pid: int) -> None:
        # Polling is the only way to follow a process that is not our child.
        while _alive(pid) and job.job_id not in self._cancelled:
            if self._detached.wait(0.2):
                return
        with self._lock:
            self._adopted.pop(job.job_id, None)
            self._live.discard(job.job_id)
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
            self._pool.shutdown(wait=False, cancel_futures=True)
            for worker in self._close_workers():  # each ends after the job it runs
                # Reap it when it does: an unreaped zombie looks alive to a later adopt().
                threading.Thread(target=worker.proc.wait, daemon=True).start()
            return
        if cancel:
            with self._lock:
                live = list(self._live)
            # Queued jobs still pass through _run, which reports them as cancelled.
            self.cancel(live)
        self._pool.shutdown(wait=True)
        for worker in self._close_workers():
            worker.proc.wait()

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
        if job.job_id in self._cancelled:
            with self._lock:
                self._live.discard(job.job_id)
            self._report(job, JobExit(None, "cancelled", cancelled=True))
            return
        devices = self._take_gpus(job)
        try:
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
        self._report(job, outcome)

    def _report(self, job: JobRequest, outcome: JobExit) -> None:
        if self._detached.is_set() and outcome.result is None:
            return  # nobody follows these jobs here any more; attach() watches them again
        try:
            self._on_exit(job, outcome)
        except Exception:  # the pool would swallow it silently
            logger.exception("handling the end of job %s failed", job.name)

    def _run_process(self, job: JobRequest, devices: list[str] | None) -> JobExit:
        if self._mode == "warm" and devices is None:
            return self._run_warm(job)
        return self._run_cold(job, devices)

    def _warm_worker(self) -> _WarmWorker:
        worker: _WarmWorker | None = getattr(self._slot, "worker", None)
        if worker is not None and worker.alive:
            return worker
        with self._lock:
            self._worker_count += 1
            number = self._worker_count
        home = self._workers_dir / f"worker-{number}"
        worker = _WarmWorker([*self._launch, "--worker"], self._env, home)
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
        returncode = worker.proc.wait()
        # Killed, it could not remove its files (the code context it extracted).
        shutil.rmtree(worker.home, ignore_errors=True)
        return returncode

    def _run_warm(self, job: JobRequest) -> JobExit:
        job.workdir.mkdir(parents=True, exist_ok=True)
        worker = self._warm_worker()
        with self._lock:
            if job.job_id in self._cancelled:
                return JobExit(None, "cancelled", cancelled=True)
            self._procs[job.job_id] = worker.proc
        if self._on_start is not None:
            self._on_start(job, str(worker.proc.pid))
        walltime = job.resources.walltime
        expired = threading.Event()
        timer = None
        if walltime is not None:

            def expire(pid: int = worker.proc.pid) -> None:
                expired.set()
                _kill_group(pid)

            timer = threading.Timer(walltime, expire)
            timer.daemon = True
            timer.start()
        try:
            ended = worker.run(job, reply=self._direct_results)
        finally:
            if timer is not None:
                timer.cancel()
        if ended is not None:
            return ended
        returncode = self._retire(worker)
        if expired.is_set():
            return JobExit(returncode, f"walltime of {walltime:g} s exceeded")
        if not job.paths.stderr.exists():
            # The worker opens it first thing for each job: it never took this one,
            # and what it printed is in its own log.
            reason = _ended_before_start(self._python, returncode, worker.jobs_run > 0)
            return JobExit(returncode, reason, log=worker.log)
        return JobExit(returncode)  # the worker died with the job, which is how it ended

    def _run_cold(self, job: JobRequest, devices: list[str] | None) -> JobExit:
        env = dict(self._env)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        job.workdir.mkdir(parents=True, exist_ok=True)
        argv = [*self._launch, "--spec", job.spec_location]
        if self._direct_results:
            job.paths.reply.unlink(missing_ok=True)
            argv += ["--reply-file", str(job.paths.reply)]
        with open(job.paths.stdout, "wb") as out, open(job.paths.stderr, "wb") as err:
            with self._lock:
                if job.job_id in self._cancelled:
                    return JobExit(None, "cancelled", cancelled=True)
                try:
                    proc = _popen(
                        argv,
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
            if self._on_start is not None:
                self._on_start(job, str(proc.pid))
            walltime = job.resources.walltime
            try:
                returncode = proc.wait(timeout=walltime)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                return JobExit(proc.wait(), f"walltime of {walltime:g} s exceeded")
        if returncode > 0 and returncode == self._empty_program_status():
            # The interpreter fails the same way with nothing to run: it never ran the job.
            return JobExit(returncode, _ended_before_start(self._python, returncode))
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
