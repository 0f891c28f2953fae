"""A pilot: one batch job running warm workers that lease jobs from the caller's service.

::

    pilot process (this module)                      the caller's service
    slot k: --POST /pilots/POOL/lease (long poll)--> LeasePool (service/leases.py)
            <--{"jobs": [{job_id, spec, workdir, reply}]}--
            --{"spec", "workdir", "reply"}--> warm worker k  (``wrapper --worker``, worker.py)
            <--{"exit": N, "result": B64}---  (no "result": the worker delivered it itself)
            --{next job}--> worker k          the next job runs while this one is reported
            --POST /pilots/POOL/done {job, exit, result, more: 1}--> the result verified,
            <--{"recorded": BOOL, "jobs": [next]}--                  kept; the job's end
            --{"ack": recorded}--> worker k   not recorded: it delivers (STOMP, then REST)

One slot per core of the allocation (``SLURM_CPUS_PER_TASK``), each with a
warm worker of its own, so verified cache objects and the extracted code
context are reused as on the local backend. Each slot keeps one HTTP connection
to the service, and a busy slot makes one request per job: the report of a job,
carrying its result (when the caller asked for results in the report: no broker),
also leases the job after the next. GPUs the allocation lists in
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
from .fetch import transient
from .spec import secrets_json, secrets_pipe

#: Seconds kept in hand at the end of the allocation: a job leased must also start
#: and deliver its result.
PILOT_MARGIN_SECONDS = 10.0
_PILOT_POLL_SECONDS = 20.0  # the longest lease request (the service caps it at 30)
_PILOT_UNREACHABLE_SECONDS = 60.0  # a service silent this long has gone with its workflow
# A kept connection unused this long is opened again: the service (uvicorn) closes
# idle ones after 5 s, and a request sent on a closed one is lost.
_KEEP_ALIVE_SECONDS = 3.0
_SLOT_DEPTH = 2  # jobs a busy slot holds: the one running and the one to run next


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


class SlotAnswer:
    """What a slot's worker said about one job: its exit ``status``, whether the worker
    ``died`` during it, its signed ``result`` (base64) when handed back, and whether
    the worker asked to be ``recycle``d."""

    def __init__(
        self, status: int, died: bool, result: str | None = None, recycle: bool = False
    ) -> None:
        self.status = status
        self.died = died
        self.result = result  # the signed result message, base64, when the job handed it back
        self.recycle = recycle


class SlotWorker:
    """One slot's warm worker process (``wrapper --worker``), started when first needed
    and again after it died: a pilot's slot, or a packed element's (``worker.run_pack``).

    Jobs go in with :meth:`send` and their answers come out, in order, with
    :meth:`receive`: the next job may be sent before the last one's result is
    acknowledged (:meth:`ack`), so the worker never waits for the caller.
    """

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

    def _write(self, command: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
            self.process.stdin.flush()  # type: ignore[union-attr]
        except OSError:  # it died: receive() says so
            pass

    def send(self, job: dict) -> None:
        """Hand ``job`` to the worker (started first if it is not running)."""
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        command = {"spec": job["spec"], "workdir": job["workdir"], "reply": bool(job.get("reply"))}
        if job.get("memory_mb"):
            command["memory_mb"] = job["memory_mb"]
        self._write(command)

    def receive(self) -> SlotAnswer:
        """The answer to the oldest job sent and not yet answered."""
        try:
            line = self.process.stdout.readline()  # type: ignore[union-attr]
        except OSError:
            line = ""
        if not line:  # the worker died during the job
            status = self.process.wait()  # type: ignore[union-attr]
            self.process = None
            return SlotAnswer(status, True)
        answer = json.loads(line)
        return SlotAnswer(
            int(answer.get("exit", 2)), False, answer.get("result"), bool(answer.get("recycle"))
        )

    def ack(self, recorded: bool) -> None:
        """Tell the worker whether the caller recorded its oldest unacknowledged result;
        when not, the worker delivers it through the result channels (STOMP, REST)."""
        if self.process is not None:
            self._write({"ack": recorded})

    def retire(self) -> None:
        """Let a worker that asked to be recycled leave (once its acks are in)."""
        self.stop()

    def stop(self) -> None:
        """End the worker (end of input) and wait for it."""
        if self.process is not None:
            try:
                self.process.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            self.process.wait()
            self.process = None


def _write_status(workdir: Path, status: int) -> None:
    """Leave the job's exit status in its dir, made here if its worker died before it did."""
    try:
        try:
            (workdir / "exit_status").write_text(f"{status}\n")
        except FileNotFoundError:
            workdir.mkdir(0o700, parents=True, exist_ok=True)
            (workdir / "exit_status").write_text(f"{status}\n")
    except OSError as exc:  # the report still goes to the service
        print(f"idds-fat pilot: cannot write the status of {workdir}: {exc}", file=sys.stderr)


class _ServiceLink:
    """One slot's kept HTTP connection to the service's pilot routes.

    One per slot (``http.client`` connections are not thread-safe); it is opened
    again after a failure, and before a request when it sat unused long enough
    for the service to have closed it.
    """

    def __init__(self, base: str, token: str) -> None:
        import urllib.parse

        parts = urllib.parse.urlsplit(base)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port
        self.path = parts.path.rstrip("/")
        self.url = base
        self.token = token
        self.connection = None
        self.used = 0.0

    def post(self, route: str, data: bytes, timeout: float) -> bytes:
        """POST ``data`` to ``route``; return the body. Raises OSError, or
        ``urllib.error.HTTPError`` for a refusal (``fetch.transient`` tells them apart)."""
        import http.client
        import socket

        if self.connection is not None and time.monotonic() - self.used > _KEEP_ALIVE_SECONDS:
            self.close()
        if self.connection is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.connection = kind(self.host, self.port, timeout=timeout)
            self.connection.connect()
            # Small requests, answered at once: no Nagle wait on either side.
            self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.connection.sock.settimeout(timeout)
            headers = {
                "Authorization": "Bearer " + self.token,
                "Content-Type": "application/json",
            }
            self.connection.request("POST", f"{self.path}/{route}", body=data, headers=headers)
            response = self.connection.getresponse()
            body = response.read()
        except BaseException:
            self.close()
            raise
        self.used = time.monotonic()
        if response.status >= 400:
            import urllib.error

            message = body.decode(errors="replace")[:200]
            raise urllib.error.HTTPError(
                f"{self.url}/{route}", response.status, message, response.headers, None
            )
        return body

    def close(self) -> None:
        """Close the connection (the next request opens another)."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None


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

    def link(self) -> _ServiceLink:
        """A connection of its own for one slot."""
        return _ServiceLink(self.base, self.secrets["token"])

    def post(self, link: _ServiceLink, route: str, body: dict, timeout: float) -> dict:
        """POST ``body`` to a pilot route; retry a transient failure until the service has
        been unreachable for ``_PILOT_UNREACHABLE_SECONDS``, then raise it."""
        data = json.dumps({"pilot": self.pilot, **body}).encode()
        deadline = time.monotonic() + _PILOT_UNREACHABLE_SECONDS
        pause = 0.5
        while True:
            try:
                return json.loads(link.post(route, data, timeout))
            except Exception as exc:
                if not transient(exc) or time.monotonic() + pause > deadline or self.stop.is_set():
                    raise
                self.stop.wait(pause)
                pause = min(pause * 2, 5.0)

    def _remaining(self) -> float | None:
        return None if self.ends is None else self.ends - time.monotonic()

    def lease(self, link: _ServiceLink) -> list[dict] | None:
        """One job for an idle slot, ``[]`` when none came, None when the slot must stop."""
        now = time.monotonic()
        with self.lock:
            idle_left = self.last_job + self.idle - now
        remaining = self._remaining()
        if self.stop.is_set() or idle_left <= 0 or (remaining is not None and remaining <= 0):
            return None
        wait = min(idle_left, _PILOT_POLL_SECONDS)
        try:
            # One job: a slot that waits takes no job a sibling slot waiting too could run.
            answer = self.post(
                link, "lease", {"remaining": remaining, "wait": wait, "limit": 1}, wait + 30.0
            )
        except Exception as exc:  # 404: the workflow has closed; else unreachable
            print(f"idds-fat pilot: stopping: {exc}", file=sys.stderr)
            self.stop.set()
            return None
        return self._jobs_of(answer)

    def _jobs_of(self, answer: dict) -> list[dict]:
        if answer.get("closed"):
            self.stop.set()
        jobs = answer.get("jobs") or []
        if jobs:
            with self.lock:
                self.last_job = time.monotonic()
        return jobs

    def report(
        self,
        link: _ServiceLink,
        job: dict,
        answer: SlotAnswer,
        more: int,
        ahead: dict | None = None,
    ) -> tuple[bool, list[dict]]:
        """Tell the service ``job`` ended, with its result when the worker handed it
        back, and ask for up to ``more`` further jobs in the same request, to run
        after ``ahead`` (the job the worker runs now). Returns ``(whether the caller
        recorded the result, the jobs leased)``."""
        _write_status(Path(job["workdir"]), answer.status)
        body: dict = {"job": job["job_id"], "exit": answer.status, "worker_died": answer.died}
        if answer.result is not None:
            body["result"] = answer.result
        remaining = self._remaining()
        if remaining is not None and ahead is not None:
            # What is leased now starts after the job running: the time it declares is
            # not the next one's (one that declares none is not known to need any).
            remaining -= float(ahead.get("walltime") or 0.0)
        if more > 0 and not self.stop.is_set() and (remaining is None or remaining > 0):
            body.update(more=more, remaining=remaining)
        try:
            reply = self.post(link, "done", body, 30.0)
        except Exception as exc:  # the job reruns once the pilot is known gone: deduped
            print(f"idds-fat pilot: could not report {job['job_id']}: {exc}", file=sys.stderr)
            self.stop.set()
            return False, []
        return bool(reply.get("recorded")), self._jobs_of(reply)

    def serve(self, worker: SlotWorker) -> None:
        """One slot, until told to stop: lease a job, run it in the slot's worker, report it.

        While the worker runs job N+1, the slot reports job N (its result in the
        report, one request), and leases in that same request the job to run
        after: a warm slot makes one request per job, and its worker never waits
        for it. At most one job waits in the slot beyond the one running.
        """
        from collections import deque

        link = self.link()
        waiting: deque[dict] = deque()  # leased, not yet sent to the worker
        running: dict | None = None  # sent to the worker, not yet answered
        try:
            while True:
                if running is None:
                    if self.stop.is_set():
                        break
                    if not waiting:
                        jobs = self.lease(link)
                        if jobs is None:
                            break
                        waiting.extend(jobs)
                        continue
                    running = waiting.popleft()
                    worker.send(running)
                job, running = running, None
                answer = worker.receive()
                if waiting and not (answer.died or answer.recycle or self.stop.is_set()):
                    running = waiting.popleft()
                    worker.send(running)  # runs while this job is reported
                more = _SLOT_DEPTH - len(waiting) - (running is not None)
                recorded, jobs = self.report(link, job, answer, more, running)
                if answer.result is not None:
                    worker.ack(recorded)  # not recorded: the worker delivers it itself
                if answer.recycle:
                    worker.retire()
                waiting.extend(jobs)
                with self.lock:
                    self.last_job = time.monotonic()
        finally:
            # Jobs leased and not run go back to the queue once the pilot has left.
            worker.stop()
            link.close()


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
        worker = SlotWorker(secrets, Path(directory) / f"slot-{k}", shares[k])
        thread = threading.Thread(target=session.serve, args=(worker,), name=f"slot-{k}")
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0
