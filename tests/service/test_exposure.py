"""Who may reach the service (issue 17, items 4 and 7): a token always, the Host and
Origin checks, and the token rule. Real HTTP requests against real servers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from idds_fat import Workflow, work
from idds_fat.cli import main
from idds_fat.errors import ServiceError
from idds_fat.service import EmbeddedService, serve
from idds_fat.service.exposure import (
    MIN_TOKEN_CHARS,
    HostPolicy,
    check_token,
    generate_token,
    same_origin,
    split_host,
)
from idds_fat.testing import wait_until
from idds_fat.testing.processes import free_port

TOKEN = generate_token()


class Steered:
    """A stand-in for the monitor's cancel: counts the requests that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def routes(self, guarded):
        async def cancel(request: Request) -> Response:
            self.calls += 1
            return JSONResponse({"cancelled": 1})

        async def listing(request: Request) -> Response:
            return JSONResponse({"workflows": []})

        return [
            Route("/api/workflows/{workflow}/cancel", guarded(cancel), methods=["POST"]),
            Route("/api/workflows", guarded(listing), methods=["GET"]),
        ]


@pytest.fixture
def steered() -> Steered:
    return Steered()


@pytest.fixture
def service(tmp_path: Path, steered: Steered) -> Iterator[EmbeddedService]:
    with EmbeddedService(tmp_path / "service", TOKEN, routes=steered.routes) as running:
        yield running


def _auth(token: str = TOKEN, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def _port(service: EmbeddedService) -> int:
    return int(service.url.rsplit(":", 1)[1])


# --- the fault: a web page of another origin steers the service ----------------------


@work
def held(gate):
    wait_until(lambda: os.path.exists(gate), "the gate", timeout=120)
    return 1


def test_a_cross_origin_text_plain_post_cancels_no_job_of_a_running_workflow(tmp_path):
    # The reported attack: a page on another origin posts text/plain (no CORS preflight)
    # to the cancel endpoint of the loopback service, with or without the token.
    gate = tmp_path / "gate"
    wf = Workflow(name="exposed", max_workers=2).open()
    try:
        jobs = held.map([{"gate": str(gate)}] * 2)
        token = json.loads((wf.work_dir / "connection.json").read_text())["token"]
        cancel = f"{wf.service_url}/api/workflows/{wf.id[:8]}/cancel"
        forged = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        assert requests.post(cancel, data="x", headers=forged, timeout=30).status_code == 403
        refused = requests.post(cancel, data="x", headers=_auth(token, **forged), timeout=30)
        assert refused.status_code == 403
        # Without an Origin header (not a browser) the token is still needed.
        plain = {"Content-Type": "text/plain"}
        assert requests.post(cancel, data="x", headers=plain, timeout=30).status_code == 401
        assert not any(f.done() for f in jobs.futures)
        gate.touch()
        assert jobs.results(timeout=60) == [1, 1]
    finally:
        gate.touch()
        wf.close(cancel=True)


def test_an_embedded_service_given_no_token_makes_a_strong_one_and_requires_it(tmp_path):
    with EmbeddedService(tmp_path, token=None) as service:
        assert check_token(service.token) == service.token
        url = service.url + "/cache/" + "a" * 64
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, headers=_auth(service.token), timeout=10).status_code == 404


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/healthz"),
        ("GET", "/api/workflows"),
        ("POST", "/api/workflows/wf/cancel"),
        ("GET", "/cache/" + "a" * 64),
        ("PUT", "/cache/" + "a" * 64),
        ("GET", "/results/wf1"),
    ],
)
def test_a_foreign_host_header_gets_421_on_every_route(service, steered, method, path):
    # DNS rebinding: the page's own name now points at 127.0.0.1; the browser sends
    # that name as Host and the page's origin as Origin, so the two agree.
    port = _port(service)
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    response = requests.request(method, service.url + path, headers=_auth(**rebound), timeout=10)
    assert response.status_code == 421
    assert TOKEN not in response.text
    assert steered.calls == 0


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}", "127.0.0.2:{port}"]
)
def test_loopback_host_headers_are_answered(service, host):
    headers = _auth(Host=host.format(port=_port(service)))
    response = requests.get(service.url + "/api/workflows", headers=headers, timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a file:// page
        {"Origin": "http://127.0.0.1:1"},  # another service on this machine
        {"Origin": "http://localhost:{port}"},  # same port, another host name: another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_a_state_changing_request_from_another_origin_gets_403(service, steered, headers):
    shown = {k: v.format(port=_port(service)) for k, v in headers.items()}
    response = requests.post(
        service.url + "/api/workflows/wf/cancel", headers=_auth(**shown), timeout=10
    )
    assert response.status_code == 403
    assert steered.calls == 0
    key = "b" * 64
    put = requests.put(f"{service.url}/cache/{key}", b"x", headers=_auth(**shown), timeout=10)
    assert put.status_code == 403


def test_api_reads_from_another_origin_get_403_but_cache_reads_need_only_the_token(service):
    foreign = _auth(Origin="http://evil.example")
    assert (
        requests.get(service.url + "/api/workflows", headers=foreign, timeout=10).status_code == 403
    )
    # GETs outside /api change nothing and browsers cannot read the answer cross-origin.
    cache = requests.get(service.url + "/cache/" + "a" * 64, headers=foreign, timeout=10)
    assert cache.status_code == 404


def test_the_pages_own_requests_pass(service, steered):
    own = _auth(Origin=service.url, **{"Sec-Fetch-Site": "same-origin"})
    response = requests.post(service.url + "/api/workflows/wf/cancel", headers=own, timeout=10)
    assert response.status_code == 200
    assert steered.calls == 1
    assert requests.post(service.url + "/api/workflows/wf/cancel", timeout=10).status_code == 401
    assert steered.calls == 1


# --- idds-fat serve: a strong token always, the names it answers to --------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0", "example.org"])
@pytest.mark.parametrize(
    "token",
    [None, "", "x", "s3cret", "a" * 40, TOKEN[: MIN_TOKEN_CHARS - 1]],
    ids=["none", "empty", "one-char", "word", "one-char-repeated", "one-short"],  # stable for xdist
)
def test_serve_refuses_a_missing_or_weak_token_and_says_the_rule(tmp_path, host, token):
    with pytest.raises(ServiceError) as refused:
        serve(host, 8470, tmp_path, token=token, result_ttl_seconds=60)
    message = str(refused.value)
    assert f"at least {MIN_TOKEN_CHARS} characters" in message
    assert "idds-fat token" in message
    if token and len(token) > 6:  # a short one may well be a word of the message
        assert token not in message


def test_idds_fat_token_prints_a_new_token_that_serve_accepts():
    made = [CliRunner().invoke(main, ["token"]) for _ in range(2)]
    assert all(m.exit_code == 0 for m in made)
    tokens = [m.output.strip() for m in made]
    assert tokens[0] != tokens[1]
    assert [check_token(t) for t in tokens] == tokens
    assert len(tokens[0]) >= MIN_TOKEN_CHARS


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``idds-fat serve`` on loopback, told it is also reached as ``head.example``."""
    port = free_port()
    env = {**os.environ, "IDDS_FAT_TOKEN": TOKEN}
    argv = [sys.executable, "-c", "from idds_fat.cli import main; main()", "serve"]
    argv += ["--port", str(port)]
    argv += ["--data-dir", str(tmp_path / "data"), "--public-host", "head.example"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                return requests.get(url + "/healthz", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_until(answers, "idds-fat serve to answer", timeout=60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()


def test_serve_answers_its_public_name_and_refuses_others(served):
    port = served.rsplit(":", 1)[1]
    api = served + "/api/workflows"
    for host in (f"head.example:{port}", f"HEAD.example:{port}", f"127.0.0.1:{port}"):
        assert requests.get(api, headers=_auth(Host=host), timeout=10).status_code == 200
    for host in (f"evil.example:{port}", f"10.1.2.3:{port}"):
        assert requests.get(api, headers=_auth(Host=host), timeout=10).status_code == 421
    assert requests.get(api, timeout=10).status_code == 401


# --- the rules themselves ---------------------------------------------------------------


def test_a_listener_beyond_loopback_answers_addresses_and_its_names_only():
    policy = HostPolicy.for_listener("0.0.0.0", ["http://head.example:8470/"])
    assert policy.allows("head.example:8470")
    assert policy.allows("10.1.2.3:8470") and policy.allows("[2001:db8::1]:8470")
    assert not policy.allows("evil.example:8470")
    assert not policy.allows(None) and not policy.allows("")
    loopback = HostPolicy.for_listener("127.0.0.1")
    assert loopback.allows("[::1]:80") and loopback.allows("localhost")
    assert not loopback.allows("10.1.2.3:8470")
    assert not loopback.allows("localhost.evil.example")


def test_host_headers_and_origins_are_parsed_as_browsers_send_them():
    assert split_host("[::1]:8470") == ("::1", 8470)
    assert split_host("Example.ORG.") == ("example.org", None)
    assert split_host("::1") == ("::1", None)
    with pytest.raises(ValueError):
        split_host("host:port")
    assert same_origin("http://127.0.0.1:8470", "127.0.0.1:8470")
    assert same_origin("https://head.example", "head.example")
    assert not same_origin("http://127.0.0.1:8471", "127.0.0.1:8470")
    assert not same_origin("null", "127.0.0.1:8470")
    assert not same_origin("ftp://127.0.0.1:8470", "127.0.0.1:8470")


# --- in a real browser: the attack of the report, and the token from a link -------------


def test_in_a_browser_a_foreign_form_post_is_refused_and_a_token_link_signs_in(
    browser_page, tmp_path
):
    from playwright.sync_api import expect

    page = browser_page
    gate = tmp_path / "gate"
    wf = Workflow(name="browsed", max_workers=2).open()
    try:
        jobs = held.map([{"gate": str(gate)}] * 2)
        token = json.loads((wf.work_dir / "connection.json").read_text())["token"]
        # A page of another origin posts a text/plain form (no CORS preflight) at the
        # cancel endpoint, as the report's attack did.
        attack = (
            f'<form method="POST" enctype="text/plain" '
            f'action="{wf.service_url}/api/workflows/{wf.id[:8]}/cancel">'
            '<input name="x" value="y"></form><script>document.forms[0].submit()</script>'
        )
        page.route(
            "http://evil.example/",
            lambda route: route.fulfill(body=attack, content_type="text/html"),
        )
        page.goto("http://evil.example/")
        page.wait_for_url(f"{wf.service_url}/**")
        expect(page.locator("body")).to_contain_text("cross-origin request refused")
        assert not any(f.done() for f in jobs.futures)

        # The link wf.monitor_url gives carries the token in its fragment: the page
        # takes it, shows the data, and drops it from the address bar.
        assert wf.monitor_url.endswith(f"#token={token}")
        page.goto(wf.monitor_url)
        expect(page.locator('#tasks tr[data-key="t0001"]')).to_have_count(1)
        expect(page.locator("#token-form")).to_be_hidden()
        assert "#" not in page.url and token not in page.url
        gate.touch()
        assert jobs.results(timeout=60) == [1, 1]
    finally:
        gate.touch()
        wf.close(cancel=True)
