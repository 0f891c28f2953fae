"""Jobs leased to pilots: the queue a pilot pulls from, and its two routes.

::

    SlurmPilotBackend.submit --offer--> LeasePool (queued)           one per workflow
    pilot slot --POST /pilots/POOL/lease {pilot, remaining, wait}-->  take (long poll)
                <-- {"jobs": [{job_id, spec, workdir, walltime, memory_mb, reply,
                               spec_json, spec_key}]}  (the spec inline, with its key)
                on_leased (the backend records the jobs' start) runs after the answer
    pilot slot --POST /pilots/POOL/done {pilot, reports: [{job, exit, result}, ...], more}-->
                first waits for the on_leased records pending; then each: leased -> gone;
                on_done (the result verified and kept) -> recorded;
                up to ``more`` jobs taken at once (queued -> leased), no waiting
                <-- {"known": [BOOL, ...], "recorded": [BOOL, ...], "jobs": [...]}
    status watcher: pilot left Slurm --release_pilot(P)-->            P's leased -> queued again

A lease is at-least-once: a job leased to a pilot that dies goes back to the
head of the queue once the backend knows the pilot is gone (Slurm says so to
the status watcher), and runs again elsewhere; a result it had delivered
before is a duplicate the collector drops. No request leases more than its
share of the queue while other slots wait for a job (the queue divided among
them and it). A job with a walltime is leased only to a pilot whose remaining
time covers it. With ``direct_results`` the
pool asks pilots (``"reply": true``) to carry each result in the job's
``done`` report: the backend hands it to the workflow, which keeps it and
verifies it before anything is unpickled, and the answer says whether it was
``recorded``; until then the pilot's worker holds it, and delivers it through
the result channels if it was not. Pools live in this process
(``LEASES``): only the service a workflow embeds serves its pilots.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

logger = logging.getLogger(__name__)

MAX_LEASE_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class LeasedJob:
    """One job a pilot may run: what its wrapper needs, and what its lease needs.

    Attributes:
        job_id: unique in the workflow (``task_id/index``).
        spec: the job spec's location (the wrapper's ``--spec``).
        workdir: the job's directory.
        walltime: seconds the job declares it needs, or None.
        memory_mb: the job's memory cap, or None.
        inline_spec: the spec itself while it is not in the cache yet: an object
            whose ``text`` is its JSON, or None once stored
            (:class:`idds_fat.backends.InlineSpec`); the pilot's worker runs that
            text if its sha256 is ``spec_key``, reading no cache.
        spec_key: the spec's cache key.
    """

    job_id: str
    spec: str
    workdir: str
    walltime: float | None = None
    memory_mb: int | None = None
    inline_spec: Any = field(default=None, repr=False, compare=False)
    spec_key: str = ""

    def to_json(self) -> dict:
        """The job as a pilot receives it."""
        job = {
            "job_id": self.job_id,
            "spec": self.spec,
            "workdir": self.workdir,
            "walltime": self.walltime,
            "memory_mb": self.memory_mb,
        }
        text = getattr(self.inline_spec, "text", None)
        if text is not None:
            job.update(spec_json=text, spec_key=self.spec_key)
        return job


#: Called (from a worker thread, never the event loop) when a pilot took jobs: (pilot, jobs).
LeasedCallback = Callable[[str, Sequence[LeasedJob]], None]
#: Called (likewise) when a pilot reports a job done: (pilot, job_id, report), the
#: report's ``"result"`` as bytes when it carries one; returns whether that result
#: was recorded.
DoneCallback = Callable[[str, str, dict], bool]


class LeasePool:
    """The jobs of one workflow waiting for a pilot, and those leased, by pilot.

    Thread-safe: the backend offers and withdraws from its threads, the
    service's routes lease from the event loop (without blocking it).
    """

    def __init__(
        self, on_leased: LeasedCallback, on_done: DoneCallback, direct_results: bool = False
    ) -> None:
        self.name = secrets.token_hex(8)
        self.on_leased = on_leased
        self.on_done = on_done
        self.direct_results = direct_results
        self._lock = threading.Lock()
        self._queued: deque[LeasedJob] = deque()
        self._leased: dict[str, tuple[str, LeasedJob]] = {}  # job id -> (pilot, job)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._seen: set[str] = set()  # pilots that asked for work at least once
        self._gone: set[str] = set()  # pilots released: a request of theirs still open gets nothing
        # The backend's records of leases already answered, still being written.
        self._recording: set[asyncio.Future] = set()
        self.closed = False

    def offer(self, jobs: Sequence[LeasedJob], first: bool = False) -> None:
        """Queue ``jobs`` (at the head with ``first``: they were leased before) and wake pilots."""
        with self._lock:
            if first:
                self._queued.extendleft(reversed(jobs))
            else:
                self._queued.extend(jobs)
        self._wake()

    def take(
        self, pilot: str, remaining: float | None, limit: int = 1, share: bool = False
    ) -> list[LeasedJob]:
        """Lease up to ``limit`` queued jobs to ``pilot`` at once (none if none fits).

        A job with a walltime goes only to a pilot whose ``remaining`` seconds
        cover it; the others stay queued for a pilot that has the time. With
        ``share`` (a slot leasing ahead), ``pilot`` takes no more than its
        share of the queue while other slots wait for a job (:meth:`lease`): an
        idle slot is never left waiting while another holds the work.
        """
        return self._take(pilot, remaining, limit, share, None)

    def _take(
        self,
        pilot: str,
        remaining: float | None,
        limit: int,
        share: bool,
        own: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None,
    ) -> list[LeasedJob]:
        taken: list[LeasedJob] = []
        with self._lock:
            self._seen.add(pilot)
            if self.closed or pilot in self._gone:
                return taken
            others = len(self._waiters) - (own in self._waiters)
            if share and others:
                limit = min(limit, -(-len(self._queued) // (others + 1)))
            skipped = []
            while self._queued and len(taken) < limit:
                job = self._queued.popleft()
                if job.walltime is not None and remaining is not None and job.walltime > remaining:
                    skipped.append(job)
                    continue
                self._leased[job.job_id] = (pilot, job)
                taken.append(job)
            self._queued.extendleft(reversed(skipped))
        return taken

    async def lease(
        self, pilot: str, remaining: float | None, wait: float, limit: int = 1, share: bool = False
    ) -> list[LeasedJob]:
        """Like :meth:`take`, waiting up to ``wait`` seconds for a job (on the event loop);
        with ``share``, the queue is shared with the other requests waiting too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            waiter = (loop, asyncio.Event())
            with self._lock:
                self._waiters.add(waiter)
            try:
                jobs = self._take(pilot, remaining, limit, share, waiter)
                left = deadline - loop.time()
                if jobs or self.closed or left <= 0:
                    return jobs
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter[1].wait(), left)
            finally:
                with self._lock:
                    self._waiters.discard(waiter)

    def recording(self, record: asyncio.Future) -> None:
        """Keep ``record`` (the backend noting that leased jobs started, run on the
        event loop's thread pool) until it ends: :meth:`recorded` waits for it."""
        self._recording.add(record)
        record.add_done_callback(self._recording.discard)

    async def recorded(self) -> None:
        """Wait until the backend has recorded the start of every job leased so far
        (on the event loop), so that no job's end reaches it before its start."""
        while self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)

    def done(self, pilot: str, job_id: str) -> LeasedJob | None:
        """End ``pilot``'s lease of ``job_id``; return the job, or None when it held no
        such lease (the job was withdrawn, or re-leased after the pilot was thought dead)."""
        with self._lock:
            held = self._leased.get(job_id)
            if held is None or held[0] != pilot:
                return None
            del self._leased[job_id]
            return held[1]

    def release_pilot(self, pilot: str) -> list[LeasedJob]:
        """``pilot`` is gone: queue its leased jobs again, first; return them. It leases
        nothing more (a long poll it left open must not take a job for nobody)."""
        with self._lock:
            self._gone.add(pilot)
            lost = [job for holder, job in self._leased.values() if holder == pilot]
            for job in lost:
                del self._leased[job.job_id]
        if lost:
            self.offer(lost, first=True)
        return lost

    def withdraw(self, job_ids: Sequence[str]) -> list[str]:
        """Drop these jobs, queued or leased; return those that were here."""
        wanted = set(job_ids)
        with self._lock:
            kept = deque(job for job in self._queued if job.job_id not in wanted)
            found = {job.job_id for job in self._queued if job.job_id in wanted}
            self._queued = kept
            for job_id in wanted & set(self._leased):
                del self._leased[job_id]
                found.add(job_id)
        return sorted(found)

    def counts(self) -> tuple[int, int]:
        """Return ``(queued, leased)``."""
        with self._lock:
            return len(self._queued), len(self._leased)

    def waiting(self) -> int:
        """How many lease requests wait for a job now (idle slots)."""
        with self._lock:
            return len(self._waiters)

    def seen(self, pilot: str) -> bool:
        """Whether ``pilot`` has asked for work (it runs)."""
        with self._lock:
            return pilot in self._seen

    def close(self) -> None:
        """Lease nothing more: waiting pilots are answered ``closed`` at once."""
        with self._lock:
            self.closed = True
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # its loop has stopped
                loop.call_soon_threadsafe(event.set)


class LeaseRegistry:
    """The pools of this process, by name (a random one per pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[str, LeasePool] = {}

    def add(self, pool: LeasePool) -> None:
        """Serve ``pool`` under its name."""
        with self._lock:
            self._pools[pool.name] = pool

    def remove(self, pool: LeasePool) -> None:
        """Stop serving ``pool``."""
        with self._lock:
            self._pools.pop(pool.name, None)

    def get(self, name: str) -> LeasePool | None:
        """The pool named ``name``, or None."""
        with self._lock:
            return self._pools.get(name)


LEASES = LeaseRegistry()
"""The process-wide pools the service's ``/pilots`` routes serve."""


def _number(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number")
    return float(value)


def _jobs_json(pool: LeasePool, jobs: Sequence[LeasedJob]) -> list[dict]:
    return [{**job.to_json(), "reply": pool.direct_results} for job in jobs]


def _after_done(
    pool: LeasePool,
    pilot: str,
    reports: Sequence[dict],
    known: Sequence[bool],
    jobs: Sequence[LeasedJob],
) -> list[bool]:
    """The backend's side of a ``done`` request: each known job's end (whether its
    result was recorded), then the jobs leased with them; a failure of one must lose
    neither the others nor the jobs leased."""
    recorded = []
    for report, held in zip(reports, known, strict=True):
        kept = False
        if held:
            try:
                kept = bool(pool.on_done(pilot, report["job"], report))
            except Exception:  # not recorded: the pilot delivers the result the usual way
                logger.exception("handling the end of job %s failed", report["job"])
        recorded.append(kept)
    if jobs:
        _leased(pool, pilot, jobs)
    return recorded


def _reports(body: dict) -> list[dict]:
    """The ``reports`` of a ``done`` request, checked, each result decoded to bytes.
    Raises ValueError (or binascii.Error) naming what is wrong."""
    reports = body.get("reports")
    if not isinstance(reports, list) or not reports:
        raise ValueError("'reports' must be a non-empty list")
    for report in reports:
        if not isinstance(report, dict) or not isinstance(report.get("job"), str):
            raise ValueError("each report must be an object with a string 'job'")
        result = report.get("result")
        if result is not None:
            if not isinstance(result, str):
                raise ValueError("'result' must be a base64 string")
            report["result"] = binascii.a2b_base64(result, strict_mode=True)
    return reports


def _leased(pool: LeasePool, pilot: str, jobs: Sequence[LeasedJob]) -> None:
    try:
        pool.on_leased(pilot, jobs)
    except Exception:  # the jobs are the pilot's: the answer must reach it all the same
        logger.exception("recording that pilot %s took %d job(s) failed", pilot, len(jobs))


def lease_routes(guarded: Callable) -> list[BaseRoute]:
    """The pilots' routes, each behind the service's token check (``guarded``).

    ``POST /pilots/{pool}/lease`` with ``{"pilot": ID, "remaining": SECONDS or
    null, "wait": SECONDS, "limit": N}`` answers ``{"jobs": [...], "closed":
    BOOL}``, waiting up to ``wait`` seconds (at most 30) for a job; each job
    says whether to ``reply`` (carry its result in the report). Both routes
    lease at most ``N`` (``more``) jobs, and no more than the requester's share
    of the queue while other lease requests wait (the queue divided among
    them and it).
    ``POST /pilots/{pool}/done`` with ``{"pilot": ID, "reports": [{"job":
    JOB_ID, "exit": STATUS, "worker_died": BOOL}, ...]}``, each report with an
    optional ``"result": BASE64``, and optionally ``"more": N, "remaining":
    SECONDS``, ends those leases (the jobs a pilot's slot saw end since its
    last request: one request for several jobs) and leases up to N more jobs
    without waiting: ``{"known": [BOOL, ...], "recorded": [BOOL, ...], "jobs":
    [...], "closed": BOOL}``, the lists in the order of the reports. A report
    is ``known`` when it ended a lease the pilot held (not when the job was
    withdrawn, re-leased after the pilot was thought gone, or already
    reported: a duplicate in the same request is not known either), and
    ``recorded`` is false unless its result was kept: the pilot then delivers
    it the usual way, and the collector drops a duplicate. An unknown pool is
    404 (its workflow has closed: the pilot should stop).
    """

    async def _read(request: Request) -> tuple[LeasePool | None, dict]:
        pool = LEASES.get(request.path_params["pool"])
        body = json.loads(await request.body() or b"{}")
        if not isinstance(body, dict) or not isinstance(body.get("pilot"), str):
            raise ValueError("the body must be a JSON object with a string 'pilot'")
        return pool, body

    async def lease(request: Request) -> Response:
        try:
            pool, body = await _read(request)
            remaining = _number(body.get("remaining"), "remaining")
            wait = min(max(_number(body.get("wait"), "wait") or 0.0, 0.0), MAX_LEASE_WAIT_SECONDS)
            limit = int(_number(body.get("limit"), "limit") or 1)
        except ValueError as exc:
            return PlainTextResponse(str(exc).splitlines()[0], 400)
        if pool is None:
            return PlainTextResponse("no such pool (its workflow has closed)", 404)
        jobs = await pool.lease(body["pilot"], remaining, wait, max(limit, 1), share=True)
        if jobs:
            # Answered at once, the jobs' start recorded meanwhile (SQLite, which the
            # caller's own threads may hold): a done request waits for the record.
            pool.recording(
                asyncio.ensure_future(run_in_threadpool(_leased, pool, body["pilot"], jobs))
            )
        return JSONResponse({"jobs": _jobs_json(pool, jobs), "closed": pool.closed})

    async def done(request: Request) -> Response:
        try:
            pool, body = await _read(request)
            reports = _reports(body)
            remaining = _number(body.get("remaining"), "remaining")
            more = int(_number(body.get("more"), "more") or 0)
        except (ValueError, binascii.Error) as exc:
            return PlainTextResponse(str(exc).splitlines()[0], 400)
        if pool is None:
            return PlainTextResponse("no such pool (its workflow has closed)", 404)
        pilot = body["pilot"]
        await pool.recorded()  # each job's start reaches the backend before its end
        known = [pool.done(pilot, report["job"]) is not None for report in reports]
        jobs = pool.take(pilot, remaining, more, share=True) if more > 0 else []
        recorded = [False] * len(reports)
        if any(known) or jobs:
            # One hop off the loop for all: the backend's callbacks write to SQLite, and
            # may ask this very service for a result.
            recorded = await run_in_threadpool(_after_done, pool, pilot, reports, known, jobs)
        return JSONResponse(
            {
                "known": known,
                "recorded": recorded,
                "jobs": _jobs_json(pool, jobs),
                "closed": pool.closed,
            }
        )

    return [
        Route("/pilots/{pool}/lease", guarded(lease), methods=["POST"]),
        Route("/pilots/{pool}/done", guarded(done), methods=["POST"]),
    ]
