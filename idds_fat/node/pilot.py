"""A pilot: one batch job running warm workers that lease jobs from the caller's service.

::

    pilot process (this module)                      the caller's service
    slot k: --POST /pilots/POOL/lease (long poll)--> LeasePool (service/leases.py)
            <--{"jobs": [{job_id, spec, workdir, reply, spec_json, spec_key}]}--
            --{"spec", "workdir", "reply"}--> warm worker k  (``wrapper --worker``, worker.py)
            --{next jobs}--> worker k         up to 1 + ahead jobs sent, run in order
            <--{"exit": N, "result": B64}---  (no "result": the worker delivered it itself)
            --POST /pilots/POOL/done {reports: [{job, exit, result}, ...], more: M}-->
            <--{"recorded": [BOOL, ...], "jobs": [next M]}--  each result verified, kept
            --{"ack": recorded}--> worker k   not recorded: it delivers (STOMP, then REST)

One slot per core of the allocation (``SLURM_CPUS_PER_TASK``), each with a
warm worker of its own, so verified cache objects and the extracted code
context are reused as on the local backend. Each slot keeps one HTTP connection
to the service. A busy slot keeps its worker fed while it talks to the
service: one request reports every job that ended since the last (their
results in it when the caller asked for results in the report: no broker) and
keeps the slot holding about what its worker runs in two round trips
(``_SlotPace``), so short jobs cost the caller one request for several, and a
job longer than a round trip holds back just the one job to run after it. GPUs
the allocation lists in ``CUDA_VISIBLE_DEVICES`` are split among the slots. A
slot's worker prints to a spool of its own (``slot-K.spool``), as the local
backend's do. The pilot leaves when no
job came for ``idle`` seconds, when the service answers that the workflow has
closed (or no longer knows the pool), or when it could not reach the service
for a while; it asks for no job it cannot finish in the time it has left.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING

from .environments import own_file, rerun_environment
from .fetch import transient
from .spec import secrets_json, secrets_pipe

if TYPE_CHECKING:  # loaded by the functions using it: a cold job never does
    from pathlib import Path

#: Seconds kept in hand at the end of the allocation: a job leased must also start
#: and deliver its result.
PILOT_MARGIN_SECONDS = 10.0
_PILOT_POLL_SECONDS = 20.0  # the longest lease request (the service caps it at 30)
_PILOT_UNREACHABLE_SECONDS = 60.0  # a service silent this long has gone with its workflow
# A kept connection unused this long is opened again: the service (uvicorn) closes
# idle ones after 5 s, and a request sent on a closed one is lost.
_KEEP_ALIVE_SECONDS = 3.0
# Jobs a busy slot may hold beyond the one running: about what its worker runs in two
# round trips to the service (``_SlotPace``), at least 1, at most this many (a job held
# here is one an idle slot of another pilot cannot take).
_SLOT_AHEAD_MAX = 16


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
    ``died`` during it, its signed ``result`` (base64) when handed back, whether
    the worker asked to be ``recycle``d, and when the answer came (``at``,
    ``time.monotonic()``)."""

    def __init__(
        self,
        status: int,
        died: bool,
        result: str | None = None,
        recycle: bool = False,
        at: float = 0.0,
    ) -> None:
        self.status = status
        self.died = died
        self.result = result  # the signed result message, base64, when the job handed it back
        self.recycle = recycle
        self.at = at


class SlotWorker:
    """One slot's warm worker process (``wrapper --worker``), started when first needed
    and again after it died: a pilot's slot, or a packed element's (``worker.run_pack``).

    Jobs go in with :meth:`send` and their answers come out, in order, with
    :meth:`receive` (:meth:`ready` says whether one is there already): jobs may
    be sent before the last ones are answered or their results acknowledged
    (:meth:`ack`), so the worker never waits for the caller.
    """

    def __init__(
        self, secrets: dict, directory: Path, devices: str | None, spool: bool = False
    ) -> None:
        self.secrets = secrets
        self.directory = directory
        self.devices = devices
        # With a spool (a pilot's slot), jobs print to the worker's own files, copied to
        # a job's dir only when it printed something (``worker._Spool``): a job's dir and
        # two files cost a small job more than it runs.
        self.spool = directory.with_name(directory.name + ".spool") if spool else None
        self.process = None  # a subprocess.Popen while the worker runs
        self.answers = None  # its answers as they come: (line, time), then None at its end
        self.outstanding = 0  # jobs sent to this worker and not yet answered

    def _start(self):
        # subprocess, queue and threading are imported where used: cold jobs, which run
        # from the same file, do not pay for them.
        import queue
        import subprocess
        import threading

        self.directory.mkdir(0o700, parents=True, exist_ok=True)
        if self.spool is not None:
            self.spool.mkdir(0o700, parents=True, exist_ok=True)
        fd = secrets_pipe(secrets_json(self.secrets))
        env = rerun_environment(fd, "")
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices
        try:
            process = subprocess.Popen(
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
        # A thread reads the answers as they come, so that the slot can take every
        # answer there is without blocking on the pipe (``ready``).
        self.answers = queue.SimpleQueue()
        threading.Thread(
            target=_read_answers, args=(process.stdout, self.answers), daemon=True
        ).start()
        return process

    def _write(self, command: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
            self.process.stdin.flush()  # type: ignore[union-attr]
        except OSError:  # it died: receive() says so
            pass

    def send(self, job: dict) -> None:
        """Hand ``job`` to the worker (started first if it is not running).

        A worker that ended with jobs still unanswered is replaced only once
        :meth:`receive` has taken the answers it gave and its end: starting the next
        one sooner would drop those answers and pair the next worker's with the
        wrong jobs. Sent meanwhile, a job goes nowhere; the slot hands it to the
        next worker with the others sent after the job the worker died in.
        """
        if self.process is None or (self.outstanding == 0 and self.process.poll() is not None):
            self.process = self._start()
        self.outstanding += 1
        command = {"spec": job["spec"], "workdir": job["workdir"], "reply": bool(job.get("reply"))}
        if job.get("memory_mb"):
            command["memory_mb"] = job["memory_mb"]
        if self.spool is not None:
            command["spool"] = str(self.spool)
        if job.get("spec_json") is not None:  # the worker checks it against its key
            command["spec_json"] = job["spec_json"]
            command["spec_key"] = job.get("spec_key")
        self._write(command)

    def ready(self) -> bool:
        """Whether :meth:`receive` has an answer (or the worker's end) without waiting."""
        return self.answers is not None and not self.answers.empty()

    def receive(self) -> SlotAnswer:
        """The answer to the oldest job sent and not yet answered (waits for it)."""
        item = self.answers.get()  # type: ignore[union-attr]
        if item is None:  # the worker died during the job
            status = self.process.wait()  # type: ignore[union-attr]
            self.process = None
            self.answers = None
            self.outstanding = 0  # the jobs sent after it go to the next worker
            return SlotAnswer(status, True, at=time.monotonic())
        self.outstanding -= 1
        line, at = item
        answer = json.loads(line)
        return SlotAnswer(
            int(answer.get("exit", 2)),
            False,
            answer.get("result"),
            bool(answer.get("recycle")),
            at,
        )

    def recover_output(self, workdir: str) -> None:
        """Copy what the job in ``workdir`` printed to the spool into its own files, when
        its worker died during it (the spool names the job it ran last)."""
        if self.spool is None:
            return
        try:
            if (self.spool / "job").read_bytes() != os.fsencode(workdir):
                return  # it died before it took the job
            for name in ("stdout.txt", "stderr.txt"):
                data = (self.spool / name).read_bytes()
                if data:
                    os.makedirs(workdir, 0o700, exist_ok=True)
                    fd = os.open(
                        os.path.join(workdir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
                    )
                    with os.fdopen(fd, "ab") as out:
                        out.write(data)
        except OSError as exc:  # the report still goes to the service
            print(f"idds-fat pilot: cannot keep the output of {workdir}: {exc}", file=sys.stderr)

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
            self.answers = None
            self.outstanding = 0


def _read_answers(stdout, answers) -> None:
    """Put each line a worker answers on ``answers`` with its time, then None at its end."""
    try:
        for line in stdout:
            answers.put((line, time.monotonic()))
    except (OSError, ValueError):  # closed under us: the worker is gone either way
        pass
    answers.put(None)


class _SlotPace:
    """How many jobs a slot holds beyond the one running (``ahead``), and how many
    ended jobs it reports at once (``batch``): it holds about what its worker runs
    in two round trips to the service and reports half of that at a time, so
    that its worker still has a round trip's work while a report is on its way,
    and a slot running jobs longer than a round trip holds one job ahead and
    reports each job as it ends.

    Both times are moving averages: a job's time runs from when it was sent, or
    when the job before it ended if later, to its answer; a round trip is one
    ``done`` request. Before either is known, one job ahead.
    """

    def __init__(self) -> None:
        self.job_seconds: float | None = None
        self.trip_seconds: float | None = None
        self.last_answer = 0.0

    @staticmethod
    def _average(old: float | None, new: float) -> float:
        return new if old is None else 0.7 * old + 0.3 * new

    def answered(self, sent_at: float, at: float) -> None:
        """A job sent at ``sent_at`` was answered at ``at``."""
        self.job_seconds = self._average(self.job_seconds, at - max(sent_at, self.last_answer))
        self.last_answer = at

    def trip(self, seconds: float) -> None:
        """A report took ``seconds`` to be answered."""
        self.trip_seconds = self._average(self.trip_seconds, seconds)

    @property
    def ahead(self) -> int:
        """Jobs to hold beyond the one running: 1 to ``_SLOT_AHEAD_MAX``."""
        if self.job_seconds is None or self.trip_seconds is None:
            return 1
        import math

        wanted = math.ceil(2 * self.trip_seconds / max(self.job_seconds, 1e-4))
        return max(1, min(_SLOT_AHEAD_MAX, wanted))

    @property
    def batch(self) -> int:
        """Ended jobs to wait for before reporting (fewer when the worker has no more)."""
        return max(1, self.ahead // 2)


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

    def lease(self, link: _ServiceLink, limit: int = 1) -> list[dict] | None:
        """Up to ``limit`` jobs for an idle slot (no more than its share of the queue when
        other slots wait too), ``[]`` when none came, None when the slot must stop."""
        now = time.monotonic()
        with self.lock:
            idle_left = self.last_job + self.idle - now
        remaining = self._remaining()
        if self.stop.is_set() or idle_left <= 0 or (remaining is not None and remaining <= 0):
            return None
        wait = min(idle_left, _PILOT_POLL_SECONDS)
        try:
            # The service shares the queue among the slots waiting: a slot that waits
            # takes no job a sibling slot waiting too could run.
            body = {"remaining": remaining, "wait": wait, "limit": limit}
            answer = self.post(link, "lease", body, wait + 30.0)
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
        ended: list[tuple[dict, SlotAnswer]],
        more: int,
        ahead: list[dict] | None = None,
    ) -> tuple[list[bool], list[dict]]:
        """Tell the service the ``ended`` jobs ended, each with its result when the
        worker handed it back, in one request, and ask in it for up to ``more``
        further jobs, to run after those in ``ahead`` (the jobs the slot holds).
        Returns ``(whether the caller recorded each result, the jobs leased)``."""
        from pathlib import Path

        reports = []
        for job, answer in ended:
            if answer.status or answer.died:  # evidence kept beside its output; 0 is in the report
                _write_status(Path(job["workdir"]), answer.status)
            report = {"job": job["job_id"], "exit": answer.status, "worker_died": answer.died}
            if answer.result is not None:
                report["result"] = answer.result
            reports.append(report)
        body: dict = {"reports": reports}
        remaining = self._remaining()
        if remaining is not None and ahead:
            # What is leased now starts after the jobs the slot holds: the time they
            # declare is not the next ones' (a job that declares none is not known to
            # need any).
            remaining -= sum(float(job.get("walltime") or 0.0) for job in ahead)
        if more > 0 and not self.stop.is_set() and (remaining is None or remaining > 0):
            body.update(more=more, remaining=remaining)
        try:
            reply = self.post(link, "done", body, 30.0)
        except Exception as exc:  # the jobs rerun once the pilot is known gone: deduped
            names = ", ".join(job["job_id"] for job, _ in ended)
            print(f"idds-fat pilot: could not report {names}: {exc}", file=sys.stderr)
            self.stop.set()
            return [False] * len(ended), []
        recorded = [bool(kept) for kept in reply.get("recorded") or []]
        recorded += [False] * (len(ended) - len(recorded))
        return recorded[: len(ended)], self._jobs_of(reply)

    def serve(self, worker: SlotWorker) -> None:
        """One slot, until told to stop: lease jobs, run them in the slot's worker, report them.

        The slot sends its worker the jobs it holds (``1 + ahead``, see
        :class:`_SlotPace`), waits for ``batch`` answers (and takes any more
        there are), sends the jobs to run next, and reports the ended jobs
        (their results in the report) in one request that also leases as many
        jobs as the slot is short of: the worker never waits for the request,
        and jobs shorter than a round trip cost the caller one request for
        several.
        """
        from collections import deque

        link = self.link()
        pace = _SlotPace()
        waiting: deque[dict] = deque()  # leased, not yet sent to the worker
        sent: deque[tuple[dict, float]] = deque()  # sent to the worker, not yet answered

        def feed() -> None:
            while waiting and len(sent) <= pace.ahead and not self.stop.is_set():
                job = waiting.popleft()
                worker.send(job)
                sent.append((job, time.monotonic()))

        try:
            while True:
                feed()
                if not sent:
                    if self.stop.is_set():
                        break
                    # Jobs not known to be short: one, as a job held here could be run by
                    # a slot (or a pilot) that comes to the queue a moment later.
                    jobs = self.lease(link, 1 + pace.ahead if pace.ahead > 1 else 1)
                    if jobs is None:
                        break
                    waiting.extend(jobs)
                    continue
                ended: list[tuple[dict, SlotAnswer]] = []
                batch = pace.batch
                while sent and (len(ended) < batch or worker.ready()):
                    job, sent_at = sent.popleft()
                    answer = worker.receive()
                    pace.answered(sent_at, answer.at)
                    ended.append((job, answer))
                    if answer.died:
                        worker.recover_output(job["workdir"])
                    if answer.died or answer.recycle:
                        # The jobs sent after it never ran: they go to the next worker,
                        # which starts only once this one's results are acknowledged.
                        waiting.extendleft(reversed([job for job, _ in sent]))
                        sent.clear()
                        break
                spent = ended[-1][1]
                if not (spent.died or spent.recycle):
                    feed()  # these run while the ended ones are reported
                held = [job for job, _ in sent] + list(waiting)
                more = 1 + pace.ahead - len(held)
                started = time.monotonic()
                recorded, jobs = self.report(link, ended, more, held)
                pace.trip(time.monotonic() - started)
                for (_, answer), kept in zip(ended, recorded, strict=True):
                    if answer.result is not None:
                        worker.ack(kept)  # not recorded: the worker delivers it itself
                if spent.recycle:
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
    goes to the service, and, when it failed, to its ``exit_status`` file).
    """
    import threading
    from pathlib import Path

    slots = slots or pilot_slots()
    session = _PilotSession(secrets, service, pool, idle, walltime)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    shares = split_devices(devices, slots) if devices else [None] * slots
    threads = []
    for k in range(slots):
        worker = SlotWorker(secrets, Path(directory) / f"slot-{k}", shares[k], spool=True)
        thread = threading.Thread(target=session.serve, args=(worker,), name=f"slot-{k}")
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0
