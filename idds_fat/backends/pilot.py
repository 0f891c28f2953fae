"""The ``slurm`` backend's pilot mode: Slurm jobs of warm workers that lease the jobs.

::

    submit(jobs) --offer--> LeasePool (service/leases.py, served by the embedded service)
                 --grow---> sbatch pilot (idds_fat/node/pilot.py: one warm worker per core)
    pilot <--POST /pilots/POOL/lease-- its slots; --POST /done--> on_exit(job, JobExit)
                                    (with no broker, the result in the report: JobExit.result)
    status watcher: squeue the pilots; one that left Slurm --release_pilot--> its
                    leased jobs queued again, first (at-least-once; duplicates deduped)

Arrays (``slurm.py``) pay an interpreter and a Slurm dispatch per element;
a pilot pays them once and then runs job after job warm.
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Sequence
from pathlib import Path

from idds_fat.backends.base import Backend, BackendSetup, JobExit, JobRequest, Resources
from idds_fat.backends.slurm import SlurmBackend, SlurmError, _time_option
from idds_fat.config import ENV_PREFIX, SECRET_SETTINGS, Config
from idds_fat.errors import ConfigError
from idds_fat.node.pilot import PILOT_MARGIN_SECONDS
from idds_fat.node.spec import SECRETS_ENV, SECRETS_FILE_ENV
from idds_fat.service.leases import LEASES, LeasedJob, LeasePool
from idds_fat.workdir import private_dir
from idds_fat.wrapper_source import launch_command

logger = logging.getLogger(__name__)

#: Times a job goes back to the queue because its pilot died under it before the job
#: is reported lost: a job that kills every pilot it runs in must not kill them all.
MAX_PILOT_DEATHS = 3

_PILOT_SCRIPT = """#!/bin/bash
{directives}
# idds-fat pilot: warm workers (one per core of this allocation) that lease jobs
# from the workflow's service until idle, closed or out of time. The secrets are
# in the 0600 file named here, never in the environment: sbatch passes the
# caller's on, so its secret settings go first.
unset {unset}
export {secrets_env}={secrets_file}
exec {launch} --pilot {service} --pool {pool} --dir {pilot_dir}/"$SLURM_JOB_ID" \\
    --idle {idle} --walltime {walltime}
"""


class SlurmPilotBackend(SlurmBackend):
    """Runs jobs in pilots: Slurm jobs that lease them from the workflow's service.

    ``pilots`` pilots start with the backend; while more jobs wait than the
    pilots (running or queued in Slurm) have slots, more are submitted, up to
    ``max_pilots``. Each pilot asks Slurm for ``cores`` CPUs and ``walltime``
    seconds (``--time``), runs one warm worker per core, takes no job whose
    declared walltime exceeds the time it has left, and leaves after ``idle``
    seconds without a job or when the workflow closes. A pilot that dies
    (``scancel``, node failure, walltime) is seen leaving ``squeue`` by the
    status watcher: its leased jobs run again in another pilot, their results
    deduped by the collector. A job's ``cores`` and ``gpus`` are the pilot's
    business (``slurm_pilot_cores``, GPUs through ``slurm_options``, split among
    the slots by ``CUDA_VISIBLE_DEVICES``); its ``memory_mb`` caps its worker.
    With ``direct_results`` (no broker), a pilot carries each result in the job's
    report, which the workflow keeps and verifies (``JobExit.result``); a result
    not recorded is delivered by the pilot through the result channels.
    """

    def __init__(
        self,
        *,
        service_url: str,
        pilot_dir: Path,
        pilots: int = 1,
        max_pilots: int = 4,
        cores: int = 1,
        walltime: float = 3600.0,
        idle: float = 60.0,
        direct_results: bool = False,
        **array_options,
    ) -> None:
        # Ours first: the status watcher may call _poll as soon as the base registers it.
        self._service_url = service_url
        self._pilot_dir = Path(pilot_dir)
        self._max_pilots = max(max_pilots, pilots)
        self._cores = cores
        self._walltime = walltime
        self._idle = idle
        self._jobs: dict[str, JobRequest] = {}  # leased or queued, not yet ended
        self._pilots: set[str] = set()  # Slurm job ids of pilots not known to have left
        self._started_pilots = 0
        self._deaths: dict[str, int] = {}
        self._pool = LeasePool(self._leased, self._done, direct_results)
        super().__init__(**array_options)
        LEASES.add(self._pool)
        private_dir(self._pilot_dir)
        try:
            self._add_pilots(pilots)
        except BaseException:
            self._close_pool()
            raise

    @classmethod
    def create(cls, config: Config, setup: BackendSetup) -> SlurmPilotBackend:
        """Build from the ``slurm_*`` settings; write the job secrets file (mode 0600).

        Raises:
            ConfigError: the workflow has no embedded service to lease jobs from.
            SlurmError: sbatch refused the first pilots.
        """
        if not setup.service_url:
            raise ConfigError(
                "slurm_mode = 'pilot' needs the workflow's own service (pilots lease "
                "jobs from it): unset service_url"
            )
        return cls(
            service_url=setup.service_url,
            pilot_dir=Path(setup.work_dir) / "pilots",
            pilots=config.slurm_pilots,
            max_pilots=config.slurm_max_pilots,
            cores=config.slurm_pilot_cores,
            walltime=config.slurm_pilot_walltime,
            idle=config.slurm_pilot_idle,
            # The workflow embeds the service that keeps the REST copy; a broker,
            # when configured, is the channel the user asked for.
            direct_results=not config.broker,
            **cls.submit_settings(config, setup),
        )

    def check(self, resources: Resources) -> None:
        """Raise ValueError for resources no pilot can give (a walltime beyond the pilots')."""
        super().check(resources)
        usable = self._walltime - PILOT_MARGIN_SECONDS
        if resources.walltime is not None and resources.walltime > usable:
            raise ValueError(
                f"walltime {resources.walltime:g} s is beyond what a pilot has for a job "
                f"({usable:g} s of slurm_pilot_walltime = {self._walltime:g} s)"
            )

    def submit(self, jobs: Sequence[JobRequest]) -> None:
        """Queue ``jobs`` for the pilots; add pilots if they wait for want of slots.

        Raises:
            ValueError: a job asks for a walltime no pilot has.
            SlurmError: sbatch refused a new pilot while none runs.
        """
        for job in jobs:
            self.check(job.resources)
        leased = []
        with self._lock:
            for job in jobs:
                # No mkdir of its dir here (a tenth of the caller's time on short jobs):
                # the worker that runs the job makes it.
                self._jobs[job.job_id] = job
                leased.append(
                    LeasedJob(
                        job.job_id,
                        job.spec_location,
                        str(job.workdir),
                        job.resources.walltime,
                        job.resources.memory_mb,
                        job.inline_spec,
                        job.spec_key,
                    )
                )
        self._pool.offer(leased)
        self._grow()
        self._poll_soon()

    def runs_inline_specs(self, resources: Resources) -> bool:
        """Yes: a pilot's warm workers take each job's spec from its lease (checked
        against its key), so the workflow may lease a job before its spec is stored."""
        return True

    def adopt(self, jobs: Sequence[tuple[JobRequest, str]]) -> None:
        """Pilots lease from this process's service: an earlier caller's jobs cannot be
        watched (their results still arrive); warns, like the default."""
        Backend.adopt(self, jobs)

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel jobs: a queued one is dropped, a leased one runs on, its result ignored;
        both are reported cancelled at once."""
        for job_id in self._pool.withdraw(job_ids):
            with self._lock:
                job = self._jobs.pop(job_id, None)
            if job is not None:
                self._report(job, JobExit(None, "cancelled", cancelled=True))

    def shutdown(self, cancel: bool = False, wait: bool = True) -> None:
        """Close the pool (pilots waiting for work leave), ``scancel`` the pilots still
        known, stop watching; with ``cancel``, the jobs not ended are reported cancelled.
        Pilots lease from this process: detaching (``wait=False``) ends them too."""
        if cancel:
            with self._lock:
                job_ids = list(self._jobs)
            self.cancel(job_ids)
        self._close_pool()
        with self._lock:
            pilots = sorted(self._pilots)
            self._pilots.clear()
        if pilots:
            try:
                self._run(["scancel", *pilots])
            except SlurmError as exc:
                logger.warning("scancel of the pilots failed: %s", exc)
        super().shutdown(cancel=False, wait=True)

    def pilots(self) -> list[str]:
        """The Slurm job ids of the pilots not known to have left (for tests and status)."""
        with self._lock:
            return sorted(self._pilots)

    def pilots_started(self) -> int:
        """How many pilots this backend has submitted in all."""
        with self._lock:
            return self._started_pilots

    # --- pilots ----------------------------------------------------------------------

    def _close_pool(self) -> None:
        self._pool.close()
        LEASES.remove(self._pool)

    def _add_pilots(self, count: int) -> None:
        for _ in range(count):
            with self._lock:
                self._submissions += 1
                number = self._submissions
            directives = [
                "--job-name=idds-fat-pilot",
                f"--output={self._pilot_dir}/pilot-%j.out",
                f"--cpus-per-task={self._cores}",
                f"--time={_time_option(self._walltime)}",
                *self._options(Resources()),
            ]
            script = _PILOT_SCRIPT.format(
                directives="\n".join(f"#SBATCH {d}" for d in directives),
                unset=" ".join(
                    [SECRETS_ENV, *(ENV_PREFIX + s.upper() for s in sorted(SECRET_SETTINGS))]
                ),
                secrets_env=SECRETS_FILE_ENV,
                secrets_file=shlex.quote(str(self._secrets_file)),
                launch=shlex.join(launch_command(self._python, self._wrapper)),
                service=shlex.quote(self._service_url),
                pool=self._pool.name,
                pilot_dir=shlex.quote(str(self._pilot_dir)),
                idle=f"{self._idle:g}",
                walltime=f"{self._walltime:g}",
            )
            script_file = self._pilot_dir / f"pilot-{number}.sh"
            script_file.write_text(script)
            output = self._run(["sbatch", "--parsable", str(script_file)], retry_transient=True)
            pilot = output.strip().split(";")[0]
            with self._lock:
                self._pilots.add(pilot)
                self._started_pilots += 1
            logger.info("submitted pilot %s", pilot)

    def _grow(self) -> None:
        """Add pilots while more jobs wait than the pilots there are have slots."""
        queued, _ = self._pool.counts()
        with self._lock:
            live = len(self._pilots)
        waiting = queued - live * self._cores
        if waiting <= 0 or live >= self._max_pilots or self._pool.closed:
            return
        wanted = min(self._max_pilots - live, math.ceil(waiting / self._cores))
        try:
            self._add_pilots(wanted)
        except SlurmError:
            if live == 0:
                raise
            logger.warning("could not add a pilot; %d run", live, exc_info=True)

    def _leased(self, pilot: str, jobs: Sequence[LeasedJob]) -> None:
        if self._on_start is None:
            return
        for leased in jobs:
            with self._lock:
                job = self._jobs.get(leased.job_id)
            if job is not None:
                self._on_start(job, f"pilot:{pilot}")

    def _done(self, pilot: str, job_id: str, report: dict) -> bool:
        """The end of a job a pilot reported; return whether the result it carried (if
        any) was recorded: handed to the workflow, which keeps and verifies it."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is None:
            return False
        try:
            status = int(report.get("exit"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            status = None
        if report.get("worker_died"):
            outcome = JobExit(
                status,
                f"its warm worker in pilot {pilot} died during the job (status {status})",
                no_result=True,
            )
        else:
            outcome = JobExit(status, result=report.get("result"))
        try:
            self._on_exit(job, outcome)
        except Exception:
            logger.exception("handling the end of job %s failed", job.name)
            return False
        return outcome.result is not None

    def _poll(self) -> bool:
        """One ``squeue`` for every pilot; requeue the jobs of pilots that left; grow."""
        with self._lock:
            pilots = sorted(self._pilots)
        gone: list[str] = []
        if pilots:
            try:
                listing = self._run(["squeue", "-h", "-o", "%i", "-j", ",".join(pilots)])
            except SlurmError as exc:
                if "Invalid job id" not in str(exc):
                    raise
                listing = ""
            present = set(listing.split())
            gone = [p for p in pilots if p not in present]
        for pilot in gone:
            with self._lock:
                self._pilots.discard(pilot)
            for leased in self._pool.release_pilot(pilot):
                self._pilot_died_under(leased, pilot)
        self._grow()
        return bool(gone)

    def _pilot_died_under(self, leased: LeasedJob, pilot: str) -> None:
        deaths = self._deaths.get(leased.job_id, 0) + 1
        self._deaths[leased.job_id] = deaths
        logger.info("pilot %s left with %s running; it runs again", pilot, leased.job_id)
        if deaths < MAX_PILOT_DEATHS:
            return
        self._pool.withdraw([leased.job_id])
        with self._lock:
            job = self._jobs.pop(leased.job_id, None)
        if job is not None:
            reason = f"{deaths} pilots died running it, the last {pilot}"
            self._report(job, JobExit(None, reason, no_result=True))
