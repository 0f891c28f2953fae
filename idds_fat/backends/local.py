"""The ``local`` backend: each job is a real subprocess running the wrapper on this machine."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
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
)
from idds_fat.backends.gpus import detect_gpus
from idds_fat.config import Config
from idds_fat.wrapper_source import wrapper_module

logger = logging.getLogger(__name__)


class LocalBackend(Backend):
    """Runs up to ``max_workers`` jobs at once as subprocesses of the caller.

    Each job runs ``PYTHON WRAPPER --spec SPEC`` in its own work dir and process
    group, with stdout and stderr kept in ``stdout.txt`` and ``stderr.txt``
    there. A job asking for ``gpus=N`` waits for N free devices of ``gpus`` and
    sees only them through ``CUDA_VISIBLE_DEVICES``; ``walltime`` kills it when
    exceeded. ``cores`` and ``memory_mb`` are not enforced on this backend.
    """

    name = "local"
    supported_parameters = frozenset({"gpus", "walltime"})

    def __init__(
        self,
        *,
        python: str,
        wrapper_path: Path,
        env: Mapping[str, str],
        on_exit: ExitCallback,
        max_workers: int,
        gpus: Sequence[str] = (),
        on_start: StartCallback | None = None,
    ) -> None:
        self._python = python
        self._wrapper = str(wrapper_path)
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
        """Run ``config.max_workers`` jobs at once with ``config.python``.

        Jobs get their secrets in their environment (``IDDS_FAT_JOB_SECRETS``),
        and the GPUs of ``config.gpu_devices`` (else those ``nvidia-smi -L`` lists).
        """
        env = dict(os.environ)
        env[wrapper_module().SECRETS_ENV] = json.dumps(dict(setup.secrets))
        gpus = config.gpu_devices if config.gpu_devices is not None else detect_gpus()
        return cls(
            python=config.python,
            wrapper_path=setup.wrapper_path,
            env=env,
            on_exit=setup.on_exit,
            max_workers=config.max_workers,
            gpus=gpus,
            on_start=setup.on_start,
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
        self._report(job, JobExit(None, reason, cancelled=cancelled))

    def shutdown(self, cancel: bool = False, wait: bool = True) -> None:
        """Wait for all jobs to end, cancelling them first if ``cancel``; stop the workers.

        With ``wait=False``, stop at once: jobs not started yet are dropped (they
        stay queued in the workflow's record), adopted jobs are no longer
        watched, and this process's own job processes run on alone.
        """
        if not wait and not cancel:
            self._detached.set()
            self._pool.shutdown(wait=False, cancel_futures=True)
            return
        if cancel:
            with self._lock:
                live = list(self._live)
            # Queued jobs still pass through _run, which reports them as cancelled.
            self.cancel(live)
        self._pool.shutdown(wait=True)

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
        try:
            self._on_exit(job, outcome)
        except Exception:  # the pool would swallow it silently
            logger.exception("handling the end of job %s failed", job.name)

    def _run_process(self, job: JobRequest, devices: list[str] | None) -> JobExit:
        env = dict(self._env)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        job.workdir.mkdir(parents=True, exist_ok=True)
        with open(job.stdout_path, "wb") as out, open(job.stderr_path, "wb") as err:
            with self._lock:
                if job.job_id in self._cancelled:
                    return JobExit(None, "cancelled", cancelled=True)
                proc = subprocess.Popen(
                    [self._python, self._wrapper, "--spec", job.spec_location],
                    cwd=job.workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # its own process group, so cancel kills children too
                )
                self._procs[job.job_id] = proc
            if self._on_start is not None:
                self._on_start(job, str(proc.pid))
            walltime = job.resources.walltime
            try:
                return JobExit(proc.wait(timeout=walltime))
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                return JobExit(proc.wait(), f"walltime of {walltime:g} s exceeded")


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
