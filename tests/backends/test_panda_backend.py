"""The PanDA backend against recorded exchanges.

The replies the backend's everyday calls get (secret, submit, status, details,
kill, upload, "Task not found" right after submit) are built from what a live
PanDA server 1.0.4 answered: ``panda_recordings/exchanges.json``, written by
``panda_recordings/record.py`` (run it again after a server upgrade). The rarer
shapes (quota refusals, 5xx, X.509) follow /work/shared/PANDA_API.md, read from
panda-client and panda-server; each names its section and source file.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses

from idds_fat.backends.base import JobExit, JobRequest, Resources
from idds_fat.backends.panda import (
    BOOTSTRAP_B64,
    DEFAULT_TRANS_PATH,
    PandaAuth,
    PandaAuthError,
    PandaBackend,
    PandaClient,
    PandaError,
    PandaRejectedError,
    PandaUnavailableError,
    api_base,
    pseudo_input,
)
from idds_fat.backends.panda import backend as panda_backend
from idds_fat.config import load_config
from idds_fat.errors import ConfigError, IddsFatError
from idds_fat.testing import wait_until
from idds_fat.testing.grid_certificates import TestCertificateAuthority

SERVER = "https://panda.example.org:25443/server/panda"  # a PANDA_URL_SSL
API = "https://panda.example.org:25443/api/v1"  # §1 and §6.1: host and port, path dropped
CACHE = "https://pandacache.example.org/server/panda"  # a PANDACACHE_URL
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJuYW1lIjoiSmFuZSBEb2UifQ.c2lnbmF0dXJlLXRva2Vu"
VO = "wlcg"
HTTP_CACHE = "https://fat.example.org:8443/cache"
WRAPPER_URL = f"{HTTP_CACHE}/{'a' * 64}"
JOB_SECRETS = {
    "hmac_key": "5e" * 32,
    "token": "service-token-do-not-leak",
    "broker_user": None,
    "broker_password": None,
}
SECRET_NAME = "IDDS_FAT_TESTSECRET"


def spec_url(index: int) -> str:
    return f"{HTTP_CACHE}/{hashlib.sha256(str(index).encode()).hexdigest()}"


def make_jobs(count: int = 3, resources: Resources | None = None) -> list[JobRequest]:
    return [
        JobRequest(
            job_id=f"t0001/{i}",
            name=f"hpo-20261121T235049-0a1b2c/t0001/objective[{i}]",
            spec_location=spec_url(i),
            workdir=Path("/nonexistent/jobs/t0001") / str(i),
            resources=resources or Resources(cores=4, memory_mb=8000, walltime=5400),
        )
        for i in range(count)
    ]


class Exits:
    """Records on_exit calls, from any thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, JobExit]] = []
        self.lock = threading.Lock()

    def __call__(self, job: JobRequest, outcome: JobExit) -> None:
        with self.lock:
            self.calls.append((job.job_id, outcome))


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def client() -> Iterator[PandaClient]:
    c = PandaClient(
        SERVER, PandaAuth("oidc", token=TOKEN, vo=VO), cache_url=CACHE, attempts=3, backoff=0
    )
    yield c
    c.close()


@pytest.fixture
def exits() -> Exits:
    return Exits()


def make_backend(client: PandaClient, exits: Exits, **options) -> PandaBackend:
    settings = dict(
        on_exit=exits,
        wrapper_url=WRAPPER_URL,
        job_secrets=JOB_SECRETS,
        client=client,
        queue="BNL_OSG_1",
        cloud="US",
        container_image="docker://python:3.11",
        max_attempt=3,
        # Polls are driven by the test (backend.poll()); the thread never fires alone.
        poll_min=3600.0,
        poll_max=3600.0,
        secret_name=SECRET_NAME,
    )
    settings.update(options)
    return PandaBackend(**settings)


# --- recorded replies --------------------------------------------------------------------


RECORDINGS = json.loads(
    (Path(__file__).with_name("panda_recordings") / "exchanges.json").read_text()
)


def recorded(rsps: responses.RequestsMock, name: str, match=(), **changes) -> None:
    """Add the live server's reply ``name`` (exchanges.json) for its request; ``changes``
    replace keys of the reply's envelope (``data``, ``message``) or of its ``data``."""
    exchange = RECORDINGS[name]
    reply = json.loads(json.dumps(exchange["reply"]))
    body = reply["body"]
    for key, value in changes.items():
        if key in body:
            body[key] = value
        else:
            body["data"][key] = value
    method = exchange["request"]["method"]
    rsps.add(
        method,
        f"{API}/{exchange['request']['operation']}",
        match=list(match),
        body=json.dumps(body) if not isinstance(body, str) else body,
        status=reply["status"],
        content_type=reply["content_type"].split(";")[0],
    )


def envelope(success: bool, message: str = "", data=None) -> dict:
    # §2 "New-API envelope"; pandaserver/api/v1/common.py generate_response.
    return {"success": success, "message": message, "data": data}


def add_secret_stored(rsps: responses.RequestsMock) -> None:
    # POST /api/v1/creds/set_user_secrets, JSON {"key", "value"} (panda-server
    # pandaserver/api/v1/credential_management_api.py set_user_secrets: secure, POST).
    recorded(rsps, "set_user_secrets")


def add_submitted(rsps: responses.RequestsMock, task_id: int = 4242) -> None:
    # §2a: POST /api/v1/task/submit -> data is the new jediTaskID
    # (pandaserver/api/v1/task_api.py submit; task_event_module.insertTaskParamsPanda).
    recorded(rsps, "submit", message=f"succeeded. new jediTaskID={task_id}", data=task_id)


def add_status(rsps: responses.RequestsMock, status: str, task_id: int = 4242) -> None:
    # §2b: GET /api/v1/task/get_status?task_id=N -> the status string in data
    # (pandaserver/api/v1/task_api.py get_status). The server sends text/plain (§2).
    match = [responses.matchers.query_param_matcher({"task_id": str(task_id)})]
    recorded(rsps, "status_running", match, data=status)


def add_details(rsps: responses.RequestsMock, statistics: str, status: str, task_id=4242) -> None:
    # §2b: GET /api/v1/task/get_details -> inDS, outDS, statistics, PandaID, ...
    # (task_event_module.getJediTaskDetails), status with include_status.
    query = {"task_id": str(task_id), "include_parameters": "false", "include_status": "true"}
    match = [responses.matchers.query_param_matcher(query)]
    recorded(rsps, "details_done", match, statistics=statistics, status=status)


def sent_json(call) -> dict:
    return json.loads(call.request.body)


def submitted_task(rsps: responses.RequestsMock) -> dict:
    [call] = [c for c in rsps.calls if c.request.url == f"{API}/task/submit"]
    return sent_json(call)["task_parameters"]


def submit_three(rsps, client, exits, **options) -> PandaBackend:
    add_secret_stored(rsps)
    add_submitted(rsps)
    backend = make_backend(client, exits, **options)
    backend.submit(make_jobs(3))
    return backend


# --- submit ------------------------------------------------------------------------------


def test_submit_of_three_jobs_inserts_one_task_shaped_like_iddss(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits)
    assert [(c.request.method, c.request.url) for c in rsps.calls] == [
        ("POST", f"{API}/creds/set_user_secrets"),
        ("POST", f"{API}/task/submit"),
    ]
    submit = rsps.calls[1].request
    # §1 OIDC mode and §6.2/§6.7: bearer token, VO as Origin, JSON accepted, no cert.
    assert submit.headers["Authorization"] == f"Bearer {TOKEN}"
    assert submit.headers["Origin"] == VO
    assert submit.headers["Accept"] == "application/json"
    assert submit.headers["Content-Type"] == "application/json"
    assert submit.req_kwargs["cert"] is None
    body = sent_json(rsps.calls[1])
    # §2a / §6.4: task_parameters is a JSON object, not a string.
    assert set(body) == {"task_parameters", "parent_tid"}
    assert body["parent_tid"] is None
    params = body["task_parameters"]
    # §3, field by field (iDDS BaseSubmitter.get_task_params, JEDI TaskRefinerBase).
    assert params["taskName"].startswith("idds-fat.hpo-20261121T235049-0a1b2c.t0001.")
    assert params["userName"] == "idds-fat"
    assert params["vo"] == "wlcg"
    assert params["prodSourceLabel"] == "user"
    assert params["taskPriority"] == 1000
    assert params["taskType"] == "anal"
    assert params["processingType"] == "idds-fat"
    assert params["architecture"] == ""
    assert params["transUses"] == ""
    assert params["transHome"] is None
    assert params["transPath"] == DEFAULT_TRANS_PATH
    assert params["site"] == "BNL_OSG_1"  # the queue, as iDDS maps work.queue
    assert "PandaSite" not in params
    assert params["cloud"] == "US"
    assert params["container_name"] == "docker://python:3.11"
    assert params["coreCount"] == 4
    assert params["ramCount"] == 2000  # 8000 MB over 4 cores
    assert params["ramUnit"] == "MBPerCoreFixed"
    assert params["maxWalltime"] == 2  # 5400 s, in hours as JEDI reads it
    assert params["maxAttempt"] == 3
    assert params["maxFailure"] == 3
    assert params["skipScout"] is True
    assert params["useSecrets"] is True
    assert params["noInput"] is True
    assert params["nFiles"] == 3
    assert params["nFilesPerJob"] == 1
    decoded = [
        json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in params["pfnList"]
    ]
    assert decoded == [{"spec": spec_url(i)} for i in range(3)]
    assert all("/" not in p and "^" not in p for p in params["pfnList"])
    assert params["jobParameters"] == [
        {
            "type": "constant",
            "value": f"echo {BOOTSTRAP_B64} | base64 -d | python3 - {SECRET_NAME} "
            f"{WRAPPER_URL} ${{IN/L}}",
        }
    ]
    dataset = f"panda.idds_fat.{params['taskName']}"
    assert params["log"] == {
        "type": "template",
        "param_type": "log",
        "dataset": dataset + "/",
        "container": dataset + "/",
        "value": dataset + ".${SN}.log.tgz",
    }
    # JEDI's required keys (TaskRefinerBase.extractCommon / doBasicRefine, §3).
    required = "taskName userName vo prodSourceLabel taskPriority architecture transUses "
    required += "transHome processingType taskType jobParameters"
    assert set(required.split()) <= set(params)
    backend.shutdown(cancel=True)


def test_secrets_reach_panda_as_a_user_secret_and_never_in_the_task(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits)
    stored = sent_json(rsps.calls[0])
    assert stored == {"key": SECRET_NAME, "value": json.dumps(JOB_SECRETS)}
    raw = rsps.calls[1].request.body.decode()
    params = submitted_task(rsps)
    bootstrap = base64.b64decode(BOOTSTRAP_B64).decode()
    pfns = " ".join(base64.urlsafe_b64decode(p + "==").decode() for p in params["pfnList"])
    for text in (raw, bootstrap, pfns):
        assert JOB_SECRETS["hmac_key"] not in text
        assert JOB_SECRETS["token"] not in text
        assert TOKEN not in text
    assert SECRET_NAME in params["jobParameters"][0]["value"]  # the name, not the value
    backend.shutdown(cancel=True)


def test_submit_without_job_secrets_asks_for_none(rsps, client, exits) -> None:
    add_submitted(rsps)
    backend = make_backend(client, exits, job_secrets=None)
    backend.submit(make_jobs(1, Resources()))
    params = submitted_task(rsps)
    assert "useSecrets" not in params
    assert params["coreCount"] == 1
    assert "ramCount" not in params and "maxWalltime" not in params
    assert params["jobParameters"][0]["value"].endswith(f"python3 - - {WRAPPER_URL} ${{IN/L}}")
    assert [c.request.url for c in rsps.calls] == [f"{API}/task/submit"]
    backend.shutdown(cancel=True)


def test_rejected_task_raises_with_pandas_message(rsps, client, exits) -> None:
    add_secret_stored(rsps)
    # §2a failure table, code 10 (task_event_module.insertTaskParamsPanda).
    rsps.post(
        f"{API}/task/submit",
        json=envelope(False, "Too many active tasks for jdoe 5001>5000", 10),
    )
    backend = make_backend(client, exits)
    with pytest.raises(PandaRejectedError) as caught:
        backend.submit(make_jobs(3))
    assert "Too many active tasks for jdoe 5001>5000" in str(caught.value)
    assert caught.value.code == 10
    assert isinstance(caught.value, IddsFatError)
    # The jobs are also reported, so nothing waits for them.
    assert [j for j, _ in exits.calls] == ["t0001/0", "t0001/1", "t0001/2"]
    assert all("Too many active tasks" in o.reason for _, o in exits.calls)


def test_validation_failure_on_http_200_is_a_rejection(rsps, client) -> None:
    # §2: validation failures come back as HTTP 200 with success:false.
    rsps.post(f"{API}/task/submit", json=envelope(False, "SSL secure connection is required"))
    with pytest.raises(PandaRejectedError, match="SSL secure connection is required"):
        client.submit_task({"taskName": "x"})


def test_gpus_and_unreachable_urls_are_refused_before_any_request(rsps, client, exits) -> None:
    backend = make_backend(client, exits)
    with pytest.raises(ValueError, match="GPU"):
        backend.check(Resources(gpus=1))
    local_spec = JobRequest("t0001/0", "x", "/home/u/cache/ab/abcd", Path("/tmp"), Resources())
    with pytest.raises(ConfigError, match="HTTP"):
        backend.submit([local_spec])
    with pytest.raises(ConfigError, match="loopback"):
        make_backend(client, exits, wrapper_url="http://127.0.0.1:8000/cache/" + "a" * 64)
    assert len(rsps.calls) == 0


# --- status ------------------------------------------------------------------------------


def test_polls_follow_the_task_to_done_and_report_clean_exits(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits)
    add_status(rsps, "running")
    assert backend.poll() is True
    assert exits.calls == []
    rsps.replace(
        responses.GET,
        f"{API}/task/get_status",
        json=envelope(True, "", "done"),
        match=[responses.matchers.query_param_matcher({"task_id": "4242"})],
    )
    add_details(rsps, "finished*3", "done")
    backend.poll()
    assert [job for job, _ in exits.calls] == ["t0001/0", "t0001/1", "t0001/2"]
    for _, outcome in exits.calls:
        assert outcome.returncode == 0 and not outcome.cancelled
        assert "PanDA task 4242 is done" in outcome.reason
        assert "finished*3" in outcome.reason
    status_calls = [c for c in rsps.calls if "get_status" in c.request.url]
    assert all(c.request.method == "GET" for c in status_calls)  # §6.3
    assert status_calls[0].request.headers["Accept"] == "application/json"
    # Ended tasks are not polled again; shutdown then only deletes the secret.
    assert backend.poll() is False
    backend.shutdown()
    last = rsps.calls[-1]
    assert last.request.url == f"{API}/creds/set_user_secrets"
    assert sent_json(last) == {"key": SECRET_NAME}


def test_an_attaching_caller_adopts_the_task_and_deletes_the_first_callers_secret(
    rsps, client, exits
) -> None:
    # The first caller records, per job, the PanDA task and the secret its jobs read.
    started: list[tuple[str, str]] = []
    first = submit_three(
        rsps, client, exits, on_start=lambda job, ref: started.append((job.job_id, ref))
    )
    assert started == [(f"t0001/{i}", f"4242:{SECRET_NAME}") for i in range(3)]
    first.shutdown(wait=False)  # the caller went away; its task runs on
    # A second caller (another secret) follows the same task instead of a new one.
    second = make_backend(client, exits, secret_name="IDDS_FAT_SECOND")
    second.adopt([(job, ref) for job, (_, ref) in zip(make_jobs(3), started, strict=True)])
    add_status(rsps, "done")
    add_details(rsps, "finished*3", "done")
    second.poll()
    assert [(job, outcome.returncode) for job, outcome in exits.calls] == [
        ("t0001/0", 0),
        ("t0001/1", 0),
        ("t0001/2", 0),
    ]
    assert sum("task/submit" in c.request.url for c in rsps.calls) == 1
    second.shutdown()
    deleted = [sent_json(c) for c in rsps.calls if c.request.url.endswith("set_user_secrets")]
    assert {"key": SECRET_NAME} in deleted  # no job reads it any more
    with pytest.raises(ValueError, match="not a PanDA job reference"):
        second.adopt([(make_jobs(1)[0], "t0001/0")])


def test_failed_task_reports_its_state_and_statistics_in_the_reason(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits)
    add_status(rsps, "failed")
    add_details(rsps, "finished*1,failed*2", "failed")
    backend.poll()
    assert len(exits.calls) == 3
    for _, outcome in exits.calls:
        assert outcome.returncode is None and not outcome.cancelled
        assert "PanDA task 4242 ended failed" in outcome.reason
        assert "finished*1,failed*2" in outcome.reason
    backend.shutdown()


def test_task_aborted_elsewhere_is_a_failure_not_a_cancel(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits)
    add_status(rsps, "aborted")
    add_details(rsps, "cancelled*3", "aborted")
    backend.poll()
    assert {o.reason for _, o in exits.calls} == {
        "PanDA task 4242 was aborted outside this workflow (jobs: cancelled*3)"
    }
    assert not any(o.cancelled for _, o in exits.calls)
    backend.shutdown()


def test_task_panda_forgot_is_reported_after_three_polls(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits)
    add_status(rsps, "running")
    backend.poll()
    # §2b: "Task not found" as success:false.
    rsps.replace(responses.GET, f"{API}/task/get_status", json=envelope(False, "Task not found"))
    backend.poll()
    backend.poll()
    assert exits.calls == []
    backend.poll()
    assert {o.reason for _, o in exits.calls} == {"PanDA no longer knows task 4242"}
    backend.shutdown()


def test_task_not_found_right_after_submit_is_not_lost(rsps, client, exits, monkeypatch) -> None:
    # A live server answers "Task not found" until JEDI has registered the task.
    backend = submit_three(rsps, client, exits)
    recorded(rsps, "status_not_found")
    for _ in range(5):
        backend.poll()
    assert exits.calls == []
    # Never seen, and long past the grace: then it is lost.
    monkeypatch.setattr(panda_backend, "NOT_FOUND_GRACE", 0.0)
    for _ in range(3):
        backend.poll()
    assert {o.reason for _, o in exits.calls} == {"PanDA no longer knows task 4242"}
    backend.shutdown()


def test_a_kill_refused_before_panda_registered_the_task_is_sent_again_once_it_is_known(
    rsps, client, exits
) -> None:
    # A live server refuses the kill ("not the task owner") while the task is not found.
    backend = submit_three(rsps, client, exits)
    recorded(rsps, "status_not_found")
    recorded(rsps, "kill_not_registered")
    backend.cancel(["t0001/0", "t0001/1", "t0001/2"])
    assert [o.cancelled for _, o in exits.calls] == [True] * 3  # at once, all the same
    backend.poll()

    def kills() -> int:
        return sum(c.request.url == f"{API}/task/kill" for c in rsps.calls)

    assert kills() == 1
    rsps.remove(responses.GET, f"{API}/task/get_status")
    rsps.remove(responses.POST, f"{API}/task/kill")
    recorded(rsps, "status_running")
    recorded(rsps, "kill_running")
    backend.poll()
    backend.poll()
    assert kills() == 2  # once more when PanDA knows the task, then not again
    backend.shutdown()


def test_status_errors_are_logged_and_polled_again(rsps, client, exits, caplog) -> None:
    backend = submit_three(rsps, client, exits)
    rsps.get(f"{API}/task/get_status", body=requests.ConnectionError("down"))
    with caplog.at_level(logging.WARNING, logger="idds_fat.backends.panda"):
        assert backend.poll() is False
    assert "could not get the status of PanDA task 4242" in caplog.text
    assert exits.calls == []
    backend.shutdown(cancel=True)


def test_poller_thread_reports_without_being_asked(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits, poll_min=0.01, poll_max=0.05)
    add_status(rsps, "done")
    add_details(rsps, "finished*3", "done")
    wait_until(lambda: len(exits.calls) >= 3, "three exits reported", timeout=10)
    assert [o.returncode for _, o in exits.calls] == [0, 0, 0]
    backend.shutdown()


# --- cancel ------------------------------------------------------------------------------


def test_cancelling_every_job_kills_the_task(rsps, client, exits) -> None:
    backend = submit_three(rsps, client, exits)
    # §2c: POST /api/v1/task/kill {"task_id": N, "broadcast": false}; success iff code 0
    # (pandaserver/api/v1/task_api.py kill). The message wording changes: not asserted.
    recorded(rsps, "kill_running")
    backend.cancel(["t0001/0", "t0001/1", "t0001/2"])
    [kill] = [c for c in rsps.calls if c.request.url == f"{API}/task/kill"]
    assert kill.request.method == "POST"
    assert sent_json(kill) == {"task_id": 4242, "broadcast": False}
    assert [o for _, o in exits.calls] == [JobExit(None, "cancelled", cancelled=True)] * 3
    backend.shutdown()  # nothing left to wait for


def test_cancelling_part_of_a_task_reports_those_and_kills_only_at_the_last(
    rsps, client, exits
) -> None:
    backend = submit_three(rsps, client, exits)
    rsps.post(f"{API}/task/kill", json=envelope(True, "registered", 0))
    backend.cancel(["t0001/1"])
    assert [j for j, _ in exits.calls] == ["t0001/1"]
    assert not any("task/kill" in c.request.url for c in rsps.calls)
    backend.cancel(["t0001/0", "t0001/2", "t0001/1"])
    assert sorted(j for j, _ in exits.calls) == ["t0001/0", "t0001/1", "t0001/2"]
    assert sum("task/kill" in c.request.url for c in rsps.calls) == 1
    backend.shutdown()


def test_a_kill_panda_refuses_is_logged_not_raised(rsps, client, exits, caplog) -> None:
    backend = submit_three(rsps, client, exits)
    # §2c error 4: the task already ended.
    recorded(rsps, "kill_done")
    with caplog.at_level(logging.ERROR, logger="idds_fat.backends.panda"):
        backend.shutdown(cancel=True)
    assert "could not kill PanDA task 4242" in caplog.text
    assert "not accepted if the task is in done status" in caplog.text
    assert len(exits.calls) == 3


# --- errors, retries, auth ---------------------------------------------------------------


def test_auth_failure_raises_without_the_token_in_message_or_logs(rsps, client, caplog) -> None:
    # §1 / §6.7: a bad token is HTTP 403, plain text (pandaserver/server/panda.py).
    rsps.post(
        f"{API}/task/submit",
        status=403,
        body="ERROR : Token authentication failed. Signature has expired",
        content_type="text/plain",
    )
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(PandaAuthError) as caught:
            client.submit_task({"taskName": "x"})
    assert "Token authentication failed. Signature has expired" in str(caught.value)
    assert caught.value.status == 403
    assert TOKEN not in str(caught.value)
    assert TOKEN not in caplog.text
    assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_server_errors_are_retried_until_success(rsps, client, caplog) -> None:
    # 5xx is plain text (§2 "HTTP-level errors"); transient, so retried.
    rsps.post(f"{API}/task/submit", status=503, body="Service Unavailable")
    rsps.post(f"{API}/task/submit", status=500, body="ERROR : database connection lost")
    add_submitted(rsps, 77)
    with caplog.at_level(logging.DEBUG):
        assert client.submit_task({"taskName": "x"}) == 77
    assert len(rsps.calls) == 3
    assert "retrying" in caplog.text
    assert TOKEN not in caplog.text


def test_server_down_for_good_raises_unavailable(rsps, client, caplog) -> None:
    rsps.post(f"{API}/task/submit", body=requests.ConnectionError("Connection refused"))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(PandaUnavailableError) as caught:
            client.submit_task({"taskName": "x"})
    message = str(caught.value)
    assert "panda.example.org:25443" in message and "after 3 attempts" in message
    assert "Connection refused" in message
    assert TOKEN not in message and TOKEN not in caplog.text
    assert caught.value.__suppress_context__  # the request (with its headers) is not chained
    assert len(rsps.calls) == 3


def test_server_failing_for_good_with_5xx_raises_unavailable(rsps, client) -> None:
    rsps.get(f"{API}/task/get_status", status=502, body="Bad Gateway")
    with pytest.raises(PandaUnavailableError, match="HTTP 502"):
        client.task_status(1)
    assert len(rsps.calls) == 3


def test_a_reply_that_is_not_json_is_an_error(rsps, client) -> None:
    # §2: without Accept: application/json the server answers str(dict).
    rsps.get(f"{API}/task/get_status", body="{'success': True, 'data': 'running'}")
    with pytest.raises(PandaError, match="JSON envelope"):
        client.task_status(1)


def test_x509_proxy_is_the_client_certificate(rsps, tmp_path) -> None:
    proxy = tmp_path / "x509up_u1000"
    proxy.write_text("-----BEGIN CERTIFICATE-----\n...\n")
    x509 = PandaClient(SERVER, PandaAuth.from_env({"X509_USER_PROXY": str(proxy)}), backoff=0)
    rsps.get(f"{API}/task/get_status", json=envelope(True, "", "running"))
    assert x509.task_status(5) == "running"
    request = rsps.calls[0].request
    # §1 X.509 mode: TLS client auth with the proxy (cert and key in one file), no headers.
    assert request.req_kwargs["cert"] == str(proxy)
    assert "Authorization" not in request.headers and "Origin" not in request.headers
    assert request.headers["Accept"] == "application/json"


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[TestCertificateAuthority, str, list[str]]]:
    """A TLS server on loopback as mod_ssl runs one for PanDA: its certificate from a
    test CA, a client certificate required and verified against that CA (proxies
    allowed); answers every request with an empty success envelope. Yields the CA,
    the ``PANDA_URL_SSL`` and the subject DNs of the clients it served."""
    ca = TestCertificateAuthority(tmp_path / "grid")
    host = ca.host_cert()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 at most: the refusal then comes within the client's handshake, so the
    # client reads the alert whatever the timing (with 1.3 it comes after).
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(host.cert, host.key)
    context.load_verify_locations(capath=ca.ca_dir)
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    callers: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            subject = self.connection.getpeercert()["subject"]
            callers.append("".join(f"/{k}={v}" for rdn in subject for k, v in rdn))
            body = json.dumps(envelope(True, "", {})).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ca, f"https://127.0.0.1:{server.server_address[1]}/server/panda", callers
    server.shutdown()
    server.server_close()


def test_a_grid_proxy_authenticates_over_tls_verified_against_x509_cert_dir(
    tls_server, monkeypatch
) -> None:
    ca, url, callers = tls_server
    proxy, dn = ca.issue_proxy("x509up_u1000", "Jane Doe")
    monkeypatch.setenv("X509_CERT_DIR", str(ca.ca_dir))
    # requests lets this override a Session's verify; the client must not.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.directory / "no-such-bundle.pem"))
    client = PandaClient(url, PandaAuth.from_env({"X509_USER_PROXY": str(proxy)}), backoff=0)
    assert client.voms_attributes() == {}
    # The server verified the proxy (signed by the user's certificate, not the CA).
    assert callers == [dn.replace("/DC=", "/domainComponent=").replace("/CN=", "/commonName=")]


def test_a_proxy_the_server_refuses_is_an_auth_error_at_once(
    tls_server, monkeypatch, tmp_path, caplog
) -> None:
    ca, url, callers = tls_server
    rogue = TestCertificateAuthority(tmp_path / "rogue", name="rogue CA")
    proxy, _ = rogue.issue_proxy("x509up_u1000", "Jane Doe")
    monkeypatch.setenv("X509_CERT_DIR", str(ca.ca_dir))
    client = PandaClient(url, PandaAuth("x509", proxy=proxy), attempts=5, backoff=0)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(PandaAuthError, match="unknown ca") as caught:
            client.voms_attributes()
    assert "refused the TLS handshake" in str(caught.value) and str(proxy) in str(caught.value)
    assert "retrying" not in caplog.text and callers == []


def test_a_server_certificate_x509_cert_dir_does_not_trust_is_an_auth_error(
    tls_server, monkeypatch, tmp_path
) -> None:
    ca, url, callers = tls_server
    proxy, _ = ca.issue_proxy("x509up_u1000", "Jane Doe")
    other = TestCertificateAuthority(tmp_path / "other", name="other CA")
    monkeypatch.setenv("X509_CERT_DIR", str(other.ca_dir))
    client = PandaClient(url, PandaAuth("x509", proxy=proxy), attempts=5, backoff=0)
    with pytest.raises(PandaAuthError, match="did not verify against") as caught:
        client.voms_attributes()
    assert str(other.ca_dir) in str(caught.value) and callers == []


def test_oidc_token_file_is_read_stripped_for_each_request(rsps, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"PANDA_AUTH": "oidc", "OIDC_AUTH_TOKEN_FILE": str(token_file), "OIDC_AUTH_VO": VO}
    oidc = PandaClient(SERVER, PandaAuth.from_env(env), backoff=0)
    rsps.get(f"{API}/task/get_status", json=envelope(True, "", "running"))
    oidc.task_status(5)
    token_file.write_text("renewed-token\n")
    oidc.task_status(5)
    assert [c.request.headers["Authorization"] for c in rsps.calls] == [
        f"Bearer {TOKEN}",
        "Bearer renewed-token",
    ]
    assert rsps.calls[0].request.headers["Origin"] == VO
    assert rsps.calls[0].request.req_kwargs["cert"] is None


def test_auth_from_env_follows_panda_clients_lookup_order(tmp_path) -> None:
    # §1 "Token lookup order" (pandaclient/Client.py get_token_string, openidc_utils.py).
    base = {"PANDA_AUTH": "oidc", "PANDA_AUTH_VO": "atlas", "OIDC_AUTH_VO": "other"}
    first = PandaAuth.from_env({**base, "PANDA_AUTH_ID_TOKEN": "a", "OIDC_AUTH_ID_TOKEN": "b"})
    assert (first.token, first.vo) == ("a", "atlas")
    assert PandaAuth.from_env({**base, "OIDC_AUTH_ID_TOKEN": "b"}).token == "b"
    (tmp_path / ".token").write_text(json.dumps({"id_token": "c", "refresh_token": "r"}))
    cached = PandaAuth.from_env({**base, "PANDA_CONFIG_ROOT": str(tmp_path)})
    assert cached.token == "c"
    assert "zzz-secret" not in repr(PandaAuth("oidc", token="zzz-secret", vo="x"))
    with pytest.raises(PandaAuthError, match="no ID token"):
        PandaAuth.from_env({**base, "PANDA_CONFIG_ROOT": str(tmp_path / "none")})
    with pytest.raises(PandaAuthError, match="VO"):
        PandaAuth.from_env({"PANDA_AUTH": "oidc", "PANDA_AUTH_ID_TOKEN": "a"})
    with pytest.raises(PandaAuthError, match="proxy"):
        PandaAuth.from_env({"X509_USER_PROXY": str(tmp_path / "missing")})


def test_api_base_keeps_host_and_port_only() -> None:
    assert api_base("https://h:25443/server/panda") == "https://h:25443/api/v1"  # §6.1
    assert api_base("https://pandaserver.cern.ch/server/panda") == (
        "https://pandaserver.cern.ch/api/v1"
    )


# --- the PanDA cache ---------------------------------------------------------------------


def _multipart_part(call) -> bytes:
    return call.request.body if isinstance(call.request.body, bytes) else b""


def test_put_file_uploads_one_multipart_part_named_file(rsps, client, tmp_path) -> None:
    archive = tmp_path / "context.zip"
    data = b"PK\x03\x04 a zip archive, not gzip"
    archive.write_bytes(data)
    # §2e: POST /api/v1/file_server/upload_cache_file, multipart part "file"
    # (pandaserver/api/v1/file_server_api.py upload_cache_file; Client.py putFile).
    recorded(rsps, "upload")
    url = client.put_file(archive)
    name = f"sources.idds-fat-{hashlib.sha256(data).hexdigest()}.zip"
    # §2e download: <cache host>/cache/<name>, the path of PANDACACHE_URL ignored.
    assert url == f"https://pandacache.example.org/cache/{name}"
    [call] = rsps.calls  # not gzip: no reuse check, its checksum would mean nothing (§5)
    assert call.request.method == "POST"
    assert call.request.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert call.request.headers["Accept"] == "application/json"
    body = _multipart_part(call)
    # §5 / §6.8: the filename is the basename and starts with "sources." (768 MiB bucket).
    assert f'Content-Disposition: form-data; name="file"; filename="{name}"'.encode() in body
    assert data in body
    assert str(tmp_path).encode() not in body


def test_node_urls_put_context_and_payload_into_pandas_cache_once_each(rsps, client, exits) -> None:
    objects = {hashlib.sha256(data).hexdigest(): data for data in (b"PK context", b"payload")}
    reads: list[str] = []

    def read(key: str) -> bytes:
        reads.append(key)
        return objects[key]

    assert make_backend(client, exits).node_urls(list(objects), read) == {}  # off by default
    assert len(rsps.calls) == 0 and reads == []
    recorded(rsps, "upload")
    backend = make_backend(client, exits, panda_cache=True)
    urls = backend.node_urls(list(objects), read)
    assert urls == {
        key: f"https://pandacache.example.org/cache/sources.idds-fat-{key}" for key in objects
    }
    # The next task's specs name the same context: it is not put again.
    context = next(iter(objects))
    assert backend.node_urls([context], read) == {context: urls[context]}
    assert len(rsps.calls) == 2 and sorted(reads) == sorted(objects)
    assert all(c.request.url == f"{API}/file_server/upload_cache_file" for c in rsps.calls)


def test_put_file_of_gzip_looks_it_up_by_size_and_trailer_crc32(rsps, client) -> None:
    raw = b"print('hello')\n" * 100
    data = gzip.compress(raw)
    # §2e reuse check: POST validate_cache_file {"file_size", "checksum"}; §5: the
    # checksum is the CRC32 in the gzip trailer, which is the CRC32 of the content.
    recorded(rsps, "validate_missing")
    recorded(rsps, "upload")
    client.put_file(data, "sources.ctx.tar.gz")
    check, upload = rsps.calls
    assert sent_json(check) == {"file_size": len(data), "checksum": zlib.crc32(raw)}
    assert b'name="file"; filename="sources.ctx.tar.gz"' in _multipart_part(upload)


def test_put_file_found_in_the_cache_is_not_uploaded_again(rsps, client) -> None:
    data = gzip.compress(b"x" * 1000)
    rsps.post(
        f"{API}/file_server/validate_cache_file",
        json=envelope(True, "FOUND:pandacache2.example.org:sources.old.tar.gz", None),
    )
    url = client.put_file(data, "sources.new.tar.gz")
    assert url == "https://pandacache2.example.org/cache/sources.old.tar.gz"
    assert len(rsps.calls) == 1


def test_put_file_over_the_limit_of_its_name_sends_nothing(rsps, client) -> None:
    # §5: names not starting with "sources." are limited to 10 MiB (client and server).
    with pytest.raises(PandaError, match="over PanDA's 10 MiB"):
        client.put_file(b"\0" * (10 * 1024 * 1024 + 1), "context.zip")
    assert len(rsps.calls) == 0


def test_put_file_content_addressed_name_that_exists_is_done(rsps, client) -> None:
    # §2e failure message "ERROR: cannot overwrite file": same name, same sha256, same bytes.
    recorded(rsps, "upload_again")
    url = client.put_file(b"same bytes")
    assert url.startswith("https://pandacache.example.org/cache/sources.idds-fat-")
    with pytest.raises(PandaRejectedError, match="cannot overwrite"):
        client.put_file(b"same bytes", "sources.chosen-name")


# --- the job command on a node -----------------------------------------------------------

FAKE_WRAPPER = b"""import json, os, sys
fd = os.environ.get("IDDS_FAT_JOB_SECRETS_FD")
secrets = os.read(int(fd), 65536).decode() if fd else None
with open("/proc/self/environ", "rb") as block:
    environ = block.read().decode("utf-8", "replace")
with open("ran.json", "w") as out:
    json.dump({"argv": sys.argv[1:], "secrets": secrets, "environ": environ}, out)
"""


@pytest.fixture
def node_cache() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP cache serving FAKE_WRAPPER at /cache/<sha256> to the service token."""
    key = hashlib.sha256(FAKE_WRAPPER).hexdigest()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            # Any content key answers with the wrapper: a wrong key gets wrong content.
            if not (self.path.startswith("/cache/") and len(self.path) == 7 + 64):
                self.send_error(404)
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(FAKE_WRAPPER)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/cache/{key}", seen
    server.shutdown()
    server.server_close()


def _node_command(backend: PandaBackend, wrapper_url: str, job: JobRequest) -> str:
    # What JEDI does (§3 "How ${IN/T} gets its value"): ${IN/L} becomes the job's entry.
    command = backend.job_command().replace(WRAPPER_URL, wrapper_url)
    return command.replace("${IN/L}", pseudo_input(job)).replace("python3", sys.executable)


@pytest.mark.parametrize("runner", ["one string", "split by the pilot's shell"])
def test_job_command_runs_the_wrapper_with_the_secret_the_pilot_wrote(
    client, exits, tmp_path, node_cache, runner
) -> None:
    wrapper_url, seen = node_cache
    backend = make_backend(client, exits)
    job = make_jobs(3)[2]
    # pilot3 hide_secrets: the job's secrets as panda_secrets.json in its directory,
    # with the user's other secrets, which stay.
    pilots = {SECRET_NAME: json.dumps(JOB_SECRETS), "OTHER": "kept"}
    (tmp_path / "panda_secrets.json").write_text(json.dumps(pilots))
    command = _node_command(backend, wrapper_url, job)
    if runner != "one string":
        # The pilot runs "./<transPath basename> <job parameters>" in a shell; a runner
        # that re-joins its arguments for bash must give the same result (unverified
        # which of the two bash-c does, so both are tested).
        (tmp_path / "bash-c").write_text('#!/bin/bash\nexec bash -c "$*"\n')
        (tmp_path / "bash-c").chmod(0o755)
        command = "./bash-c " + command
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert ran["argv"] == ["--spec", spec_url(2)]
    assert json.loads(ran["secrets"]) == JOB_SECRETS  # on the pipe the bootstrap made
    assert seen == [f"Bearer {JOB_SECRETS['token']}"]
    # Neither the wrapper's environment block nor the pilot's file holds them any more.
    assert JOB_SECRETS["hmac_key"] not in ran["environ"]
    assert JOB_SECRETS["token"] not in ran["environ"]
    assert json.loads((tmp_path / "panda_secrets.json").read_text()) == {"OTHER": "kept"}
    assert (tmp_path / "panda_secrets.json").stat().st_mode & 0o777 == 0o600


def test_job_command_keeps_a_secret_the_pilot_put_in_the_environment_out_of_the_wrappers(
    client, exits, tmp_path, node_cache
) -> None:
    # Pilots that expose user secrets as environment variables named by their keys.
    wrapper_url, _ = node_cache
    backend = make_backend(client, exits)
    done = subprocess.run(
        ["bash", "-c", _node_command(backend, wrapper_url, make_jobs(1)[0])],
        cwd=tmp_path,
        env=dict(os.environ, **{SECRET_NAME: json.dumps(JOB_SECRETS)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert json.loads(ran["secrets"]) == JOB_SECRETS
    assert JOB_SECRETS["hmac_key"] not in ran["environ"]
    assert JOB_SECRETS["token"] not in ran["environ"]


def test_job_command_refuses_a_wrapper_that_does_not_match_its_sha256(
    client, exits, tmp_path, node_cache
) -> None:
    wrapper_url, _ = node_cache
    wrong = wrapper_url.rsplit("/", 1)[0] + "/" + "0" * 64
    backend = make_backend(client, exits, job_secrets=None)
    done = subprocess.run(
        ["bash", "-c", _node_command(backend, wrong, make_jobs(1)[0])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "does not match its sha256" in done.stderr
    assert not (tmp_path / "ran.json").exists()
    missing = wrapper_url.rsplit("/", 1)[0] + "/missing"
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", _node_command(backend, missing, make_jobs(1)[0])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot fetch the wrapper" in done.stderr and "404" in done.stderr
    assert time.monotonic() - started < 10  # a 404 is not retried


def test_job_command_without_the_secret_exits_2(client, exits, tmp_path, node_cache) -> None:
    wrapper_url, seen = node_cache
    backend = make_backend(client, exits)
    done = subprocess.run(
        ["bash", "-c", _node_command(backend, wrapper_url, make_jobs(1)[0])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"PanDA user secret {SECRET_NAME} not found" in done.stderr
    assert seen == []


# --- construction from a workflow --------------------------------------------------------


def test_create_takes_wrapper_url_secrets_and_callback_from_the_setup(monkeypatch) -> None:
    monkeypatch.setenv("PANDA_AUTH", "oidc")
    monkeypatch.setenv("PANDA_AUTH_ID_TOKEN", TOKEN)
    monkeypatch.setenv("PANDA_AUTH_VO", VO)
    monkeypatch.setenv("PANDA_URL_SSL", SERVER)

    class Setup:
        on_exit = Exits()
        wrapper_url = WRAPPER_URL
        secrets = JOB_SECRETS
        placement = {
            "queue": "DOMA_LSST_GOOGLE_TEST",
            "cloud": "US",
            "container_options": {"container_image": "docker://python:3.11"},
        }

    with responses.RequestsMock() as rsps:
        recorded(rsps, "voms_attributes")
        add_secret_stored(rsps)
        add_submitted(rsps)
        backend = PandaBackend.create(None, Setup())  # type: ignore[arg-type]
        assert backend.client.api == API
        assert backend.secret_name.startswith("IDDS_FAT_")
        assert rsps.calls[0].request.url == f"{API}/system/get_voms_attributes"
        backend.submit(make_jobs(1))
        params = submitted_task(rsps)
        assert (params["site"], params["cloud"]) == ("DOMA_LSST_GOOGLE_TEST", "US")
        assert params["container_name"] == "docker://python:3.11"
        assert "PandaSite" not in params
        assert sent_json(rsps.calls[1])["value"] == json.dumps(JOB_SECRETS)
        rsps.post(f"{API}/task/kill", json=envelope(True, "registered", 0))
        add_secret_stored(rsps)
        backend.shutdown(cancel=True)
    Setup.wrapper_url = None
    with pytest.raises(ConfigError, match="HTTP cache"):
        PandaBackend.create(None, Setup())  # type: ignore[arg-type]


@pytest.mark.parametrize("source", ["env", "file", "argument"])
def test_the_panda_cache_setting_reaches_the_backend(monkeypatch, tmp_path, source) -> None:
    # From every source a setting has, and off unless set.
    monkeypatch.setenv("PANDA_AUTH", "oidc")
    monkeypatch.setenv("PANDA_AUTH_ID_TOKEN", TOKEN)
    monkeypatch.setenv("PANDA_AUTH_VO", VO)
    monkeypatch.setenv("PANDA_URL_SSL", SERVER)
    monkeypatch.setenv("PANDACACHE_URL", CACHE)
    assert load_config().panda_cache is False
    if source == "env":
        monkeypatch.setenv("IDDS_FAT_PANDA_CACHE", "yes")
        config = load_config()
    elif source == "file":
        (tmp_path / "idds-fat.toml").write_text("[idds_fat]\npanda_cache = true\n")
        monkeypatch.setenv("IDDS_FAT_CONFIG", str(tmp_path / "idds-fat.toml"))
        config = load_config()
    else:
        config = load_config(panda_cache=True)
    assert config.panda_cache is True

    class Setup:
        on_exit = Exits()
        wrapper_url = WRAPPER_URL
        secrets = None
        placement = None

    context = b"PK context"
    key = hashlib.sha256(context).hexdigest()
    with responses.RequestsMock() as rsps:
        recorded(rsps, "voms_attributes")
        recorded(rsps, "upload")
        backend = PandaBackend.create(config, Setup())
        urls = backend.node_urls([key], lambda _: context)
        assert urls == {key: f"https://pandacache.example.org/cache/sources.idds-fat-{key}"}
        assert rsps.calls[-1].request.url == f"{API}/file_server/upload_cache_file"
        backend.shutdown(cancel=True)


def test_a_bad_panda_cache_setting_names_its_source(monkeypatch) -> None:
    monkeypatch.setenv("IDDS_FAT_PANDA_CACHE", "sometimes")
    with pytest.raises(ConfigError, match=r"panda_cache = 'sometimes' from \$IDDS_FAT_PANDA_CACHE"):
        load_config()


def _unsigned_jwt(claims: dict) -> str:
    # The backend only reads a token's claims (for its messages); PanDA checks it.
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJl"


def test_create_stops_on_an_expired_token_before_anything_is_submitted(monkeypatch, caplog) -> None:
    expired = _unsigned_jwt({"sub": "jane", "exp": int(time.time()) - 600})
    monkeypatch.setenv("PANDA_AUTH", "oidc")
    monkeypatch.setenv("PANDA_AUTH_ID_TOKEN", expired)
    monkeypatch.setenv("PANDA_AUTH_VO", VO)
    monkeypatch.setenv("PANDA_URL_SSL", SERVER)

    class Setup:
        on_exit = Exits()
        wrapper_url = WRAPPER_URL
        secrets = JOB_SECRETS
        placement = {"queue": "DOMA_LSST_GOOGLE_TEST"}

    with responses.RequestsMock() as rsps, caplog.at_level(logging.DEBUG):
        # What the live server answers an expired token (its own check, against the issuer).
        recorded(rsps, "expired_token")
        with pytest.raises(PandaAuthError) as caught:
            PandaBackend.create(None, Setup())  # type: ignore[arg-type]
        assert [c.request.url for c in rsps.calls] == [f"{API}/system/get_voms_attributes"]
    message = str(caught.value)
    assert "Signature has expired" in message and caught.value.status == 403
    assert "before anything was submitted" in message
    assert "an ID token for VO wlcg, expired" in message
    assert expired not in message and expired not in caplog.text
    assert Setup.on_exit.calls == []


def test_a_forged_token_is_refused_by_the_credentials_check(rsps, client, exits) -> None:
    recorded(rsps, "forged_token")
    backend = make_backend(client, exits)
    with pytest.raises(PandaAuthError, match="Signature verification failed") as caught:
        backend.check_credentials()
    assert "an ID token for VO wlcg" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert [c.request.url for c in rsps.calls] == [f"{API}/system/get_voms_attributes"]


def test_the_credentials_check_passes_when_panda_knows_the_caller(rsps, client, exits) -> None:
    recorded(rsps, "voms_attributes")
    make_backend(client, exits).check_credentials()
    assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert rsps.calls[0].request.headers["Origin"] == VO


def test_auth_describes_itself_without_the_token(tmp_path) -> None:
    fresh = _unsigned_jwt({"exp": int(time.time()) + 3600})
    assert "expires in" in PandaAuth("oidc", token=fresh, vo=VO).describe()
    assert fresh not in PandaAuth("oidc", token=fresh, vo=VO).describe()
    assert PandaAuth("oidc", token="opaque", vo=VO).describe() == "an ID token for VO wlcg"
    proxy = tmp_path / "x509up"
    assert PandaAuth("x509", proxy=proxy).describe() == f"the X.509 proxy {proxy}"


def test_jobs_per_worker_packs_entries_into_each_panda_job(client, exits) -> None:
    backend = make_backend(client, exits)
    packed = Resources(cores=1, jobs_per_worker=3)
    params = backend.task_parameters(make_jobs(7, packed))
    assert params["nFiles"] == 7 and params["nFilesPerJob"] == 3
    assert len(params["pfnList"]) == 7  # one entry per job; JEDI groups them
    assert backend.task_parameters(make_jobs(2, packed))["nFilesPerJob"] == 2


@pytest.mark.parametrize("rendering", ["['{a}','{b}']", "{a},{b}"])
def test_job_command_with_a_pack_runs_the_wrapper_on_a_jobs_file(
    client, exits, tmp_path, node_cache, rendering
) -> None:
    wrapper_url, _ = node_cache
    backend = make_backend(client, exits)
    first, second = make_jobs(2)
    (tmp_path / "panda_secrets.json").write_text(json.dumps({SECRET_NAME: json.dumps(JOB_SECRETS)}))
    command = backend.job_command().replace(WRAPPER_URL, wrapper_url)
    entries = rendering.format(a=pseudo_input(first), b=pseudo_input(second))
    command = command.replace("${IN/L}", f'"{entries}"').replace("python3", sys.executable)
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert ran["argv"] == ["--jobs-file", "idds_fat_jobs.tsv", "--pack", "0"]
    lines = (tmp_path / "idds_fat_jobs.tsv").read_text().splitlines()
    assert lines == [f"0\tjob-0\t{spec_url(0)}", f"0\tjob-1\t{spec_url(1)}"]
