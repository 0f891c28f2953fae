"""Jobs leased to pilots: the pool's rules and the service's /pilots routes."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from idds_fat.service import EmbeddedService
from idds_fat.service.leases import LEASES, LeasedJob, LeasePool

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
        answer = _post(service, f"{pool.name}/done", {"pilot": "p", "job": "t/7", "exit": 0})
        assert answer.json() == {"known": True, "recorded": False, "jobs": [], "closed": False}
        assert reports == [("p", "t/7", 0)]
        pool.close()
        closed = _post(service, f"{pool.name}/lease", {"pilot": "p", "wait": 20}).json()
        assert closed == {"jobs": [], "closed": True}
    finally:
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
        body = {
            "pilot": "p",
            "job": "t/0",
            "exit": 0,
            "result": base64.b64encode(b"signed result").decode(),
            "more": 1,
        }
        answer = _post(service, f"{pool.name}/done", body).json()
        assert answer["known"] and answer["recorded"]
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
        result = base64.b64encode(b"r").decode()
        body = {"pilot": "p", "job": "t/0", "exit": 0, "result": result, "more": 1}
        answer = _post(service, f"{pool.name}/done", body).json()
        assert answer["known"] and not answer["recorded"]  # the pilot delivers it itself
        assert [j["job_id"] for j in answer["jobs"]] == ["t/1"]
        # A report of a lease the pilot no longer holds records nothing either.
        again = _post(service, f"{pool.name}/done", {**body, "more": 0}).json()
        assert again == {"known": False, "recorded": False, "jobs": [], "closed": False}
        bad = _post(service, f"{pool.name}/done", {**body, "result": "***"})
        assert bad.status_code == 400
    finally:
        LEASES.remove(pool)
