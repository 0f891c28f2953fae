"""Jobs leased to pilots: the pool's rules and the service's /pilots routes."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from idds_fat.backends import InlineSpec
from idds_fat.service import EmbeddedService
from idds_fat.service.leases import LEASES, LeasedJob, LeasePool
from idds_fat.testing.waiting import wait_until

TOKEN = "lease-test-token"


def _job(n: int, walltime: float | None = None) -> LeasedJob:
    return LeasedJob(f"t/{n}", f"/specs/{n}", f"/jobs/{n}", walltime)


def _pool(done=None, leased=None, direct_results=False) -> LeasePool:
    return LeasePool(
        leased or (lambda pilot, jobs: None),
        done or (lambda pilot, job, report: False),
        direct_results,
    )


def test_a_job_goes_only_to_a_pilot_with_the_time_to_finish_it():
    pool = _pool()
    pool.offer([_job(0, walltime=600), _job(1)])
    assert [j.job_id for j in pool.take("old", remaining=100)] == ["t/1"]
    assert pool.take("old", remaining=100) == []
    assert [j.job_id for j in pool.take("young", remaining=3000)] == ["t/0"]


def test_the_jobs_of_a_gone_pilot_are_leased_again_first_and_it_gets_no_more():
    pool = _pool()
    pool.offer([_job(0), _job(1), _job(2)])
    assert [j.job_id for j in pool.take("p1", None)] == ["t/0"]
    assert [j.job_id for j in pool.release_pilot("p1")] == ["t/0"]
    assert pool.take("p1", None) == []  # its long poll still open gets nothing
    assert [j.job_id for j in pool.take("p2", None, limit=3)] == ["t/0", "t/1", "t/2"]
    assert pool.done("p1", "t/0") is None  # a late report of the gone pilot ends nothing
    assert pool.done("p2", "t/0") is not None
    assert pool.counts() == (0, 2)


def test_withdrawn_jobs_are_neither_queued_nor_leased():
    pool = _pool()
    pool.offer([_job(0), _job(1), _job(2)])
    pool.take("p", None)
    assert pool.withdraw(["t/0", "t/2", "t/9"]) == ["t/0", "t/2"]
    assert pool.counts() == (1, 0)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EmbeddedService]:
    with EmbeddedService(tmp_path, token=TOKEN) as running:
        yield running


def _post(service: EmbeddedService, path: str, body: dict, token: str = TOKEN):
    return requests.post(
        f"{service.url}/pilots/{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def test_routes_lease_with_a_long_poll_and_report_done(service):
    reports = []
    pool = _pool(done=lambda pilot, job, report: reports.append((pilot, job, report["exit"])))
    LEASES.add(pool)
    try:
        answers = []
        waiter = threading.Thread(
            target=lambda: answers.append(
                _post(service, f"{pool.name}/lease", {"pilot": "p", "wait": 20}).json()
            )
        )
        waiter.start()
        pool.offer([_job(7)])  # wakes the poll whether it started waiting or not
        waiter.join(30)
        assert answers and [j["job_id"] for j in answers[0]["jobs"]] == ["t/7"]
        body = {"pilot": "p", "reports": [{"job": "t/7", "exit": 0}]}
        answer = _post(service, f"{pool.name}/done", body)
        assert answer.json() == {"known": [True], "recorded": [False], "jobs": [], "closed": False}
        assert reports == [("p", "t/7", 0)]
        pool.close()
        closed = _post(service, f"{pool.name}/lease", {"pilot": "p", "wait": 20}).json()
        assert closed == {"jobs": [], "closed": True}
    finally:
        LEASES.remove(pool)


def test_a_lease_is_answered_before_its_start_is_recorded_and_a_done_waits_for_it(service):
    # The backend records a leased job's start in SQLite, which the caller's own threads
    # may hold: the pilot gets its job without waiting for that, and the job's end
    # reaches the backend only after its start.
    events: list[str] = []
    gate = threading.Event()

    def leased(pilot, jobs):
        assert gate.wait(60)
        events.append("started")

    pool = _pool(leased=leased, done=lambda pilot, job, report: events.append("ended") or False)
    asked = threading.Event()
    recorded = pool.recorded

    async def recorded_noted():
        asked.set()
        await recorded()

    pool.recorded = recorded_noted  # type: ignore[method-assign]
    LEASES.add(pool)
    try:
        pool.offer([_job(3)])
        answer = _post(service, f"{pool.name}/lease", {"pilot": "p", "wait": 0}).json()
        assert [j["job_id"] for j in answer["jobs"]] == ["t/3"] and events == []
        done: list[dict] = []
        body = {"pilot": "p", "reports": [{"job": "t/3", "exit": 0}]}
        reporter = threading.Thread(
            target=lambda: done.append(_post(service, f"{pool.name}/done", body).json())
        )
        reporter.start()
        assert asked.wait(30)  # the done request waits for the record
        gate.set()
        reporter.join(30)
        assert done and done[0]["known"] == [True]
        assert events == ["started", "ended"]
    finally:
        gate.set()
        LEASES.remove(pool)


def test_routes_need_the_token_and_a_known_pool(service):
    pool = _pool()
    LEASES.add(pool)
    try:
        assert (
            _post(service, f"{pool.name}/lease", {"pilot": "p"}, token="wrong").status_code == 401
        )
    finally:
        LEASES.remove(pool)
    assert _post(service, f"{pool.name}/lease", {"pilot": "p"}).status_code == 404
    assert _post(service, "x/lease", {"no": "pilot"}).status_code == 400


def test_a_done_report_carries_the_result_and_leases_the_next_job(service):
    reports, started = [], []

    def done(pilot, job, report):
        reports.append((job, report["result"]))
        return True

    pool = _pool(done, lambda pilot, jobs: started.extend(j.job_id for j in jobs), True)
    LEASES.add(pool)
    try:
        pool.offer([_job(0), _job(1), _job(2)])
        leased = _post(service, f"{pool.name}/lease", {"pilot": "p", "limit": 1}).json()
        assert [(j["job_id"], j["reply"]) for j in leased["jobs"]] == [("t/0", True)]
        report = {"job": "t/0", "exit": 0, "result": base64.b64encode(b"signed result").decode()}
        body = {"pilot": "p", "reports": [report], "more": 1}
        answer = _post(service, f"{pool.name}/done", body).json()
        assert answer["known"] == [True] and answer["recorded"] == [True]
        assert [j["job_id"] for j in answer["jobs"]] == ["t/1"]  # one request: end and next
        assert reports == [("t/0", b"signed result")]  # decoded before the backend sees it
        assert started == ["t/0", "t/1"]
        assert pool.counts() == (1, 1)
    finally:
        LEASES.remove(pool)


def test_a_result_not_recorded_is_left_to_the_pilot_and_its_next_job_still_comes(service):
    def done(pilot, job, report):
        raise RuntimeError("the state database is gone")

    pool = _pool(done, direct_results=True)
    LEASES.add(pool)
    try:
        pool.offer([_job(0), _job(1)])
        pool.take("p", None)
        report = {"job": "t/0", "exit": 0, "result": base64.b64encode(b"r").decode()}
        body = {"pilot": "p", "reports": [report], "more": 1}
        answer = _post(service, f"{pool.name}/done", body).json()
        assert answer["known"] == [True] and answer["recorded"] == [False]  # the pilot delivers
        assert [j["job_id"] for j in answer["jobs"]] == ["t/1"]
        # A report of a lease the pilot no longer holds records nothing either.
        again = _post(service, f"{pool.name}/done", {**body, "more": 0}).json()
        assert again == {"known": [False], "recorded": [False], "jobs": [], "closed": False}
        bad = {**body, "reports": [{**report, "result": "***"}]}
        assert _post(service, f"{pool.name}/done", bad).status_code == 400
        for reports in ([], [{"exit": 0}], "t/0"):
            malformed = _post(service, f"{pool.name}/done", {"pilot": "p", "reports": reports})
            assert malformed.status_code == 400
    finally:
        LEASES.remove(pool)


def test_a_lease_carries_the_jobs_spec_inline_with_its_key_when_it_has_one(service):
    pool = _pool()
    LEASES.add(pool)
    try:
        spec = InlineSpec('{"v": 1}')
        inline = LeasedJob("t/1", "/specs/1", "/jobs/1", inline_spec=spec, spec_key="ab" * 32)
        pool.offer([_job(0), inline, _job(2)])
        leased = _post(service, f"{pool.name}/lease", {"pilot": "p", "limit": 2}).json()["jobs"]
        assert [(j["job_id"], j.get("spec_json"), j.get("spec_key")) for j in leased] == [
            ("t/0", None, None),  # read from the cache, as before
            ("t/1", '{"v": 1}', "ab" * 32),
        ]
        assert '{"v"' not in repr(inline)  # on S3 a spec holds presigned URLs
        spec.text = None  # stored meanwhile: the job reads it from the cache
        assert "spec_json" not in inline.to_json()
    finally:
        LEASES.remove(pool)


def test_one_done_request_records_every_result_it_carries_and_leases_as_many(service):
    reports, started = [], []

    def done(pilot, job, report):
        reports.append((job, report["result"]))
        return job != "t/1"  # the backend could not keep this one

    pool = _pool(done, lambda pilot, jobs: started.extend(j.job_id for j in jobs), True)
    LEASES.add(pool)
    try:
        pool.offer([_job(n) for n in range(6)])
        assert len(pool.take("p", None, limit=3)) == 3
        body = {
            "pilot": "p",
            "reports": [
                {"job": f"t/{n}", "exit": 0, "result": base64.b64encode(b"r%d" % n).decode()}
                for n in range(3)
            ],
            "more": 3,
        }
        answer = _post(service, f"{pool.name}/done", body).json()
        assert answer["known"] == [True, True, True]
        assert answer["recorded"] == [True, False, True]  # t/1's worker delivers it itself
        assert reports == [("t/0", b"r0"), ("t/1", b"r1"), ("t/2", b"r2")]
        assert [j["job_id"] for j in answer["jobs"]] == ["t/3", "t/4", "t/5"]
        assert started == ["t/3", "t/4", "t/5"]
        assert pool.counts() == (0, 3)
    finally:
        LEASES.remove(pool)


def test_a_job_reported_twice_in_one_request_is_recorded_once(service):
    reports = []
    pool = _pool(lambda pilot, job, report: reports.append(job) or True, direct_results=True)
    LEASES.add(pool)
    try:
        pool.offer([_job(0), _job(1)])
        pool.take("p", None, limit=2)
        result = base64.b64encode(b"r").decode()
        twice = [{"job": "t/0", "exit": 0, "result": result}] * 2
        body = {"pilot": "p", "reports": [*twice, {"job": "t/1", "exit": 0, "result": result}]}
        answer = _post(service, f"{pool.name}/done", body).json()
        # The duplicate ended no lease: not known, not recorded (were its result
        # delivered all the same, the collector drops it by its attempt).
        assert answer["known"] == [True, False, True]
        assert answer["recorded"] == [True, False, True]
        assert reports == ["t/0", "t/1"]
        assert pool.counts() == (0, 0)
    finally:
        LEASES.remove(pool)


def test_a_busy_slot_leasing_ahead_leaves_their_share_to_slots_waiting(service):
    pool = _pool()
    LEASES.add(pool)
    try:
        idle = []
        body = {"pilot": "q", "wait": 20, "remaining": 60}  # too short for the long jobs
        waiter = threading.Thread(
            target=lambda: idle.append(_post(service, f"{pool.name}/lease", body).json())
        )
        waiter.start()
        wait_until(lambda: pool.waiting() == 1, "the idle slot's long poll")
        pool.offer([_job(n, walltime=600) for n in range(6)])
        wait_until(lambda: pool.waiting() == 1, "the idle slot waiting again")
        assert len(pool.take("p", None, limit=16, share=True)) == 3  # its share: one waits
        assert len(pool.take("p", None, limit=16)) == 3  # without share: what it asks for
        pool.offer([_job(9)])
        waiter.join(30)
        assert [j["job_id"] for j in idle[0]["jobs"]] == ["t/9"]
    finally:
        LEASES.remove(pool)


def test_slots_waiting_together_share_the_jobs_that_come(service):
    pool = _pool()
    LEASES.add(pool)
    try:
        answers: list[list[str]] = []

        def wait_for_jobs(pilot: str) -> None:
            body = {"pilot": pilot, "wait": 20, "limit": 8}
            jobs = _post(service, f"{pool.name}/lease", body).json()["jobs"]
            answers.append([j["job_id"] for j in jobs])

        waiters = [threading.Thread(target=wait_for_jobs, args=(p,)) for p in ("a", "b")]
        for waiter in waiters:
            waiter.start()
        wait_until(lambda: pool.waiting() == 2, "both slots' long polls")
        pool.offer([_job(n) for n in range(6)])
        for waiter in waiters:
            waiter.join(30)
        assert sorted(len(jobs) for jobs in answers) == [3, 3]  # not 6 and 0
        assert sorted(sum(answers, [])) == [f"t/{n}" for n in range(6)]
    finally:
        LEASES.remove(pool)
