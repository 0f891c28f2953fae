"""The ``panda`` backend: each task becomes one PanDA (JEDI) task, each job one of its inputs.

The translation follows what iDDS builds for a function-as-a-task
(``BaseSubmitter.get_task_params``): a task with a pseudo input of one entry
per job, so JEDI makes one PanDA job per entry, and a constant job command in
which ``${IN/L}`` becomes that job's entry. Our entry names the job's spec URL
in the HTTP cache; the command fetches the wrapper from the cache and runs it.

Everything is spoken over PanDA's ``/api/v1`` (JSON) interface, as panda-client
1.6 does. The reference for every call is ``/work/shared/PANDA_API.md``; the
section of each is named where it is used.

Secrets (the workflow's HMAC key and service token) never go into the task
parameters: they are stored as a PanDA *user secret* under a random name
(``POST /api/v1/creds/set_user_secrets``), the task asks for them with
``useSecrets``, the pilot writes them into ``panda_secrets.json`` in the job's
directory, and the job command (``bootstrap.py``) takes the one we named out of
it and hands it to the wrapper on a pipe. The secret is deleted when the
backend shuts down.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import re
import secrets as _random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from idds_fat.backends.base import (
    Backend,
    ExitCallback,
    JobExit,
    JobRequest,
    Resources,
    StartCallback,
)
from idds_fat.backends.panda.auth import PandaAuth
from idds_fat.backends.panda.bootstrap import BOOTSTRAP_B64
from idds_fat.backends.panda.client import _SHELL_SAFE, PandaClient
from idds_fat.backends.panda.errors import PandaAuthError, PandaError
from idds_fat.backends.watcher import WATCHER, Watch
from idds_fat.errors import ConfigError

if TYPE_CHECKING:
    from idds_fat.config import Config

logger = logging.getLogger(__name__)

#: A payload runner that hands its arguments to bash; panda-server's own DOMA/LSST
#: test tasks use it with a shell command as the constant job parameter.
DEFAULT_TRANS_PATH = "https://atlpan.web.cern.ch/atlpan/bash-c"

#: Task states after which no job of the task runs again (PANDA_API.md §4).
#: ``exhausted`` counts: only the production role may retry it.
FINAL_TASK_STATES = frozenset({"done", "finished", "failed", "aborted", "broken", "exhausted"})

#: Seconds after submit during which "Task not found" is not a lost task: the server
#: knows a task only once JEDI has registered it (several seconds on a live server).
NOT_FOUND_GRACE = 300.0

_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_LOOPBACK_HOSTS = frozenset({"localhost", "::1", "0.0.0.0"})


@dataclass
class _Task:
    """One PanDA task and our jobs in it."""

    panda_id: int
    name: str
    jobs: dict[str, JobRequest]
    status: str = "registered"
    ended: set[str] = dataclasses.field(default_factory=set)  # job ids already reported
    cancelled: set[str] = dataclasses.field(default_factory=set)
    kill_requested: bool = False
    # PanDA refused the kill (before JEDI registered the task it is "not the task
    # owner"): polls try again once the task is known.
    kill_pending: bool = False
    unknown_polls: int = 0
    seen: bool = False  # PanDA has answered a status for it
    submitted_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def open_jobs(self) -> list[JobRequest]:
        return [job for job_id, job in self.jobs.items() if job_id not in self.ended]


class PandaBackend(Backend):
    """Runs each task as one PanDA task, one PanDA job per job of the task.

    A submit of N jobs inserts one task whose pseudo input has N entries, each
    the URL of one job's spec, so JEDI makes N jobs; each job's command fetches
    the wrapper from ``wrapper_url`` and runs it on its spec. The process-wide
    status watcher (``backends/watcher.py``) asks PanDA for the status of every
    unfinished task (one call per task, not per job), backing off from
    ``poll_min`` to ``poll_max`` seconds while nothing changes. The documented
    calls give task-level states only, so jobs are reported when their task
    reaches a final state: ``done`` means every job succeeded (exit 0);
    ``finished``, ``failed``, ``broken`` and ``exhausted`` report each job
    without a result as failed, with the task's state and job statistics in
    the reason.

    Args:
        on_exit: called with ``(job, JobExit)`` when a job has ended.
        wrapper_url: HTTP(S) URL of the wrapper in the cache, ending in its sha256.
        job_secrets: the jobs' secrets (``IDDS_FAT_JOB_SECRETS`` JSON). Stored as
            the PanDA user secret ``secret_name`` and delivered by the pilot; never
            in task parameters. ``None``: the node must provide them itself.
        server_url, cache_url, auth: PanDA server, cache and credentials
            (defaults: ``PANDA_URL_SSL``, ``PANDACACHE_URL``, :meth:`PandaAuth.from_env`).
        client: a ready :class:`PandaClient` (then the three above are not used).
        queue, site, cloud: task parameters ``site`` (the PanDA queue), ``PandaSite``
            and ``cloud``, as iDDS maps them.
        container_image: task parameter ``container_name``.
        max_attempt: PanDA's attempts per job (``maxAttempt`` and ``maxFailure``).
        poll_min, poll_max: seconds between status polls (backing off between them).
        vo, prod_source_label, task_type, priority, user_name, working_group,
            architecture, processing_type: task parameters of the same meaning. Without
            the production role PanDA overrides ``userName``, ``taskType`` and
            ``taskPriority``.
        trans_path: payload runner that executes the job command with bash.
        python: the interpreter jobs run on the node.
        secret_name: name of the PanDA user secret (default: random per backend).
        on_start: called with ``(job, reference)`` once a job is in a PanDA task;
            the reference (``<jediTaskID>:<secret name>``) is what :meth:`adopt`
            takes back when another caller attaches.
        panda_cache: put the code context and each task's payload into PanDA's
            cache (``file_server/upload_cache_file``, as iDDS and prun put sources)
            and have jobs read them from there (:meth:`node_urls`); the job specs,
            arguments and results stay with the workflow's service. PanDA's cache
            is readable by the site's users: leave it off for code that must not be.

    Raises:
        ConfigError: a URL grid nodes cannot use, or a bad option.
        PandaAuthError: no credentials found.
    """

    name = "panda"
    supported_parameters = frozenset(
        {
            "cores",
            "memory_mb",
            "walltime",
            "queue",
            "site",
            "cloud",
            "container_options",
            "jobs_per_worker",
        }
    )

    def __init__(
        self,
        *,
        on_exit: ExitCallback,
        wrapper_url: str,
        job_secrets: Mapping[str, Any] | None = None,
        server_url: str | None = None,
        cache_url: str | None = None,
        auth: PandaAuth | None = None,
        client: PandaClient | None = None,
        queue: str | None = None,
        site: str | None = None,
        cloud: str | None = None,
        container_image: str | None = None,
        max_attempt: int = 5,
        poll_min: float = 30.0,
        poll_max: float = 600.0,
        vo: str = "wlcg",
        prod_source_label: str = "user",
        task_type: str = "anal",
        priority: int = 1000,
        user_name: str = "idds-fat",
        working_group: str | None = None,
        architecture: str = "",
        processing_type: str = "idds-fat",
        trans_path: str = DEFAULT_TRANS_PATH,
        python: str = "python3",
        secret_name: str | None = None,
        on_start: StartCallback | None = None,
        panda_cache: bool = False,
    ) -> None:
        _check_node_url(wrapper_url, "wrapper_url")
        if not _SHELL_SAFE.match(python):
            raise ConfigError(f"python must be a plain command or path, not {python!r}")
        if not 1 <= max_attempt <= 50:
            raise ConfigError(f"max_attempt must be between 1 and 50, not {max_attempt}")
        if not 0 < poll_min <= poll_max:
            raise ConfigError(f"need 0 < poll_min <= poll_max, not {poll_min} and {poll_max}")
        self._secret_name = secret_name or f"IDDS_FAT_{_random.token_hex(8).upper()}"
        if not _SECRET_NAME.match(self._secret_name):
            raise ConfigError(f"secret_name must be an environment variable name: {secret_name!r}")
        self._on_exit = on_exit
        self._on_start = on_start
        self._wrapper_url = wrapper_url
        # Serialised once; never logged, never part of a task parameter.
        self._secrets_json = json.dumps(dict(job_secrets)) if job_secrets is not None else None
        self._client = client or PandaClient(server_url, auth, cache_url=cache_url)
        self._placement = {"site": queue, "PandaSite": site, "cloud": cloud}
        self._container_image = container_image
        self._max_attempt = max_attempt
        self._poll_min = poll_min
        self._poll_max = poll_max
        self._task_fields = {
            "userName": user_name,
            "vo": vo,
            "prodSourceLabel": prod_source_label,
            "taskPriority": priority,
            "taskType": task_type,
            "processingType": processing_type,
            "architecture": architecture,
            "transUses": "",
            "transHome": None,
            "transPath": trans_path,
        }
        if working_group:
            self._task_fields["workingGroup"] = working_group
        self._python = python
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._tasks: dict[int, _Task] = {}
        self._secret_stored = False
        # Secrets of earlier callers whose tasks this backend adopted: deleted at
        # shutdown, once those tasks have ended.
        self._adopted_secrets: set[str] = set()
        self._watch: Watch | None = None
        self._closed = False
        self._panda_cache = panda_cache
        self._cached: dict[str, str] = {}  # cache key -> its URL in PanDA's cache

    @classmethod
    def create(cls, config: Config, setup: Any) -> PandaBackend:
        """Build the backend for a workflow: server and credentials from the environment.

        Uses ``setup.on_exit``, ``setup.on_start``, ``setup.wrapper_url``,
        ``setup.secrets`` and the ``queue``, ``site``, ``cloud`` and
        ``container_options["container_image"]``
        of ``setup.placement`` (a :class:`~idds_fat.backends.base.BackendSetup`),
        the ``panda_cache`` setting of ``config``;
        ``PANDA_URL_SSL``, ``PANDACACHE_URL`` and the auth variables as
        panda-client reads them.

        Raises:
            ConfigError: the workflow's cache is not an HTTP cache grid nodes can reach.
            PandaAuthError: no credentials found.
        """
        if not getattr(setup, "wrapper_url", None):
            raise ConfigError(
                "the panda backend needs an HTTP cache that grid nodes can reach: run "
                "`idds-fat serve` on a public host and set service_url and cache='service'"
            )
        placement = dict(getattr(setup, "placement", None) or {})
        container = placement.get("container_options") or {}
        backend = cls(
            on_exit=setup.on_exit,
            on_start=getattr(setup, "on_start", None),
            wrapper_url=setup.wrapper_url,
            job_secrets=setup.secrets,
            queue=placement.get("queue"),
            site=placement.get("site"),
            cloud=placement.get("cloud"),
            container_image=container.get("container_image"),
            panda_cache=config is not None and config.panda_cache,
        )
        backend.check_credentials()
        return backend

    def check_credentials(self) -> None:
        """Check with PanDA that it accepts this backend's credentials.

        :meth:`create` calls it, so credentials PanDA refuses stop the workflow at
        its start, before anything is submitted, rather than at the first call.

        Raises:
            PandaAuthError: PanDA refused the credentials (wrong, forged or expired
                token, another audience, not a member of the VO; a bad proxy); the
                message says which credentials, never the token.
            PandaUnavailableError: the server could not be reached.
        """
        try:
            attributes = self._client.voms_attributes()
        except PandaAuthError as exc:
            raise PandaAuthError(
                f"PanDA refused this workflow's credentials ({self._client.auth.describe()}) "
                f"before anything was submitted: {exc}",
                exc.operation,
                status=exc.status,
            ) from None
        logger.info("PanDA accepted the credentials (%d VOMS attribute(s))", len(attributes))

    @property
    def client(self) -> PandaClient:
        """The HTTP client this backend uses (for :meth:`PandaClient.put_file` and the like)."""
        return self._client

    @property
    def secret_name(self) -> str:
        """Name of the PanDA user secret that carries the job secrets (not the secret)."""
        return self._secret_name

    def put_file(
        self, source: bytes | str | os.PathLike[str], name: str | None = None, reuse: bool = True
    ) -> str:
        """Put a file (e.g. the code context) into PanDA's cache; return its download URL.

        See :meth:`PandaClient.put_file`.
        """
        return self._client.put_file(source, name, reuse=reuse)

    def node_urls(self, keys: Sequence[str], read: Callable[[str], bytes]) -> dict[str, str]:
        """With ``panda_cache``, put these objects (code context, payload) into PanDA's
        cache once each, named ``sources.idds-fat-<key>`` (the key is their sha256);
        return the URLs jobs read them from. Without it, ``{}``.

        Raises:
            PandaError: PanDA refused a file (over its size limit, or not accepted).
        """
        if not self._panda_cache:
            return {}
        urls = {}
        for key in keys:
            with self._lock:
                url = self._cached.get(key)
            if url is None:
                url = self._client.put_file(read(key))
                if not url.endswith(f"-{key}"):
                    raise PandaError(f"PanDA's cache named object {key} otherwise: {url}")
                with self._lock:
                    self._cached[key] = url
            urls[key] = url
        return urls

    def check(self, resources: Resources) -> None:
        """Raise ValueError for resources no PanDA task of this backend can ask for.

        GPUs are refused: no documented task parameter requests them (pick a GPU
        queue with ``queue=`` instead).
        """
        if resources.gpus:
            raise ValueError(
                "the panda backend cannot request GPUs per job; send the task to a GPU "
                "queue with queue=... and leave gpus unset"
            )
        if resources.cores is not None and resources.cores < 1:
            raise ValueError(f"cores must be at least 1, not {resources.cores}")
        if resources.memory_mb is not None and resources.memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, not {resources.memory_mb}")
        if resources.walltime is not None and resources.walltime <= 0:
            raise ValueError(f"walltime must be positive, not {resources.walltime}")

    def submit(self, jobs: Sequence[JobRequest]) -> None:
        """Insert one PanDA task per group of ``jobs`` (same workflow task and resources).

        When PanDA refuses, every job of this call not yet in a task is also
        reported through ``on_exit`` (with PanDA's message), so no job is left
        waiting for an end that cannot come.

        Raises:
            ValueError: a job's resources cannot be had, or its spec is not an HTTP URL.
            PandaError: PanDA refused the secret or the task, or could not be reached.
        """
        for job in jobs:
            self.check(job.resources)
            _check_node_url(job.spec_location, f"the spec of {job.name}")
        if self._closed:
            raise PandaError("this PanDA backend is shut down")
        groups: dict[tuple[str, Resources], list[JobRequest]] = {}
        for job in jobs:
            groups.setdefault((job.job_id.rsplit("/", 1)[0], job.resources), []).append(job)
        pending = list(groups.values())
        try:
            if pending:
                self._store_secret()
            while pending:
                group = pending[0]
                params = self.task_parameters(group)
                panda_id = self._client.submit_task(params)
                task = _Task(panda_id, params["taskName"], {job.job_id: job for job in group})
                with self._lock:
                    self._tasks[panda_id] = task
                pending.pop(0)
                logger.info(
                    "submitted PanDA task %d (%s) with %d job(s)", panda_id, task.name, len(group)
                )
                self._started(task)
        except PandaError as exc:
            reason = f"not submitted to PanDA: {exc}"
            self._report([(job, JobExit(None, reason)) for group in pending for job in group])
            raise
        finally:
            if self._tasks:
                self._start_poller()

    def task_parameters(self, jobs: Sequence[JobRequest]) -> dict[str, Any]:
        """Return the task parameter map for ``jobs`` (one PanDA task, one input each).

        Shaped like iDDS's for a function-as-a-task (PANDA_API.md §3). It names the
        secret but never holds it.
        """
        resources = jobs[0].resources
        cores = resources.cores or 1
        base = _slug(jobs[0].name.rsplit("/", 1)[0] if "/" in jobs[0].name else jobs[0].job_id)
        task_name = f"idds-fat.{base}.{_random.token_hex(4)}"[:128]
        params: dict[str, Any] = {"taskName": task_name, **self._task_fields}
        params.update({key: value for key, value in self._placement.items() if value})
        if self._container_image:
            params["container_name"] = self._container_image
        params["coreCount"] = cores
        if resources.memory_mb:
            params["ramCount"] = math.ceil(resources.memory_mb / cores)
            params["ramUnit"] = "MBPerCoreFixed"
        if resources.walltime:
            # JEDI reads maxWalltime in hours, as prun documents it (iDDS passes seconds).
            params["maxWalltime"] = math.ceil(resources.walltime / 3600)
        params["maxAttempt"] = self._max_attempt
        params["maxFailure"] = self._max_attempt
        params["skipScout"] = True  # scouting would hold all but a few jobs back
        if self._secrets_json is not None:
            params["useSecrets"] = True
        params["noInput"] = True
        params["nFiles"] = len(jobs)
        # Packing is JEDI's own: a PanDA job gets this many entries in ${IN/L}.
        params["nFilesPerJob"] = min(resources.jobs_per_worker or 1, len(jobs))
        params["pfnList"] = [pseudo_input(job) for job in jobs]
        params["jobParameters"] = [{"type": "constant", "value": self.job_command()}]
        dataset = f"panda.idds_fat.{task_name}"
        params["log"] = {
            "type": "template",
            "param_type": "log",
            "dataset": dataset + "/",
            "container": dataset + "/",
            "value": dataset + ".${SN}.log.tgz",
        }
        return params

    def job_command(self) -> str:
        """Return the job command: the bootstrap (on stdin) run with ``${IN/L}``.

        Every word is shell-safe, so it works whether the runner passes it to
        ``bash -c`` as one string or the pilot's shell splits it first.
        """
        name = self._secret_name if self._secrets_json is not None else "-"
        return (
            f"echo {BOOTSTRAP_B64} | base64 -d | {self._python} - {name} "
            f"{self._wrapper_url} ${{IN/L}}"
        )

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel jobs: kill a PanDA task once every open job of it is cancelled.

        PanDA kills whole tasks, and nothing maps our jobs to PanDA job IDs, so a
        subset of a task is reported cancelled at once but keeps running on the
        grid (its result is ignored); the task is killed when its last open job
        is cancelled. A kill PanDA refuses is logged, not raised.
        """
        wanted = set(job_ids)
        to_kill: list[_Task] = []
        reports: list[tuple[JobRequest, JobExit]] = []
        with self._lock:
            for task in self._tasks.values():
                hits = {j for j in task.jobs if j in wanted and j not in task.ended}
                if not hits:
                    continue
                task.cancelled |= hits
                if not task.kill_requested and all(j in task.cancelled for j in task.jobs):
                    task.kill_requested = True
                    to_kill.append(task)
                for job_id in sorted(hits):
                    task.ended.add(job_id)
                    reports.append((task.jobs[job_id], JobExit(None, "cancelled", cancelled=True)))
            self._changed.notify_all()
        for task in to_kill:
            self._kill(task)
        self._report(reports)

    def adopt(self, jobs: Sequence[tuple[JobRequest, str]]) -> None:
        """Follow PanDA tasks an earlier caller submitted, given the references its
        ``on_start`` recorded (``<jediTaskID>:<secret name>``).

        Their jobs are reported like this backend's own; the earlier caller's
        user secret, which their jobs still read, is deleted at :meth:`shutdown`.

        Raises:
            ValueError: a reference is not of that form.
        """
        by_task: dict[int, list[JobRequest]] = {}
        for job, ref in jobs:
            task_id, _, secret = ref.partition(":")
            if not task_id.isdigit():
                raise ValueError(f"not a PanDA job reference: {ref!r}")
            by_task.setdefault(int(task_id), []).append(job)
            if secret and secret != "-" and secret != self._secret_name:
                self._adopted_secrets.add(secret)
        with self._lock:
            for panda_id, group in by_task.items():
                task = self._tasks.get(panda_id)
                if task is None:
                    name = f"task {panda_id} of an earlier caller"
                    task = self._tasks[panda_id] = _Task(panda_id, name, {})
                task.jobs.update({job.job_id: job for job in group})
        if by_task:
            logger.info("following %d PanDA task(s) of an earlier caller", len(by_task))
            self._start_poller()

    def _started(self, task: _Task) -> None:
        if self._on_start is None:
            return
        secret = self._secret_name if self._secrets_json is not None else "-"
        for job in task.jobs.values():
            try:
                self._on_start(job, f"{task.panda_id}:{secret}")
            except Exception:  # a failing callback must not lose the task
                logger.exception("on_start failed for %s", job.name)

    def _kill(self, task: _Task) -> None:
        try:
            self._client.kill_task(task.panda_id)
            task.kill_pending = False
            logger.info("asked PanDA to kill task %d (%s)", task.panda_id, task.name)
        except PandaError as exc:
            # Code 4: the task already ended; anything else before JEDI registered
            # the task ("not the task owner") is worth another try.
            if not task.seen and getattr(exc, "code", None) != 4:
                task.kill_pending = True
                logger.info(
                    "PanDA refused to kill task %d before registering it (%s); "
                    "trying again once it is known",
                    task.panda_id,
                    exc,
                )
            else:
                task.kill_pending = False
                logger.error(
                    "could not kill PanDA task %d (%s): %s; kill it by hand (pbook: kill(%d))",
                    task.panda_id,
                    task.name,
                    exc,
                    task.panda_id,
                )

    def shutdown(self, cancel: bool = False, wait: bool = True) -> None:
        """Wait until PanDA ends every task (or cancel them all first), then clean up.

        Cleaning up deletes the PanDA user secret and closes the connections.
        With ``wait=False`` (detaching), stop polling at once and keep the secret:
        the tasks still running need it.
        """
        if not wait and not cancel:
            self._stop_polling(wait=False)
            return
        if cancel:
            with self._lock:
                open_ids = [j.job_id for t in self._tasks.values() for j in t.open_jobs]
            self.cancel(open_ids)
        if self._watch is not None:
            self._watch.poll_soon(within=self._poll_min)  # rather than after a long backoff
        with self._changed:
            while any(task.open_jobs for task in self._tasks.values()):
                self._changed.wait()
            self._closed = True
        self._stop_polling(wait=True)
        secrets = sorted(self._adopted_secrets)
        if self._secret_stored:
            secrets.append(self._secret_name)
        for name in secrets:
            try:
                self._client.set_user_secret(name, None)
            except PandaError as exc:
                logger.warning(
                    "could not delete the PanDA user secret %s: %s; delete it with pbook",
                    name,
                    exc,
                )
        self._client.close()

    def poll(self) -> bool:
        """Ask PanDA once for the status of every unfinished task; report ended jobs.

        The poller thread calls this; it is public so a caller (or a test) can
        poll at once. Returns whether any task changed state. Errors are logged:
        the next poll tries again.
        """
        with self._poll_lock:  # one poll at a time owns the tasks' status fields
            return self._poll_tasks()

    def _poll_tasks(self) -> bool:
        with self._lock:
            tasks = [t for t in self._tasks.values() if t.open_jobs or t.kill_pending]
        changed = False
        for task in tasks:
            try:
                status = self._client.task_status(task.panda_id)
            except PandaError as exc:
                logger.warning("could not get the status of PanDA task %d: %s", task.panda_id, exc)
                continue
            if status is None:
                if not task.seen and time.monotonic() - task.submitted_at < NOT_FOUND_GRACE:
                    continue  # not registered by JEDI yet
                task.unknown_polls += 1
                if task.unknown_polls >= 3:
                    changed = True
                    self._end_task(task, None, f"PanDA no longer knows task {task.panda_id}")
                continue
            task.unknown_polls = 0
            task.seen = True
            if task.kill_pending:
                self._kill(task)
            if status != task.status:
                changed = True
                logger.info("PanDA task %d (%s) is %s", task.panda_id, task.name, status)
                task.status = status
            if status in FINAL_TASK_STATES:
                changed = True
                self._end_task(task, status, self._statistics(task))
        return changed

    # --- internals ---------------------------------------------------------------------

    def _store_secret(self) -> None:
        with self._lock:
            if self._secrets_json is None or self._secret_stored:
                return
            self._secret_stored = True
        try:
            self._client.set_user_secret(self._secret_name, self._secrets_json)
        except PandaError:
            with self._lock:
                self._secret_stored = False
            raise
        logger.info("stored the job secrets as PanDA user secret %s", self._secret_name)

    def _statistics(self, task: _Task) -> str:
        try:
            details = self._client.task_details(task.panda_id)
        except PandaError as exc:
            logger.warning("could not get the details of PanDA task %d: %s", task.panda_id, exc)
            return ""
        return str(details.get("statistics") or "")

    def _end_task(self, task: _Task, status: str | None, detail: str) -> None:
        exit_for = _exit_mapping(task, status, detail)
        with self._lock:
            reports = [(job, exit_for(job)) for job in task.open_jobs]
            task.ended.update(job.job_id for job, _ in reports)
            self._changed.notify_all()
        self._report(reports)

    def _report(self, reports: list[tuple[JobRequest, JobExit]]) -> None:
        for job, outcome in reports:
            try:
                self._on_exit(job, outcome)
            except Exception:  # a failing callback must not stop the poller
                logger.exception("on_exit failed for %s", job.name)

    def _start_poller(self) -> None:
        with self._lock:
            if self._watch is None:
                self._watch = WATCHER.watch(
                    self.poll, self._poll_min, self._poll_max, "PanDA tasks"
                )
            watch = self._watch
        # New work: poll within poll_min (JEDI needs that long), whatever the backoff was.
        watch.poll_soon(within=self._poll_min)

    def _stop_polling(self, wait: bool) -> None:
        with self._lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close(wait=wait)


def _exit_mapping(task: _Task, status: str | None, detail: str) -> Callable[[JobRequest], JobExit]:
    where = f"PanDA task {task.panda_id}"
    stats = f" (jobs: {detail})" if detail else ""
    if status is None:
        return lambda job: JobExit(None, detail)
    if status == "done":
        return lambda job: JobExit(0, f"{where} is done: all its jobs succeeded{stats}")
    if status == "aborted":
        if task.kill_requested:
            return lambda job: JobExit(None, "cancelled", cancelled=True)
        return lambda job: JobExit(None, f"{where} was aborted outside this workflow{stats}")
    reason = (
        f"{where} ended {status}{stats}; PanDA's job-level errors are on its monitor "
        f"page of task {task.panda_id}"
    )
    return lambda job: JobExit(None, reason)


def pseudo_input(job: JobRequest) -> str:
    """Return the pseudo-input entry of ``job``: url-safe base64 of ``{"spec": URL}``.

    url-safe, unpadded: no ``/`` (JEDI names pseudo files after the basename), no
    ``^`` (its event-count separator) and nothing a shell would touch.
    """
    raw = json.dumps({"spec": job.spec_location}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", ".", text).strip(".")[:80] or "task"


def _check_node_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be an HTTP(S) URL grid nodes can reach, not {url!r}")
    host = parts.hostname
    if host in _LOOPBACK_HOSTS or host.startswith("127."):
        raise ConfigError(
            f"{what} is on this machine's loopback ({host}); grid nodes cannot reach it"
        )
    if not _SHELL_SAFE.match(url):
        raise ConfigError(f"{what} has characters a job command cannot carry: {url!r}")
