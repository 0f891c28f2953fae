"""A pilot: one batch job running warm workers that lease jobs from the caller's service.

::

    pilot process (this module)                      the caller's service
    slot k: --POST /pilots/POOL/lease (long poll)--> LeasePool (service/leases.py)
            <--{"jobs": [{job_id, spec, workdir}]}--
            --{"spec", "workdir"}--> warm worker k   (``wrapper --worker``, worker.py)
            <--{"exit": N}---------  the worker delivered the result (STOMP, then REST)
            --POST /pilots/POOL/done {job, exit}---> the backend reports the job's end

One slot per core of the allocation (``SLURM_CPUS_PER_TASK``), each with a
warm worker of its own, so verified cache objects and the extracted code
context are reused as on the local backend; GPUs the allocation lists in
``CUDA_VISIBLE_DEVICES`` are split among the slots. The pilot leaves when no
job came for ``idle`` seconds, when the service answers that the workflow has
closed (or no longer knows the pool), or when it could not reach the service
for a while; it asks for no job it cannot finish in the time it has left.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .environments import own_file, rerun_environment
from .fetch import http_request, transient
from .spec import secrets_json, secrets_pipe

#: Seconds kept in hand at the end of the allocation: a job leased must also start
#: and deliver its result.
PILOT_MARGIN_SECONDS = 10.0
_PILOT_POLL_SECONDS = 20.0  # the longest lease request (the service caps it at 30)
_PILOT_UNREACHABLE_SECONDS = 60.0  # a service silent this long has gone with its workflow


def pilot_slots(environ: dict | None = None) -> int:
    """How many jobs the pilot runs at once: the cores of its allocation (at least 1)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("SLURM_CPUS_PER_TASK") or environ.get("SLURM_CPUS_ON_NODE") or "1"
    try:
        return max(1, int(raw))
    except ValueError:
        return 1


def split_devices(devices: str, slots: int) -> list[str]:
    """Split a ``CUDA_VISIBLE_DEVICES`` list among ``slots``: each slot its own contiguous
    share; with fewer devices than slots, slots share devices round-robin."""
    ids = [d for d in devices.split(",") if d.strip()]
    if not ids:
        return [""] * slots
    if len(ids) < slots:
        return [ids[k % len(ids)] for k in range(slots)]
    shares = []
    for k in range(slots):
        start, end = k * len(ids) // slots, (k + 1) * len(ids) // slots
        shares.append(",".join(ids[start:end]))
    return shares


class _PilotWorker:
    """One slot's warm worker process, started when first needed and again after it died."""

    def __init__(self, secrets: dict, directory: Path, devices: str | None) -> None:
        self.secrets = secrets
        self.directory = directory
        self.devices = devices
        self.process = None  # a subprocess.Popen while the worker runs

    def _start(self):
        # subprocess and threading are imported where used: cold jobs, which run from
        # the same file, do not pay for them.
        import subprocess

        self.directory.mkdir(0o700, parents=True, exist_ok=True)
        fd = secrets_pipe(secrets_json(self.secrets))
        env = rerun_environment(fd, "")
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices
        try:
            return subprocess.Popen(
                [sys.executable, own_file(), "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=self.directory,
                env=env,
                pass_fds=(fd,),
                text=True,
                bufsize=1,
            )
        finally:
            os.close(fd)

    def run(self, job: dict) -> tuple[int, bool]:
        """Run ``job`` in the warm worker; return ``(exit status, whether the worker died)``."""
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        command = {"spec": job["spec"], "workdir": job["workdir"], "reply": False}
        if job.get("memory_mb"):
            command["memory_mb"] = job["memory_mb"]
        try:
            self.process.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
            self.process.stdin.flush()  # type: ignore[union-attr]
            line = self.process.stdout.readline()  # type: ignore[union-attr]
        except OSError:
            line = ""
        if not line:  # the worker died during the job
            status = self.process.wait()
            self.process = None
            return status, True
        answer = json.loads(line)
        if answer.get("recycle"):
            self.process.wait()
            self.process = None
        return int(answer.get("exit", 2)), False

    def stop(self) -> None:
        """End the worker (end of input) and wait for it."""
        if self.process is not None:
            try:
                self.process.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            self.process.wait()
            self.process = None


class _PilotSession:
    """What the slots of one pilot share: the service, the clock, the decision to stop."""

    def __init__(
        self, secrets: dict, service: str, pool: str, idle: float, walltime: float | None
    ) -> None:
        self.secrets = secrets
        self.base = f"{service.rstrip('/')}/pilots/{pool}"
        self.pilot = os.environ.get("SLURM_JOB_ID") or f"pid-{os.getpid()}"
        self.idle = idle
        started = time.monotonic()
        self.ends = None if walltime is None else started + walltime - PILOT_MARGIN_SECONDS
        self.last_job = started
        import threading

        self.lock = threading.Lock()
        self.stop = threading.Event()

    def post(self, route: str, body: dict, timeout: float) -> dict:
        """POST ``body`` to a pilot route; retry a transient failure until the service has
        been unreachable for ``_PILOT_UNREACHABLE_SECONDS``, then raise it."""
        data = json.dumps({"pilot": self.pilot, **body}).encode()
        deadline = time.monotonic() + _PILOT_UNREACHABLE_SECONDS
        pause = 0.5
        while True:
            try:
                raw = http_request(
                    "POST", f"{self.base}/{route}", self.secrets["token"], data, timeout
                )
                return json.loads(raw)
            except Exception as exc:
                if not transient(exc) or time.monotonic() + pause > deadline or self.stop.is_set():
                    raise
                self.stop.wait(pause)
                pause = min(pause * 2, 5.0)

    def lease(self) -> list[dict] | None:
        """Jobs for one slot, ``[]`` when none came, None when the slot must stop."""
        now = time.monotonic()
        with self.lock:
            idle_left = self.last_job + self.idle - now
        remaining = None if self.ends is None else self.ends - now
        if self.stop.is_set() or idle_left <= 0 or (remaining is not None and remaining <= 0):
            return None
        wait = min(idle_left, _PILOT_POLL_SECONDS)
        try:
            answer = self.post(
                "lease", {"remaining": remaining, "wait": wait, "limit": 1}, wait + 30.0
            )
        except Exception as exc:  # 404: the workflow has closed; else unreachable
            print(f"idds-fat pilot: stopping: {exc}", file=sys.stderr)
            self.stop.set()
            return None
        if answer.get("closed"):
            self.stop.set()
            return None
        jobs = answer.get("jobs") or []
        if jobs:
            with self.lock:
                self.last_job = time.monotonic()
        return jobs

    def report(self, job: dict, status: int, worker_died: bool) -> None:
        """Tell the service ``job`` ended (the lease ends; the backend learns its status)."""
        Path(job["workdir"], "exit_status").write_text(f"{status}\n")
        body = {"job": job["job_id"], "exit": status, "worker_died": worker_died}
        try:
            self.post("done", body, 30.0)
        except Exception as exc:  # the job reruns once the pilot is known gone: deduped
            print(f"idds-fat pilot: could not report {job['job_id']}: {exc}", file=sys.stderr)
            self.stop.set()

    def serve(self, worker: _PilotWorker) -> None:
        """One slot: lease a job, run it in the slot's worker, report it; until told to stop."""
        try:
            while (jobs := self.lease()) is not None:
                for job in jobs:
                    status, died = worker.run(job)
                    self.report(job, status, died)
                    with self.lock:
                        self.last_job = time.monotonic()
        finally:
            worker.stop()


def run_pilot(
    secrets: dict,
    service: str,
    pool: str,
    directory: Path,
    idle: float,
    walltime: float | None = None,
    slots: int | None = None,
) -> int:
    """Run jobs leased from pool ``pool`` of the service at ``service`` until told to stop.

    ``slots`` warm workers (default: :func:`pilot_slots`) each run one job at a
    time in a directory of their own under ``directory``; ``walltime`` is the
    allocation's length in seconds, from now. Returns 0 (how each job ended
    goes to the service and to its ``exit_status`` file).
    """
    import threading

    slots = slots or pilot_slots()
    session = _PilotSession(secrets, service, pool, idle, walltime)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    shares = split_devices(devices, slots) if devices else [None] * slots
    threads = []
    for k in range(slots):
        worker = _PilotWorker(secrets, Path(directory) / f"slot-{k}", shares[k])
        thread = threading.Thread(target=session.serve, args=(worker,), name=f"slot-{k}")
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0
