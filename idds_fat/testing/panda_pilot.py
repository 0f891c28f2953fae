"""A stand-in for the PanDA pilot, for tests against :class:`~idds_fat.testing.PandaServer`.

What it does, as pilot3 does it for a job without input or output files::

    POST pilot/acquire_jobs (site_name=QUEUE)      -> a job: PandaID, transformation,
                                                      jobPars (${IN/L} expanded by the
                                                      server), logFile, logGUID, secrets
    POST pilot/update_job job_status=running        then every `heartbeat` s while it runs;
                                                      a "tobekilled" answer kills it
    in a scratch dir: panda_secrets.json (the user secrets, mode 0600), the
    transformation downloaded from its URL, then `<transformation> <jobPars>` in bash
    POST pilot/update_job job_status=finished|failed, exit codes, the stdout tail and
    the log file record (job_output_report: {logFile: {guid, fsize, adler32, surl}})

What a real pilot does that this does not: it gets the queue's description from
CRIC (copy tools, storages, container settings) and checks its resources; it
stages input files in and output and log files out (the log tarball here stays
in the scratch dir; its record names it by ``file://``); it runs the payload in a
container when asked, under a proxy it checks and renews; it monitors memory, disk
and looping jobs; it reports pilot error codes for all of those. The real pilot
(``panda-pilot`` on PyPI) needs CRIC's queue and storage data; not tried here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tarfile
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from idds_fat.errors import IddsFatError

logger = logging.getLogger(__name__)

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_STDOUT_TAIL = 2000


class PandaPilotError(IddsFatError):
    """The server refused what a pilot asks (a job, an update)."""


@dataclass(frozen=True)
class PilotJob:
    """One job a pilot ran: PanDA's id, how it ended and where it ran."""

    panda_id: int
    task_id: int
    status: str
    exit_code: int | None
    work_dir: Path
    killed: bool = False


class PandaPilot:
    """Pilots for one PanDA queue: ``slots`` threads, each acquiring and running one
    job at a time, as that many pilots on a worker node would.

    Args:
        api_url: the server's ``/api/v1`` (:attr:`PandaServer.api_url`).
        queue: the PanDA queue whose jobs it takes.
        work_dir: scratch dirs of the jobs go below it, one per job attempt.
        slots: jobs run at once.
        poll: seconds between ``acquire_jobs`` while the queue is empty.
        heartbeat: seconds between ``running`` updates of a running job.
        env: the environment payloads run with (default: this process's, without
            ``IDDS_FAT_*`` and PanDA credentials).

    Pilots call without credentials: the test server's front end gives such calls
    the production identity, as a pilot's production proxy would have.
    """

    def __init__(
        self,
        api_url: str,
        queue: str,
        work_dir: Path,
        *,
        slots: int = 2,
        poll: float = 0.5,
        heartbeat: float = 5.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.queue = queue
        self.work_dir = Path(work_dir)
        self.slots = slots
        self.poll = poll
        self.heartbeat = heartbeat
        self.env = env if env is not None else _payload_env()
        self.jobs: list[PilotJob] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._payloads: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
        self._lock = threading.Lock()
        self._session = requests.Session()

    @property
    def running(self) -> dict[int, int]:
        """The jobs whose payloads run now: ``{PandaID: jediTaskID}``."""
        with self._lock:
            return {panda_id: task for panda_id, (task, _) in self._payloads.items()}

    def start(self) -> None:
        """Start the pilots (threads); they take jobs until :meth:`stop`."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        for slot in range(self.slots):
            thread = threading.Thread(target=self._loop, name=f"panda-pilot-{slot}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, kill the payloads still running (reported failed), and
        wait for the pilots."""
        self._stopping.set()
        with self._lock:
            payloads = [payload for _, payload in self._payloads.values()]
        for payload in payloads:
            _kill_group(payload)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def __enter__(self) -> PandaPilot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_one(self) -> PilotJob | None:
        """Acquire one job and run it to its end; None when the queue has none.

        Raises:
            PandaPilotError: the server refused a call.
            requests.RequestException: the server could not be reached.
        """
        try:
            reply = self._call(
                "pilot/acquire_jobs",
                site_name=self.queue,
                node="localhost",
                n_jobs=1,
                prod_source_label="user",
            )
        except PandaPilotError as exc:
            if "no jobs" in str(exc).lower():
                return None
            raise
        data = reply.get("data") or {}
        if isinstance(data, dict) and "jobs" in data:
            data = data["jobs"][0] if data["jobs"] else {}
        if not isinstance(data, dict) or not data.get("PandaID"):
            return None
        return self._run(data)

    # --- internals ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.run_one()
            except Exception:  # a pilot that dies is replaced by the next loop
                logger.exception("pilot for %s failed; trying again", self.queue)
                job = None
            if job is None:
                self._stopping.wait(self.poll)

    def _call(self, operation: str, **body: Any) -> dict[str, Any]:
        response = self._session.post(
            f"{self.api_url}/{operation}",
            json=body,
            headers={"Accept": "application/json"},
            timeout=60,
        )
        response.raise_for_status()
        reply = response.json()
        if not reply.get("success"):
            raise PandaPilotError(f"PanDA refused {operation}: {reply.get('message')}")
        return reply

    def _update(self, panda_id: int, status: str, **fields: Any) -> dict[str, Any]:
        reply = self._call(
            "pilot/update_job",
            job_id=panda_id,
            job_status=status,
            node="localhost",
            site_name=self.queue,
            **fields,
        )
        return reply.get("data") or {}

    def _run(self, job: dict[str, Any]) -> PilotJob:
        panda_id = int(job["PandaID"])
        attempt = int(job.get("attemptNr") or 0)
        work = self.work_dir / f"{panda_id}.{attempt}"
        work.mkdir(parents=True, exist_ok=True)
        logger.info("pilot runs PanDA job %d of task %s", panda_id, job.get("taskID"))
        began = time.gmtime()
        self._update(panda_id, "running", attempt_nr=attempt, start_time=_utc(began))
        if job.get("secrets"):
            # pilot3 writes the user's secrets there, readable by the payload only.
            secrets = job["secrets"]
            text = secrets if isinstance(secrets, str) else json.dumps(secrets)
            fd = os.open(work / "panda_secrets.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        transformation = str(job["transformation"])
        if transformation.startswith(("http://", "https://")):
            local = work / transformation.rstrip("/").rsplit("/", 1)[-1]
            with urllib.request.urlopen(transformation, timeout=60) as response:
                local.write_bytes(response.read())
            local.chmod(0o755)
            transformation = str(local)
        command = f"{transformation} {job.get('jobPars') or ''}"
        env = {**self.env, "PandaID": str(panda_id), "PANDA_RESOURCE": self.queue}
        with open(work / "payload.stdout", "wb") as out, open(work / "payload.stderr", "wb") as err:
            payload = subprocess.Popen(
                ["/bin/bash", "-c", command],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            with self._lock:
                self._payloads[panda_id] = (int(job.get("taskID") or 0), payload)
            killed = self._watch(panda_id, attempt, payload)
            payload.wait()  # a killed payload's status too, not None
            with self._lock:
                self._payloads.pop(panda_id, None)
        code = payload.returncode
        status = "finished" if code == 0 and not killed else "failed"
        stdout = (work / "payload.stdout").read_bytes().decode("utf-8", "replace")
        stderr = (work / "payload.stderr").read_bytes().decode("utf-8", "replace")
        report = _log_record(work, job)
        self._update(
            panda_id,
            status,
            attempt_nr=attempt,
            trans_exit_code=code,
            exe_error_code=code,
            exe_error_diag=stderr[-200:] if status == "failed" else "",
            pilot_error_code=0,
            start_time=_utc(began),
            end_time=_utc(time.gmtime()),
            stdout=stdout[-_STDOUT_TAIL:],
            job_output_report=json.dumps(report),
        )
        ended = PilotJob(panda_id, int(job.get("taskID") or 0), status, code, work, killed)
        with self._lock:
            self.jobs.append(ended)
        logger.info("PanDA job %d %s (exit code %s)", panda_id, status, code)
        return ended

    def _watch(self, panda_id: int, attempt: int, payload: subprocess.Popen[bytes]) -> bool:
        """Wait for the payload, sending heartbeats; kill it when the server says so."""
        while True:
            try:
                payload.wait(self.heartbeat)
                return False
            except subprocess.TimeoutExpired:
                pass
            if self._stopping.is_set():
                _kill_group(payload)
                return True
            try:
                answer = self._update(panda_id, "running", attempt_nr=attempt)
            except (PandaPilotError, requests.RequestException) as exc:
                logger.warning("heartbeat of PanDA job %d failed: %s", panda_id, exc)
                continue
            if answer.get("command") in ("tobekilled", "softkill"):
                logger.info("PanDA asked to kill job %d", panda_id)
                _kill_group(payload)
                return True


def _log_record(work: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Tar the payload's output as the job's log file; return the record pilots report."""
    name = str(job.get("logFile") or f"{job['PandaID']}.log.tgz")
    path = work / name
    with tarfile.open(path, "w:gz") as tar:
        for part in ("payload.stdout", "payload.stderr"):
            tar.add(work / part, arcname=part)
    data = path.read_bytes()
    return {
        name: {
            "guid": job.get("logGUID"),
            "fsize": len(data),
            "adler32": f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
            "surl": path.as_uri(),
        }
    }


def _kill_group(payload: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(payload.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _utc(moment: time.struct_time) -> str:
    return time.strftime(_TIME_FORMAT, moment)


def _payload_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("IDDS_FAT_", "PANDA_AUTH", "OIDC_", "X509_"))
    }
