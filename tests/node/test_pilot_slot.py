"""A pilot's slot (node/pilot.py ``_PilotSession.serve``): batched reports, jobs sent
ahead, a worker that dies or recycles with jobs queued behind the one it ran.

The slot runs in this process against a scripted worker and a scripted service,
so that what it sends and reports is known exactly (the real thing, pilots in
Slurm, is tests/backends/test_slurm_pilots.py).
"""

from __future__ import annotations

import time
from collections import deque

import pytest

from idds_fat.node import pilot
from idds_fat.node.pilot import SlotAnswer, _PilotSession, _SlotPace


class ScriptedWorker:
    """Stands in for ``SlotWorker``: runs each job sent, in order, as ``outcomes`` says
    (``"die"``: the worker dies during it; ``"recycle"``: it asks to be recycled);
    jobs sent to a worker that died or recycled never run."""

    def __init__(self, outcomes: dict[str, str] | None = None) -> None:
        self.outcomes = outcomes or {}
        self.pipe: deque[dict] = deque()  # sent to the running worker, not answered
        self.alive = False
        self.starts = 0
        self.ran: list[str] = []
        self.acks: list[tuple[int, bool]] = []  # (worker start, ack)

    def send(self, job: dict) -> None:
        if not self.alive:
            self.alive, self.starts = True, self.starts + 1
            self.pipe.clear()
        self.pipe.append(job)

    def ready(self) -> bool:
        return False  # as if each job were still running: the slot waits for ``batch``

    def receive(self) -> SlotAnswer:
        job = self.pipe.popleft()
        self.ran.append(job["job_id"])
        outcome = self.outcomes.get(job["job_id"], "ok")
        if outcome == "die":
            self.alive = False
            self.pipe.clear()
            return SlotAnswer(137, True, at=time.monotonic())
        return SlotAnswer(0, False, "UkVTVUxU", outcome == "recycle", time.monotonic())

    def recover_output(self, workdir: str) -> None:
        pass  # nothing printed

    def ack(self, recorded: bool) -> None:
        if self.alive:
            self.acks.append((self.starts, recorded))

    def retire(self) -> None:
        self.alive = False
        self.pipe.clear()

    def stop(self) -> None:
        self.alive = False


class ScriptedService:
    """The pool's two routes, in memory: leases jobs in order, records reports."""

    def __init__(self, jobs: list[dict]) -> None:
        self.queue = deque(jobs)
        self.requests: list[tuple[str, dict]] = []
        self.reported: list[str] = []

    def post(self, link, route: str, body: dict, timeout: float) -> dict:
        self.requests.append((route, body))
        if route == "lease":
            jobs = [self.queue.popleft() for _ in range(min(body["limit"], len(self.queue)))]
            return {"jobs": jobs, "closed": not jobs}
        self.reported += [report["job"] for report in body["reports"]]
        more = min(body.get("more", 0), len(self.queue))
        return {
            "known": [True] * len(body["reports"]),
            "recorded": [True] * len(body["reports"]),
            "jobs": [self.queue.popleft() for _ in range(more)],
            "closed": False,
        }


class FixedPace(_SlotPace):
    """Four jobs ahead, reported two at a time, whatever the clock says."""

    ahead = 4  # type: ignore[assignment]
    batch = 2  # type: ignore[assignment]


def _jobs(n: int, walltime: float | None = None) -> list[dict]:
    return [
        {"job_id": f"t/{k}", "spec": "s", "workdir": f"/nonexistent/{k}", "walltime": walltime}
        for k in range(n)
    ]


@pytest.fixture
def slot(monkeypatch, tmp_path):
    monkeypatch.setattr(pilot, "_SlotPace", FixedPace)
    monkeypatch.setattr(pilot, "_write_status", lambda workdir, status: None)

    def run(jobs: list[dict], worker: ScriptedWorker, walltime: float | None = None):
        service = ScriptedService(jobs)
        session = _PilotSession({"token": "t"}, "http://127.0.0.1:9", "pool", 60.0, walltime)
        monkeypatch.setattr(session, "post", service.post)
        session.serve(worker)
        return service

    return run


def test_a_busy_slot_reports_several_ended_jobs_in_one_request(slot):
    worker = ScriptedWorker()
    service = slot(_jobs(12), worker)
    assert sorted(service.reported, key=lambda j: int(j[2:])) == [f"t/{k}" for k in range(12)]
    assert len(service.reported) == 12  # each once
    dones = [body for route, body in service.requests if route == "done"]
    assert len(dones) < 12 and max(len(body["reports"]) for body in dones) == 2
    assert all(body.get("more", 0) <= 5 for body in dones)  # never more than 1 + ahead held
    assert worker.acks == [(1, True)] * 12  # every result acknowledged, in one worker


def test_jobs_sent_behind_a_job_whose_worker_died_run_in_the_next_worker(slot):
    worker = ScriptedWorker({"t/3": "die"})
    service = slot(_jobs(10), worker)
    assert worker.ran.count("t/3") == 1 and sorted(worker.ran) == sorted(service.reported)
    assert len(set(service.reported)) == 10 == len(service.reported)  # none lost, none twice
    died = [
        report
        for route, body in service.requests
        if route == "done"
        for report in body["reports"]
        if report["worker_died"]
    ]
    assert [report["job"] for report in died] == ["t/3"]
    assert worker.starts == 2


def test_jobs_sent_behind_a_recycling_job_wait_for_its_acks_and_a_fresh_worker(slot):
    worker = ScriptedWorker({"t/2": "recycle"})
    service = slot(_jobs(8), worker)
    assert len(set(service.reported)) == 8 == len(service.reported)
    assert worker.ran == [f"t/{k}" for k in range(8)]  # in order, t/3 on did not run twice
    assert worker.starts == 2
    # The recycling worker had its three results acknowledged before it left.
    assert [ack for ack in worker.acks if ack[0] == 1] == [(1, True)] * 3


def test_a_slot_counts_the_walltime_of_the_jobs_it_holds_before_leasing_more(slot):
    worker = ScriptedWorker()
    service = slot(_jobs(6, walltime=100.0), worker, walltime=3600.0)
    dones = [body for route, body in service.requests if route == "done" and "more" in body]
    # What it asks for starts after what it holds: 3600 s less the 10 s margin, less
    # 100 s per job held (at most five).
    remaining = [body["remaining"] for body in dones]
    assert all(3590 - 5 * 100 - 5 <= left <= 3590 for left in remaining)
    assert min(remaining) <= 3590 - 2 * 100  # it held jobs when it leased more


def test_a_slot_holds_about_two_round_trips_of_work_and_one_job_of_long_jobs():
    pace = _SlotPace()
    assert (pace.ahead, pace.batch) == (1, 1)  # nothing measured: as for long jobs
    pace.trip(0.010)
    pace.answered(sent_at=0.0, at=0.002)
    assert (pace.ahead, pace.batch) == (10, 5)
    pace.answered(sent_at=0.0, at=0.002 + 1.0)
    assert pace.ahead == 1  # one job ahead as soon as jobs run longer than a round trip
    short = _SlotPace()
    short.trip(0.010)
    short.answered(sent_at=0.0, at=0.0001)
    assert short.ahead == pilot._SLOT_AHEAD_MAX


def test_a_worker_that_ended_is_replaced_only_after_its_answers_are_taken(tmp_path, monkeypatch):
    # The real SlotWorker, its process faked: it answered job a, then died in job b.
    # Job c is sent after the process ended but before the slot read that: starting a
    # new worker then would drop a's answer and pair the new worker's with a and b.
    import io
    import queue

    class Ended:
        stdin = io.StringIO()

        def poll(self) -> int:
            return 17

        def wait(self) -> int:
            return 17

    starts: list[str] = []

    def start(self):
        starts.append("worker")
        self.answers = queue.SimpleQueue()
        if len(starts) == 1:
            self.answers.put(('{"exit": 0, "result": "QQ=="}\n', time.monotonic()))
            self.answers.put(None)
        return Ended()

    monkeypatch.setattr(pilot.SlotWorker, "_start", start)
    worker = pilot.SlotWorker({}, tmp_path / "slot", None)
    for name in ("a", "b", "c"):
        worker.send({"spec": name, "workdir": str(tmp_path / name)})
    first, second = worker.receive(), worker.receive()
    assert (first.status, first.died, first.result) == (0, False, "QQ==")
    assert (second.status, second.died) == (17, True)
    assert starts == ["worker"]  # not replaced while its answers were unread
    worker.send({"spec": "c", "workdir": str(tmp_path / "c")})  # the slot sends c again
    assert starts == ["worker", "worker"]
