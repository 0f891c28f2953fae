"""What every backend is: a translation of jobs into an engine's submit, status and cancel."""

from __future__ import annotations

import abc
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idds_fat.errors import IddsFatError
from idds_fat.workdir import JobPaths

if TYPE_CHECKING:
    from idds_fat.config import Config

logger = logging.getLogger(__name__)


class TransientError(IddsFatError):
    """A backend's call to its engine failed in a way worth trying again: a command
    that timed out, a controller that was busy, an HTTP 5xx, 408 or 429.

    Backends retry it with back-off and, once the attempts are spent, raise their
    own error in its place (``SlurmError``, ``PandaUnavailableError``): it does not
    reach the user. ``response`` is the HTTP response that was refused, if any.
    """

    def __init__(self, message: str, response: Any = None) -> None:
        super().__init__(message)
        self.response = response


def killed_by(returncode: int) -> str:
    """Describe the death of a process whose return code ``returncode`` is a negated signal."""
    try:
        return f"killed by signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass(frozen=True)
class Resources:
    """What one job asks for. ``None`` means the backend's default.

    Attributes:
        cores: CPU cores.
        memory_mb: memory in MiB.
        gpus: GPU devices of its own.
        walltime: seconds before the job is killed.
        jobs_per_worker: on batch backends, how many jobs of a task one batch
            job (a Slurm array element, a PanDA job) runs in sequence in one
            interpreter, each result published as soon as it is done; the
            resources above are then those of the batch job.
    """

    cores: int | None = None
    memory_mb: int | None = None
    gpus: int | None = None
    walltime: float | None = None
    jobs_per_worker: int | None = None

    def merged(self, override: Resources) -> Resources:
        """Return these resources with every field that ``override`` sets replaced."""
        return Resources(
            *(
                getattr(override, name)
                if getattr(override, name) is not None
                else getattr(self, name)
                for name in ("cores", "memory_mb", "gpus", "walltime", "jobs_per_worker")
            )
        )


class InlineSpec:
    """A job spec's JSON, carried with the job's request until the spec is stored.

    The workflow drops the text (``text = None``) once the spec is in the cache:
    from then on whoever runs the job reads it there, and a long map keeps no
    copy of every spec in memory while its jobs wait.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text: str | None = text


@dataclass(frozen=True)
class JobRequest:
    """One job for a backend to run: the wrapper with a spec, in a work dir.

    Attributes:
        job_id: unique in the workflow (``task_id/index``).
        name: readable name for logs and messages (no secrets).
        spec_location: path or URL of the job spec (the wrapper's ``--spec``).
        workdir: the job's directory; its stdout and stderr go there.
        resources: what it asks for.
        spec_key: the cache key of the job spec, for the workflow to read it back
            (to run the job again, or after attaching); backends need not use it.
        inline_spec: the job spec itself while it is not yet in the cache (see
            ``spec_json``), or None.
    """

    job_id: str
    name: str
    spec_location: str
    workdir: Path
    resources: Resources = field(default_factory=Resources)
    spec_key: str = ""
    # Not in the repr: on S3 a spec holds presigned URLs.
    inline_spec: InlineSpec | None = field(default=None, repr=False, compare=False)

    @property
    def spec_json(self) -> str | None:
        """The job spec's JSON (whose sha256 is ``spec_key``) while the spec is not yet
        in the cache, for a backend to hand its warm workers with the job: they
        check it against the key and read no cache. Only a backend whose
        ``runs_inline_specs`` said yes for the job's resources gets a job whose spec
        is not stored yet (docs/backends/local.md, "Job specs inline"). None: read
        the spec from ``spec_location``."""
        return None if self.inline_spec is None else self.inline_spec.text

    @property
    def paths(self) -> JobPaths:
        """The files in the job's work dir: its stdout, stderr, exit status."""
        return JobPaths(self.workdir)


@dataclass(frozen=True)
class JobExit:
    """How a job's process ended, as a backend saw it.

    Attributes:
        returncode: the exit status (negative: killed by that signal); None if unknown.
        reason: a short human-readable cause when it is not a plain exit.
        cancelled: the job was cancelled on request.
        result: the job's signed result message, when the backend got it straight
            from the job (``BackendSetup.direct_results``) instead of the job
            delivering it to a result channel; the workflow verifies it like any other.
        log: the file with what the process printed on stderr, when that is not
            the job's own ``stderr.txt`` (a warm worker that died before it
            started the job wrote only to its own log).
        no_result: the backend knows the job handed no result to a channel, whatever
            ``returncode`` says (a warm worker that died during the job: its exit
            status is not the job's report of a delivery). The workflow reads the
            result store once and, without the result there, reports the job lost
            at once instead of waiting out a grace period for it.
    """

    returncode: int | None
    reason: str = ""
    cancelled: bool = False
    result: bytes | None = field(default=None, repr=False)
    log: Path | None = None
    no_result: bool = False


#: Called by a backend, from any thread, when a job has ended.
ExitCallback = Callable[[JobRequest, JobExit], None]
#: Called by a backend when a job has started, with how the backend knows it.
StartCallback = Callable[[JobRequest, str], None]


@dataclass(frozen=True)
class BackendSetup:
    """What a workflow hands the backend it starts.

    Attributes:
        work_dir: the workflow's work dir (job dirs live below it).
        wrapper_path: the wrapper file on this machine.
        secrets: the job secrets (HMAC key, tokens); the backend must get them to
            jobs without putting them on a command line, in a job name or a log.
        on_exit: called when a job has ended.
        on_start: called when a job has started, with the backend's reference to
            it (a pid, a Slurm array element), which ``adopt`` takes back.
        wrapper_url: where the wrapper can be fetched over HTTP, if it can.
        placement: the workflow's placement options (iDDS ``queue``, ``site``,
            ``cloud``, ...), for backends that use them.
        direct_results: the backend may hand a job's result back in
            ``JobExit.result`` rather than have the job deliver it (the local
            backend's warm workers do, over their pipe).
        service_url: the URL of the service this process embeds (None when the
            workflow uses a service elsewhere): where pilots lease their jobs.
    """

    work_dir: Path
    wrapper_path: Path
    secrets: Mapping[str, Any]
    on_exit: ExitCallback
    on_start: StartCallback | None = None
    wrapper_url: str | None = None
    placement: Mapping[str, Any] = field(default_factory=dict)
    direct_results: bool = False
    service_url: str | None = None


class Backend(abc.ABC):
    """Runs jobs. Subclasses translate to one engine (local processes, Slurm, PanDA).

    A backend knows nothing of results: it reports how each job ended through the
    ``on_exit`` callback given at construction, and the workflow decides whether
    a result arrived.
    """

    name: str = "?"
    #: Workflow and work parameters this backend honours; others are warned about.
    supported_parameters: frozenset[str] = frozenset()

    @classmethod
    @abc.abstractmethod
    def create(cls, config: Config, setup: BackendSetup) -> Backend:
        """Build the backend from the workflow's configuration."""

    @abc.abstractmethod
    def check(self, resources: Resources) -> None:
        """Raise ValueError if no job of this backend could get ``resources``."""

    @abc.abstractmethod
    def submit(self, jobs: Sequence[JobRequest]) -> None:
        """Queue ``jobs``; return without waiting for them."""

    def runs_inline_specs(self, resources: Resources) -> bool:
        """Return whether every job asking for ``resources`` runs from the spec its
        request carries (``JobRequest.spec_json``), never from the cache: the
        workflow may then hand such jobs over before their specs are stored, and
        store them while the jobs run.

        The default says no (a batch job reads its spec from the cache): the
        workflow stores every spec before it submits the job.
        """
        return False

    def submit_after(self, jobs: Sequence[JobRequest], inputs: Sequence[str]) -> bool:
        """Queue ``jobs`` (of one task) to start only once the jobs ``inputs`` (job ids of
        this workflow, submitted through this backend) have ended cleanly, if this
        backend's engine can hold them itself; return whether it did.

        The default cannot: it returns False and submits nothing, and the workflow
        submits the jobs itself when their inputs are done. Raises what ``submit``
        raises.
        """
        return False

    def node_urls(self, keys: Sequence[str], read: Callable[[str], bytes]) -> dict[str, str]:
        """Return, for some of these cache objects (the code context, a task's
        payload), a URL its jobs read it from instead of the workflow's cache, where
        this backend's engine keeps files of its own (``read(key)`` gives the bytes
        to put there). Jobs still check the bytes against the key.

        The default keeps every object in the workflow's cache: it returns ``{}``.
        Raises what putting a file there raises.
        """
        return {}

    @abc.abstractmethod
    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel these jobs: drop them if queued, kill them if running."""

    def adopt(self, jobs: Sequence[tuple[JobRequest, str]]) -> None:
        """Watch jobs that an earlier caller started, given the references it recorded.

        The default cannot watch them: their results still arrive, but a job that
        dies without one is not noticed. Backends that can, override this.
        """
        if jobs:
            logger.warning(
                "the %s backend cannot watch %d job(s) started by an earlier caller",
                self.name,
                len(jobs),
            )

    def adopt_unrecorded(self, jobs: Sequence[JobRequest]) -> list[JobRequest]:
        """Watch, as :meth:`adopt` does, those of ``jobs`` (recorded as never started)
        that a process an earlier caller started took after all, that caller having
        gone away before it recorded their start; return them (the workflow must not
        submit them again).

        The default cannot tell: it returns ``[]``. Raises nothing.
        """
        return []

    @abc.abstractmethod
    def shutdown(self, cancel: bool = False, wait: bool = True) -> None:
        """Free the backend's resources: after waiting for every job to end (or
        cancelling them all first); with ``wait=False``, at once, leaving running
        jobs to run (a later ``adopt`` can watch them again)."""
