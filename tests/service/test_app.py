import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from idds_fat.cache import content_key
from idds_fat.node.envelope import seal
from idds_fat.service import EmbeddedService
from idds_fat.testing import wait_until

TOKEN = "app-test-token"
AUTH = {"Authorization": "Bearer " + TOKEN}


def envelope(workflow: str = "wf1", body: bytes = b"body", **header) -> bytes:
    fields = {"kind": "result", "workflow": workflow, "task": "t1", "job": 0, "attempt": 0}
    fields.update(status="ok", **header)
    return seal(fields, body, b"k" * 32)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EmbeddedService]:
    with EmbeddedService(tmp_path, token=TOKEN) as running:
        yield running


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = "Bearer " + TOKEN
        yield session


def results(http: requests.Session, service: EmbeddedService, **params) -> dict:
    response = http.get(service.url + "/results/wf1", params=params, timeout=70)
    assert response.status_code == 200, response.text
    return response.json()


def decoded(answer: dict) -> list[bytes]:
    return [base64.b64decode(item["envelope"]) for item in answer["results"]]


def wait_for_waiting_reader(service: EmbeddedService, workflow: str) -> None:
    wakeups = service.app.state.wakeups
    wait_until(lambda: wakeups.waiting(workflow), "the long poll to start waiting", timeout=10)


def test_healthz_needs_no_token(service: EmbeddedService) -> None:
    response = requests.get(service.url + "/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"ok": True}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/cache/" + "a" * 64),
        ("PUT", "/cache/" + "a" * 64),
        ("GET", "/results/wf1"),
        ("POST", "/results/wf1"),
    ],
)
def test_missing_or_wrong_token_gets_401(service, headers, method, path) -> None:
    response = requests.request(method, service.url + path, headers=headers, timeout=10)
    assert response.status_code == 401
    assert TOKEN not in response.text


def test_cache_put_is_201_then_200_and_get_returns_bytes(service, http) -> None:
    key = content_key(b"object")
    url = f"{service.url}/cache/{key}"
    assert http.head(url, timeout=10).status_code == 404
    assert http.get(url, timeout=10).status_code == 404
    assert http.put(url, data=b"object", timeout=10).status_code == 201
    assert http.put(url, data=b"object", timeout=10).status_code == 200
    assert http.head(url, timeout=10).status_code == 200
    response = http.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"object"
    assert response.headers["content-type"] == "application/octet-stream"


def test_cache_put_rejects_bad_key_and_mismatched_body(service, http) -> None:
    assert http.put(service.url + "/cache/not-a-key", data=b"x", timeout=10).status_code == 400
    wrong = http.put(f"{service.url}/cache/{content_key(b'a')}", data=b"b", timeout=10)
    assert wrong.status_code == 400
    assert "\n" not in wrong.text.strip()
    assert not any((service.data_dir / "cache").rglob("*"))


def test_post_then_get_since_cursor(service, http) -> None:
    first, second = envelope(job=0), envelope(job=1)
    posted = http.post(service.url + "/results/wf1", data=first, timeout=10)
    assert posted.status_code == 201
    seq1 = posted.json()["seq"]
    seq2 = http.post(service.url + "/results/wf1", data=second, timeout=10).json()["seq"]

    everything = results(http, service, since=0)
    assert everything["cursor"] == seq2
    assert decoded(everything) == [first, second]
    assert [item["seq"] for item in everything["results"]] == [seq1, seq2]

    after_first = results(http, service, since=seq1)
    assert decoded(after_first) == [second]

    nothing = results(http, service, since=seq2)
    assert nothing == {"cursor": seq2, "results": []}

    limited = results(http, service, since=0, limit=1)
    assert limited["cursor"] == seq1 and decoded(limited) == [first]


def test_long_poll_returns_when_a_result_is_posted(service, http) -> None:
    answers: list[dict] = []
    reader = threading.Thread(target=lambda: answers.append(results(http, service, wait=30)))
    started = time.monotonic()
    reader.start()
    wait_for_waiting_reader(service, "wf1")
    with requests.Session() as poster:
        poster.headers["Authorization"] = "Bearer " + TOKEN
        assert poster.post(service.url + "/results/wf1", data=envelope(), timeout=10).ok
    reader.join(10)
    assert not reader.is_alive()
    assert time.monotonic() - started < 10
    assert decoded(answers[0]) == [envelope()]


def test_long_poll_ignores_other_workflows_and_times_out_empty(service, http) -> None:
    assert http.post(service.url + "/results/wf2", data=envelope("wf2"), timeout=10).ok
    answer = results(http, service, since=0, wait=0.2)
    assert answer == {"cursor": 0, "results": []}


def test_stopping_the_service_releases_long_polls(tmp_path: Path) -> None:
    service = EmbeddedService(tmp_path, token=TOKEN).start()
    answers: list[int] = []

    def poll() -> None:
        url = service.url + "/results/wf1?wait=60"
        answers.append(requests.get(url, headers=AUTH, timeout=70).status_code)

    reader = threading.Thread(target=poll)
    reader.start()
    wait_for_waiting_reader(service, "wf1")
    started = time.monotonic()
    service.stop()
    reader.join(10)
    assert time.monotonic() - started < 5
    assert answers == [200]


def test_results_survive_service_restart(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path, token=TOKEN) as first:
        response = requests.post(
            first.url + "/results/wf1",
            data=envelope(),
            headers={"Authorization": "Bearer " + TOKEN},
            timeout=10,
        )
        assert response.status_code == 201
    with EmbeddedService(tmp_path, token=TOKEN) as second:
        answer = requests.get(
            second.url + "/results/wf1",
            headers={"Authorization": "Bearer " + TOKEN},
            timeout=10,
        ).json()
    assert decoded(answer) == [envelope()]


def test_identical_envelope_posted_twice_is_stored_once(service, http) -> None:
    url = service.url + "/results/wf1"
    seqs = {http.post(url, data=envelope(), timeout=10).json()["seq"] for _ in range(2)}
    assert len(seqs) == 1
    assert len(results(http, service)["results"]) == 1


def test_forged_envelope_for_same_job_is_still_stored(service, http) -> None:
    forged = seal(
        {"kind": "result", "workflow": "wf1", "task": "t1", "job": 0, "attempt": 0},
        b"evil",
        b"attacker-key-xxxxxxxxxxxxxxxxxxx",
    )
    url = service.url + "/results/wf1"
    assert http.post(url, data=forged, timeout=10).status_code == 201
    assert http.post(url, data=envelope(), timeout=10).status_code == 201
    assert decoded(results(http, service)) == [forged, envelope()]


def test_post_rejects_garbage_and_workflow_mismatch_with_one_line_reason(service, http) -> None:
    url = service.url + "/results/wf1"
    garbage = http.post(url, data=b"garbage" * 20, timeout=10)
    assert garbage.status_code == 400
    assert "envelope" in garbage.text and "\n" not in garbage.text.strip()
    mismatch = http.post(url, data=envelope("other"), timeout=10)
    assert mismatch.status_code == 400
    assert "other" in mismatch.text


def test_bad_query_parameters_get_400(service, http) -> None:
    assert http.get(service.url + "/results/wf1?since=abc", timeout=10).status_code == 400
    assert http.get(service.url + "/results/wf1?wait=nan", timeout=10).status_code == 400


def test_expired_results_are_purged_at_startup(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path, token=TOKEN) as first:
        posted = requests.post(
            first.url + "/results/wf1", data=envelope(), headers=AUTH, timeout=10
        )
        assert posted.status_code == 201
    with EmbeddedService(tmp_path, token=TOKEN, result_ttl_seconds=-1) as second:
        answer = requests.get(second.url + "/results/wf1", headers=AUTH, timeout=10).json()
    assert answer == {"cursor": 0, "results": []}
