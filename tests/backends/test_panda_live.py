"""The panda backend against a live PanDA server and JEDI (idds_fat.testing.PandaServer).

Jobs go the whole way: the backend submits a task over ``/api/v1``, JEDI makes
one PanDA job per call, the pilot stand-in (:class:`~idds_fat.testing.PandaPilot`)
acquires it and runs its transformation with its job parameters (the real
bootstrap, then the real wrapper, which fetches its spec from the idds-fat service
and delivers the result over REST), the adder and JEDI close the task.

The service must be reachable from "grid nodes" by a non-loopback address (the
backend refuses loopback URLs), so it runs as ``idds-fat serve`` on this machine's
outward address. One PanDA server serves the session; these tests are few because
JEDI's cycles make each task take seconds.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from idds_fat import Workflow, work
from idds_fat.backends import BACKENDS
from idds_fat.backends.panda import PandaAuthError, PandaClient
from idds_fat.testing import PandaPilot, wait_until
from idds_fat.testing.panda import X509_USER_NAME, backend_class
from idds_fat.testing.processes import free_port

# Fixtures count: the first test also starts the PanDA server (~10 s) and the service.
pytestmark = [pytest.mark.panda, pytest.mark.slow, pytest.mark.timeout(300)]


def _outward_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.200", 9))
        return probe.getsockname()[0]


@pytest.fixture(scope="module")
def idds_service(tmp_path_factory):
    """``idds-fat serve`` on the outward address: (url, token)."""
    host = _outward_address()
    if host.startswith("127."):
        pytest.fail("no non-loopback address here for the service grid nodes reach")
    port = free_port(host)
    token = secrets.token_urlsafe(24)
    base = tmp_path_factory.mktemp("idds-service")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDDS_FAT_")}
    env.update(IDDS_FAT_TOKEN=token, IDDS_FAT_WORK_DIR=str(base / "work"))
    log = open(base / "serve.log", "wb")  # noqa: SIM115 - closed at teardown
    command = [str(Path(sys.executable).parent / "idds-fat"), "serve", "--host", host]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--data-dir", str(base / "data")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://{host}:{port}"

    def answers() -> bool:
        assert process.poll() is None, (base / "serve.log").read_text()
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1)
        except urllib.error.HTTPError:
            return True  # any HTTP answer: it listens
        except OSError:
            return False
        return True

    wait_until(answers, "idds-fat serve to answer", timeout=30)
    yield url, token
    process.terminate()
    process.wait(10)
    log.close()


@pytest.fixture(scope="module")
def pilot(panda_server, tmp_path_factory):
    """Two pilots on the server's queue for the module's tests."""
    runner = PandaPilot(
        panda_server.api_url,
        panda_server.queue,
        tmp_path_factory.mktemp("pilot"),
        slots=2,
        poll=0.5,
        heartbeat=2.0,
    )
    with runner:
        yield runner


@pytest.fixture
def live(monkeypatch, panda_server, idds_service, pilot):
    """Workflow options that run on the live PanDA server; the backend's settings
    (server, credentials, runner, fast polls) come from the harness."""
    monkeypatch.setitem(BACKENDS, "panda", backend_class(panda_server.backend_settings()))
    url, token = idds_service
    return {
        "backend": "panda",
        "service_url": url,
        "token": token,
        "cache": "service",
        "queue": panda_server.queue,
    }


@work(map_results=True)
def loss(x, y):
    return (x - 3) ** 2 + (y + 1) ** 2


@work
def explode(x):
    raise ValueError(f"bad point {x}")


@work
def sleeper(seconds):
    time.sleep(seconds)
    return seconds


@pytest.mark.parametrize("channel", ["rest", pytest.param("stomp", marks=pytest.mark.broker)])
def test_hpo_loop_of_two_rounds_of_five_points_runs_through_panda(
    live, pilot, request, channel
) -> None:
    # A pattern search: each round evaluates 5 points (one PanDA task, 5 jobs)
    # around the best so far; the minimum of `loss` is at (3, -1). Results come back
    # over REST to the service, or, with a broker, over STOMP straight to the caller.
    options = dict(live)
    if channel == "stomp":
        broker = request.getfixturevalue("activemq")
        options.update(broker=broker.url, broker_user="idds", broker_password="fat-secret")
    centre, seen = (0.0, 0.0), {}
    before = {job.panda_id for job in pilot.jobs}
    began = time.monotonic()
    with Workflow(**options) as wf:
        if channel == "stomp":
            wait_until(lambda: wf.parts.subscriber.up, "the STOMP subscription", timeout=30)
        for step in (3.0, 1.0):
            moves = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
            points = [{"x": centre[0] + dx * step, "y": centre[1] + dy * step} for dx, dy in moves]
            submitted = time.monotonic()
            results = loss(multi_jobs_kwargs_list=points)
            next(iter(results.as_completed(timeout=240)))
            print(f"submit -> first result through PanDA: {time.monotonic() - submitted:.1f} s")
            results.wait()
            print(f"round of 5 through PanDA: {time.monotonic() - submitted:.1f} s")
            for point in points:
                seen[(point["x"], point["y"])] = results.get_result(args=point)
            centre = min(seen, key=seen.get)
        stats = wf.stats
    print(f"2 x 5 HPO through PanDA over {channel}: {time.monotonic() - began:.1f} s")
    assert centre == (3.0, -1.0) and seen[centre] == 0.0
    # Every result came by the channel under test, none by the other.
    other = "rest" if channel == "stomp" else "stomp"
    assert stats["received"] == 10 and stats[channel] == 10 and stats[other] == 0, stats
    ran = [job for job in pilot.jobs if job.panda_id not in before]
    assert {job.status for job in ran} == {"finished"} and len(ran) == 10
    assert len({job.task_id for job in ran}) == 2


def test_a_failing_job_reraises_with_its_remote_traceback(live) -> None:
    with Workflow(**live):
        with pytest.raises(ValueError, match="bad point 7") as info:
            explode(7)
    remote = info.value.__cause__
    assert remote is not None and "explode" in str(getattr(remote, "tb", remote))
    assert 'raise ValueError(f"bad point {x}")' in str(getattr(remote, "tb", remote))


def test_cancel_of_a_running_task_fails_its_future_at_once_and_aborts_it(
    live, pilot, panda_server
) -> None:
    client = PandaClient(panda_server.server_url, panda_server.auth)
    with Workflow(**live, on_exit="cancel") as wf:
        future = wf.submit(sleeper, 600)
        running = wait_until(lambda: pilot.running, "the pilot to run the job", timeout=120)
        task_id = next(iter(running.values()))
        assert wf.cancel() == 1
        # The future fails now, not when PanDA gets round to it.
        wait_until(future.done, "the future to end", timeout=5)
        assert future.cancelled()
        killed = time.monotonic()
    # PanDA takes the kill: the pilot is told to kill the payload and reports the
    # job failed, JEDI moves the task aborting -> toabort -> aborted.
    ended = wait_until(
        lambda: [job for job in pilot.jobs if job.task_id == task_id],
        "the pilot to kill the payload",
        timeout=60,
    )
    assert [job.killed for job in ended] == [True]
    wait_until(
        lambda: client.task_status(task_id) == "aborted", "the task to be aborted", timeout=90
    )
    print(f"cancel -> task aborted: {time.monotonic() - killed:.1f} s")


def test_an_expired_or_forged_token_stops_the_workflow_before_anything_runs(
    live, monkeypatch, panda_server, pilot
) -> None:
    # Every other test here authenticates with a token of the harness's issuer, which
    # the server checks itself (signature against the issuer's JWKS over HTTP, expiry,
    # audience, VO group). These two it refuses, and the workflow never starts.
    before = len(pilot.jobs)
    for token, reason in (
        (panda_server.issue_token(lifetime=-60), "Signature has expired"),
        (panda_server.issue_token(trusted=False), "Signature verification failed"),
    ):
        settings = dict(panda_server.backend_settings(), token=token)
        monkeypatch.setitem(BACKENDS, "panda", backend_class(settings))
        with pytest.raises(PandaAuthError, match=reason) as caught:
            with Workflow(**live):
                explode(1)
        assert "before anything was submitted" in str(caught.value)
        assert caught.value.status == 403 and token not in str(caught.value)
    assert len(pilot.jobs) == before and not pilot.running


@work
def greet(name):
    return f"hello {name}"


def test_a_grid_proxy_through_tls_runs_a_task_owned_by_its_dn(
    live, monkeypatch, panda_server, pilot
) -> None:
    # As at an X.509 site: the backend finds the proxy as panda-client does
    # (X509_USER_PROXY), presents it to the front end's TLS listener, which verifies it
    # against the test CA and exports its DN as mod_ssl does; the server makes the
    # caller's user (and the task's owner) from the DN. The backend verifies the
    # server against X509_CERT_DIR.
    proxy = panda_server.issue_proxy()
    assert stat.S_IMODE(proxy.stat().st_mode) == 0o600
    monkeypatch.delenv("PANDA_AUTH", raising=False)
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    monkeypatch.setenv("X509_CERT_DIR", str(panda_server.ca_dir))
    settings = panda_server.backend_settings(x509=True)
    assert settings["server_url"].startswith("https://") and "token" not in settings
    monkeypatch.setitem(BACKENDS, "panda", backend_class(settings))
    before = {job.panda_id for job in pilot.jobs}
    with Workflow(**live):
        assert greet("grid") == "hello grid"
    [job] = [job for job in pilot.jobs if job.panda_id not in before]
    assert job.status == "finished"
    assert panda_server.task_owner(job.task_id) == X509_USER_NAME
    # The proxy's private key went nowhere but its own file.
    key_line = proxy.read_text().split("PRIVATE KEY-----\n")[1].splitlines()[0]
    for log in panda_server.log_dir.iterdir():
        assert key_line not in log.read_text(errors="replace"), log


def test_a_proxy_of_another_ca_is_refused_before_anything_runs(
    live, monkeypatch, panda_server, pilot
) -> None:
    monkeypatch.delenv("PANDA_AUTH", raising=False)
    monkeypatch.setenv("X509_USER_PROXY", str(panda_server.issue_proxy(trusted=False)))
    monkeypatch.setenv("X509_CERT_DIR", str(panda_server.ca_dir))
    settings = panda_server.backend_settings(x509=True)
    monkeypatch.setitem(BACKENDS, "panda", backend_class(settings))
    before = len(pilot.jobs)
    # The handshake fails with the front end's alert; no retry, no task, no secret.
    with pytest.raises(PandaAuthError, match="unknown ca") as caught:
        with Workflow(**live):
            greet("nobody")
    assert "before anything was submitted" in str(caught.value)
    assert "refused the TLS handshake" in str(caught.value)
    assert "X.509 proxy" in str(caught.value)
    assert len(pilot.jobs) == before and not pilot.running


def test_code_context_and_payload_go_through_the_panda_servers_cache(
    live, panda_server, tmp_path
) -> None:
    # As iDDS does: the backend puts them with file_server/upload_cache_file and the
    # jobs read them back from the server's /cache/ (checked against their sha256);
    # the specs and results stay with the idds-fat service.
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.txt").write_text("from the PanDA cache")
    read = work(lambda suffix: open("data.txt").read() + suffix)
    # The setting, as a user gives it: it reaches the backend through Config.
    with Workflow(**live, source_dir=source, panda_cache=True) as wf:
        results = read.map([{"suffix": "!"}, {"suffix": "?"}]).results(timeout=240)
        assert results == ["from the PanDA cache!", "from the PanDA cache?"]
        [task_id] = wf.tasks
        spec = wf.specs.read(wf.tracker.request(f"{task_id}/0"))
    names = {f"sources.idds-fat-{spec.archive['key']}", f"sources.idds-fat-{spec.payload['key']}"}
    assert names <= {path.name for path in panda_server.cache_dir.iterdir()}
    assert set(spec.urls.values()) == {f"{panda_server.url}/cache/{name}" for name in names}
    fetched = (panda_server.log_dir / "front_end.log").read_text()
    for name in names:
        assert f"GET /cache/{name} " in fetched, name


@work(jobs_per_worker=3)
def square(x):
    return x * x


def test_packed_jobs_deliver_their_results_over_stomp(live, pilot, activemq) -> None:
    # Six calls, three per PanDA job: JEDI makes two jobs, each runs the wrapper
    # on three specs, and each result goes over the broker, not REST.
    before = {job.panda_id for job in pilot.jobs}
    broker = {"broker": activemq.url, "broker_user": "idds", "broker_password": "fat-secret"}
    with Workflow(**live, **broker) as wf:
        wait_until(lambda: wf.parts.subscriber.up, "the STOMP subscription", timeout=30)
        results = square.map([{"x": i} for i in range(6)])
        assert results.results(timeout=240) == [i * i for i in range(6)]
        stats = wf.stats
    assert stats["received"] == 6 and stats["stomp"] == 6, stats
    ran = [job for job in pilot.jobs if job.panda_id not in before]
    assert len(ran) == 2 and {job.status for job in ran} == {"finished"}
    assert len({job.task_id for job in ran}) == 1


_CALLER = """
import json, os
from idds_fat import Workflow, work
from idds_fat.backends import BACKENDS
from idds_fat.testing.panda import X509_USER_NAME, backend_class

BACKENDS["panda"] = backend_class(json.loads(os.environ["PANDA_LIVE_SERVER"]))

@work
def gated(i, gate):
    from idds_fat.testing import wait_until

    wait_until(lambda: os.path.exists(gate), "the gate", timeout=240)
    return i * 10

with Workflow(**json.loads(os.environ["PANDA_LIVE_OPTIONS"])) as wf:
    print("ID", wf.id, flush=True)
    gated.map([{"i": i, "gate": os.environ["PANDA_LIVE_GATE"]} for i in range(2)]).wait()
"""


def test_attach_follows_the_panda_task_of_a_killed_caller(
    live, pilot, panda_server, tmp_path
) -> None:
    gate = tmp_path / "gate"
    script = tmp_path / "caller.py"
    script.write_text(_CALLER)
    # Settings and tokens go in the environment, never on a command line.
    env = dict(os.environ)
    env.update(
        PANDA_LIVE_SERVER=json.dumps(panda_server.backend_settings()),
        PANDA_LIVE_OPTIONS=json.dumps(live),
        PANDA_LIVE_GATE=str(gate),
    )
    before = set(pilot.running)
    caller = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = caller.stdout.readline()
        assert line.startswith("ID "), line
        workflow_id = line.split()[1]
        running = wait_until(
            lambda: len(set(pilot.running) - before) == 2 and pilot.running,
            "the pilot to run both jobs",
            timeout=180,
        )
    finally:
        caller.kill()
        caller.wait(30)
        caller.stdout.close()
    [task_id] = {task for panda_id, task in running.items() if panda_id not in before}
    gate.touch()  # the jobs finish with no caller, delivering to the service

    options = {key: live[key] for key in ("service_url", "token", "cache")}
    with Workflow.attach(workflow_id, **options) as wf:
        [task] = wf.tasks.values()
        assert task.results(timeout=180) == [0, 10]
    # The attached backend followed the same PanDA task to its end: nothing ran twice.
    assert PandaClient(panda_server.server_url, panda_server.auth).task_status(task_id) == "done"
    assert [job.task_id for job in pilot.jobs].count(task_id) == 2
