"""The ``slurm`` backend: one task becomes one ``sbatch`` job array."""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import subprocess
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from idds_fat.backends.base import (
    Backend,
    BackendSetup,
    JobExit,
    JobRequest,
    Resources,
    TransientError,
)
from idds_fat.backends.watcher import WATCHER
from idds_fat.config import ENV_PREFIX, SECRET_SETTINGS, Config
from idds_fat.errors import IddsFatError
from idds_fat.node.spec import SECRETS_ENV, SECRETS_FILE_ENV
from idds_fat.workdir import WorkflowPaths, write_private
from idds_fat.wrapper_source import launch_command

logger = logging.getLogger(__name__)

# Messages of sbatch/squeue/scancel that mean "try again", not "you asked wrong".
_TRANSIENT = re.compile(
    r"Socket timed out|Unable to contact slurm controller|Resource temporarily unavailable|"
    r"Connection refused|Slurm temporarily unable|Zero Bytes were transmitted",
    re.IGNORECASE,
)
_SCRIPT = """#!/bin/bash
{directives}
# idds-fat job array: element N runs the jobs of pack N of the jobs file in one
# interpreter; the wrapper writes each job's stdout, stderr and exit_status in
# that job's dir. The secrets are in the 0600 file named here, never in the
# environment: sbatch passes the caller's on, so its secret settings go first.
unset {unset}
export {secrets_env}={secrets_file}
exec {launch} --jobs-file {jobs_file} --pack "$SLURM_ARRAY_TASK_ID"
"""


class SlurmError(IddsFatError):
    """A Slurm command failed; the message has the command's own words."""


#: A task of more jobs than this is packed by default (``default_jobs_per_worker``).
ELEMENTS_PER_TASK = 100


def default_jobs_per_worker(jobs: int, resources: Resources) -> int:
    """The jobs one array element runs when the task does not say (``jobs_per_worker``).

    One, while the task has at most ``ELEMENTS_PER_TASK`` jobs (each job its own
    element, with Slurm's accounting per job), or when it declares a
    ``walltime``, ``memory_mb`` or ``gpus`` (packed, they would be the
    element's, shared by its jobs). Above, the fewest jobs per element that
    keep the task within that many elements, rounded up to a whole number of
    rounds of the element's ``cores`` (a packed element runs one job per core at
    once): Slurm dispatches elements at a few a second, each paying an
    interpreter, and caps an array's size (``MaxArraySize``).
    """
    if jobs <= ELEMENTS_PER_TASK or resources.walltime or resources.memory_mb or resources.gpus:
        return 1
    slots = max(resources.cores or 1, 1)
    return math.ceil(math.ceil(jobs / ELEMENTS_PER_TASK) / slots) * slots


def _time_option(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _array_spec(indices: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(indices))


class SlurmBackend(Backend):
    """Submits each task as one ``sbatch`` job array and watches it with batched ``squeue``.

    Resources map to ``--cpus-per-task``, ``--mem``, ``--gres=gpu:N`` and
    ``--time``; ``queue`` (iDDS) or the ``slurm_partition`` setting to
    ``--partition``; ``slurm_account`` to ``--account``; ``slurm_options`` are
    added as they are. Each element runs the wrapper on its pack of jobs (one
    job, or ``jobs_per_worker`` of them in sequence in one interpreter, each
    result published when done), each job in its own dir; the job's secrets
    come from a 0600 file in the workflow's work dir (its path, not its
    content, is in the script and the job's environment), removed when the
    workflow closes (``shutdown`` with ``wait`` or ``cancel``), and the
    caller's secret settings (``IDDS_FAT_TOKEN``, ...) are unset in the
    script. The cache must be one
    the nodes can read (a shared directory or the HTTP service) and the result
    channel one they can reach.

    The process-wide status watcher (``backends/watcher.py``) asks ``squeue``
    about all of the workflow's arrays in one call, backing off from
    ``poll_min`` to ``poll_max`` seconds while nothing ends; an element that
    left the queue is reported with the exit status its script wrote, or with
    the state and exit code ``scontrol`` still knows (a job killed by Slurm never
    writes one).
    """

    name = "slurm"
    supported_parameters = frozenset(
        {"queue", "cores", "memory_mb", "gpus", "walltime", "jobs_per_worker"}
    )

    def __init__(
        self,
        *,
        python: str,
        wrapper_path: Path,
        secrets_file: Path,
        on_exit,
        on_start=None,
        partition: str | None = None,
        account: str | None = None,
        extra_options: Sequence[str] = (),
        poll_min: float = 2.0,
        poll_max: float = 30.0,
        command_timeout: float = 60.0,
    ) -> None:
        self._python = python
        self._wrapper = Path(wrapper_path)
        self._secrets_file = Path(secrets_file)
        self._on_exit = on_exit
        self._on_start = on_start
        self._partition = partition
        self._account = account
        self._extra = list(extra_options)
        self._poll_min, self._poll_max = poll_min, max(poll_min, poll_max)
        self._timeout = command_timeout
        self._lock = threading.Lock()
        # (array job id, element) -> the jobs that element runs, not yet ended
        self._live: dict[tuple[str, int], list[JobRequest]] = {}
        self._where: dict[str, tuple[str, int]] = {}  # job id -> (array job id, element)
        self._submissions = 0
        self._watch = WATCHER.watch(self._poll, self._poll_min, self._poll_max, "Slurm jobs")

    @classmethod
    def create(cls, config: Config, setup: BackendSetup) -> SlurmBackend:
        """Build from the ``slurm_*`` settings; write the job secrets file (mode 0600)."""
        return cls(**cls.submit_settings(config, setup))

    @staticmethod
    def submit_settings(config: Config, setup: BackendSetup) -> dict:
        """Write the job secrets file (mode 0600) and return the constructor arguments
        every backend that submits Slurm jobs takes from the settings and the setup."""
        secrets_file = WorkflowPaths(setup.work_dir).job_secrets
        write_private(secrets_file, json.dumps(dict(setup.secrets)).encode())
        return {
            "python": config.python,
            "wrapper_path": setup.wrapper_path,
            "secrets_file": secrets_file,
            "on_exit": setup.on_exit,
            "on_start": setup.on_start,
            "partition": setup.placement.get("queue") or config.slurm_partition,
            "account": config.slurm_account,
            "extra_options": config.slurm_options,
            "poll_min": config.slurm_poll_min,
            "poll_max": config.slurm_poll_max,
        }

    def check(self, resources: Resources) -> None:
        """Raise ValueError for resources no Slurm job can ask for."""
        for name in ("cores", "memory_mb", "gpus"):
            value = getattr(resources, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, not {value}")
        if resources.walltime is not None and resources.walltime <= 0:
            raise ValueError(f"walltime must be positive, not {resources.walltime}")

    def _options(self, resources: Resources) -> list[str]:
        options = []
        if resources.cores:
            options.append(f"--cpus-per-task={resources.cores}")
        if resources.memory_mb:
            options.append(f"--mem={resources.memory_mb}M")
        if resources.gpus:
            options.append(f"--gres=gpu:{resources.gpus}")
        if resources.walltime:
            options.append(f"--time={_time_option(resources.walltime)}")
        if self._partition:
            options.append(f"--partition={self._partition}")
        if self._account:
            options.append(f"--account={self._account}")
        return options + self._extra

    def submit(self, jobs: Sequence[JobRequest]) -> None:
        """Submit ``jobs`` (all of one task, with the same resources) as one job array.

        Raises:
            SlurmError: sbatch refused the array (the message is sbatch's), or kept
                failing transiently.
        """
        self._submit_array(jobs, [])

    def submit_after(self, jobs: Sequence[JobRequest], inputs: Sequence[str]) -> bool:
        """Submit ``jobs`` as one job array with ``--dependency=afterok:`` on the array
        elements that run ``inputs``, and ``--kill-on-invalid-dep=yes`` (Slurm cancels
        an element whose input element failed); return False, submitting nothing, when
        an input is not an element this backend watches (not submitted here, or ended
        already), or when sbatch finds a dependency it no longer knows.

        Raises:
            SlurmError: sbatch refused the array for another reason.
        """
        if not jobs or type(self).submit is not SlurmBackend.submit:
            return False  # a subclass that runs jobs otherwise (pilots) has no elements
        with self._lock:
            where = [self._where.get(job_id) for job_id in inputs]
            if any(w is None or w not in self._live for w in where):
                return False
        elements = sorted({f"{array}_{index}" for array, index in where})  # type: ignore[misc]
        try:
            self._submit_array(jobs, elements)
        except SlurmError as exc:
            if "dependency" not in str(exc).lower():
                raise
            logger.info("Slurm refused the dependency (%s); the workflow submits later", exc)
            return False
        return True

    def _submit_array(self, jobs: Sequence[JobRequest], after: Sequence[str]) -> None:
        if not jobs:
            return
        for job in jobs:
            self.check(job.resources)
        task_dir = jobs[0].workdir.parent
        task_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._submissions += 1
            number = self._submissions
        per_element = jobs[0].resources.jobs_per_worker or default_jobs_per_worker(
            len(jobs), jobs[0].resources
        )
        indices = []  # the array element of each job
        lines = []
        for job in jobs:
            index = int(job.job_id.rsplit("/", 1)[1]) // per_element
            indices.append(index)
            job.workdir.mkdir(parents=True, exist_ok=True)
            lines.append(f"{index}\t{job.workdir}\t{job.spec_location}\n")
        jobs_file = task_dir / f"array-{number}.tsv"
        jobs_file.write_text("".join(lines))
        task = jobs[0].job_id.rsplit("/", 1)[0]
        directives = [
            f"--job-name=idds-fat-{task}",
            f"--array={_array_spec(set(indices))}",
            f"--output={task_dir}/slurm-%A_%a.out",
            *self._options(jobs[0].resources),
        ]
        if after:
            directives += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        script = _SCRIPT.format(
            directives="\n".join(f"#SBATCH {d}" for d in directives),
            jobs_file=shlex.quote(str(jobs_file)),
            unset=" ".join(
                [SECRETS_ENV, *(ENV_PREFIX + s.upper() for s in sorted(SECRET_SETTINGS))]
            ),
            secrets_env=SECRETS_FILE_ENV,
            secrets_file=shlex.quote(str(self._secrets_file)),
            launch=shlex.join(launch_command(self._python, self._wrapper)),
        )
        script_file = task_dir / f"array-{number}.sh"
        script_file.write_text(script)
        output = self._run(["sbatch", "--parsable", str(script_file)], retry_transient=True)
        array_id = output.strip().split(";")[0]
        logger.info("submitted %d job(s) of %s as Slurm array %s", len(jobs), task, array_id)
        self.adopt([(job, f"{array_id}_{index}") for job, index in zip(jobs, indices, strict=True)])
        if self._on_start is not None:
            for job, index in zip(jobs, indices, strict=True):
                self._on_start(job, f"{array_id}_{index}")

    def adopt(self, jobs: Sequence[tuple[JobRequest, str]]) -> None:
        """Watch array elements (``ARRAYID_ELEMENT``), submitted here or by an earlier caller."""
        with self._lock:
            for job, ref in jobs:
                array_id, _, index = ref.partition("_")
                self._live.setdefault((array_id, int(index)), []).append(job)
                self._where[job.job_id] = (array_id, int(index))
        self._poll_soon()

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel jobs: they are reported cancelled at once; an element is ``scancel``\\ ed
        when no job of its pack is left (the others of a pack run on, their results ignored).
        """
        cancelled, elements = [], []
        with self._lock:
            for job_id in job_ids:
                where = self._where.get(job_id)
                pack = self._live.get(where) if where is not None else None
                job = next((j for j in pack or () if j.job_id == job_id), None)
                if job is None:
                    continue
                pack.remove(job)  # type: ignore[union-attr]
                cancelled.append(job)
                if not pack:
                    del self._live[where]  # type: ignore[arg-type]
                    elements.append(where)
        if elements:
            try:
                self._run(["scancel", *(f"{a}_{i}" for a, i in elements)])
            except SlurmError as exc:
                logger.warning("scancel failed: %s", exc)
        for job in cancelled:
            self._report(job, JobExit(None, "cancelled", cancelled=True))

    def shutdown(self, cancel: bool = False, wait: bool = True) -> None:
        """Stop watching; with ``cancel``, ``scancel`` every element still known first.

        Slurm runs the jobs whatever this process does; ``wait`` (the workflow is
        done with its jobs) or ``cancel`` also removes the job secrets file, which
        elements not started yet would still need. Detaching (neither) keeps it
        for the jobs that run on.
        """
        if cancel:
            with self._lock:
                job_ids = [job.job_id for pack in self._live.values() for job in pack]
            self.cancel(job_ids)
        self._watch.close()
        if cancel or wait:
            self._secrets_file.unlink(missing_ok=True)

    # --- watching --------------------------------------------------------------------

    def _poll_soon(self) -> None:
        self._watch.poll_soon()

    def _poll(self) -> bool:
        """One ``squeue`` for every array; report the elements that left the queue."""
        with self._lock:
            arrays = sorted({array for array, _ in self._live})
        if not arrays:
            return False
        try:
            listing = self._run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)])
        except SlurmError as exc:
            if "Invalid job id" not in str(exc):
                raise
            listing = ""  # every array has left the queue
        queued = set()
        for line in listing.splitlines():
            parts = line.split()
            if parts and "_" in parts[0]:
                array, _, index = parts[0].partition("_")
                if index.isdigit():
                    queued.add((array, int(index)))
        asked = set(arrays)
        with self._lock:
            # An array submitted since the listing (from another thread: a job whose
            # inputs just finished) is not in it, and has not ended.
            ended = [
                (where, pack)
                for where, pack in self._live.items()
                if where[0] in asked and where not in queued
            ]
            for where, _ in ended:
                self._live.pop(where)
        if not ended:
            return False
        states = self._final_states({array for (array, _), _ in ended})
        for (array, index), pack in ended:
            for job in pack:
                self._report(job, self._outcome(job, states.get(f"{array}_{index}")))
        return True

    def _final_states(self, arrays: set[str]) -> dict[str, dict[str, str]]:
        """Ask ``scontrol`` what it still knows of these arrays' elements (one call each)."""
        states: dict[str, dict[str, str]] = {}
        for array in sorted(arrays):
            try:
                text = self._run(["scontrol", "show", "job", "-o", array])
            except SlurmError:
                continue  # purged already: the exit status file must tell
            for line in text.splitlines():
                fields = dict(
                    item.split("=", 1) for item in line.split() if "=" in item and item[0] != "="
                )
                element = f"{fields.get('ArrayJobId', '')}_{fields.get('ArrayTaskId', '')}"
                states[element] = fields
        return states

    def _outcome(self, job: JobRequest, fields: dict[str, str] | None) -> JobExit:
        status_file = job.paths.exit_status
        if status_file.is_file():
            try:
                return JobExit(int(status_file.read_text().strip()))
            except ValueError:
                pass
        if not fields:
            return JobExit(None, "Slurm no longer knows the job and it left no exit status")
        state = fields.get("JobState", "?")
        code, _, sig = fields.get("ExitCode", "").partition(":")
        returncode = -int(sig) if sig.isdigit() and int(sig) else (int(code) if code else None)
        reason = f"Slurm state {state}, exit code {fields.get('ExitCode', '?')}"
        if fields.get("Reason") not in (None, "None"):
            reason += f", reason {fields['Reason']}"
        return JobExit(returncode, reason)

    def _report(self, job: JobRequest, outcome: JobExit) -> None:
        try:
            self._on_exit(job, outcome)
        except Exception:
            logger.exception("handling the end of job %s failed", job.name)

    # --- commands --------------------------------------------------------------------

    def _run(self, argv: list[str], retry_transient: bool = False) -> str:
        """Run a Slurm command; return stdout. Raises SlurmError with its stderr
        (a transient failure too, once the attempts ``retry_transient`` allows are spent)."""
        retrying = retry(
            retry=retry_if_exception_type(TransientError),
            wait=wait_exponential(multiplier=0.5, max=10),
            stop=stop_after_attempt(5 if retry_transient else 1),
            reraise=True,
        )
        try:
            return retrying(self._run_once)(argv)
        except TransientError as exc:
            raise SlurmError(str(exc)) from exc

    def _run_once(self, argv: list[str]) -> str:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self._timeout, check=False
            )
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]} not found: is Slurm installed here?") from None
        except subprocess.TimeoutExpired:
            raise TransientError(f"{argv[0]} did not answer in {self._timeout:g} s") from None
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
            kind = TransientError if _TRANSIENT.search(message) else SlurmError
            raise kind(f"{' '.join(argv[:1])} failed: {message}")
        return done.stdout
