"""The monitoring page on a service of its own (as `idds-fat serve` runs it) and the CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import requests
from click.testing import CliRunner

from idds_fat import Workflow
from idds_fat.cli import main
from idds_fat.monitor import monitor_routes
from idds_fat.service import EmbeddedService
from idds_fat.testing import wait_until
from idds_fat.testing.processes import free_port
from idds_fat.workflow import WorkflowState, catalog

TOKEN = "monitor-service-token"


@pytest.fixture
def service(tmp_path, isolated_settings) -> Iterator[EmbeddedService]:
    """A service whose data lives apart from the work dir it monitors, like `idds-fat serve`."""

    def page(guarded):
        return monitor_routes(isolated_settings, guarded, Workflow.attach)

    with EmbeddedService(tmp_path / "service", TOKEN, routes=page) as running:
        yield running


def _api(service: EmbeddedService, path: str, method: str = "GET") -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return requests.request(method, service.url + path, headers=headers, timeout=120)


@pytest.fixture
def caller(tmp_path):
    """A caller process running a workflow: t0001 done, t0002's two jobs blocked on a gate.

    Yields ``(process, workflow_id)``; the gate opens at teardown.
    """
    gate = tmp_path / "gate"
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from idds_fat import Workflow
            from idds_fat.testing import wait_until

            def quick(i):
                return i

            def blocked(i):
                open(os.path.join({str(tmp_path)!r}, f"started-{{i}}"), "w").close()
                wait_until(lambda: os.path.exists({str(gate)!r}), "the gate", timeout=120)
                return i

            with Workflow(name="elsewhere", max_workers=4, publish_timeout=5) as wf:
                wf.map_kwargs(quick, [{{"i": 0}}]).wait()
                pending = wf.map_kwargs(blocked, [{{"i": 1}}, {{"i": 2}}])
                started = [os.path.join({str(tmp_path)!r}, f"started-{{i}}") for i in (1, 2)]
                wait_until(lambda: all(map(os.path.exists, started)), "both blocked jobs to start")
                print("ID", wf.id, flush=True)
                pending.wait()
            """
        )
    )
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("ID "), process.stderr.read()
        yield process, line.split()[1]
    finally:
        gate.touch()
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()


def test_cancel_is_refused_while_another_process_follows_and_done_once_it_died(service, caller):
    process, workflow_id = caller
    listed = _api(service, "/api/workflows").json()["workflows"]
    assert [(w["id"], w["name"]) for w in listed] == [(workflow_id, "elsewhere")]

    refused = _api(service, f"/api/workflows/{workflow_id}/tasks/t0002/cancel", "POST")
    assert refused.status_code == 409
    assert f"followed by process {process.pid}" in refused.json()["error"]

    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    done = _api(service, f"/api/workflows/{workflow_id}/tasks/t0002/cancel", "POST")
    assert done.status_code == 200, done.text
    assert done.json() == {"workflow": workflow_id, "task": "t0002", "cancelled": 2}
    tasks = _api(service, f"/api/workflows/{workflow_id}").json()["tasks"]
    assert [t["job_states"] for t in tasks] == [{"done": 1}, {"cancelled": 2}]


def test_monitor_command_prints_the_page_and_the_token_only_when_asked(caller):
    _, workflow_id = caller
    plain = CliRunner().invoke(main, ["monitor"])
    assert plain.exit_code == 0, plain.output
    (url,) = plain.output.splitlines()
    assert url.startswith("http://127.0.0.1:") and url.endswith(f"/workflows/{workflow_id}")
    shown = CliRunner().invoke(main, ["monitor", workflow_id[:-2], "--show-token", "--json"])
    answer = json.loads(shown.output)
    assert answer["url"] == url and answer["service_running"] is True
    page = requests.get(url, timeout=30)
    assert page.status_code == 200 and answer["token"] not in page.text
    api = url.replace("/workflows/", "/api/workflows/")
    assert requests.get(api, timeout=30).status_code == 401
    headers = {"Authorization": f"Bearer {answer['token']}"}
    assert requests.get(api, headers=headers, timeout=30).json()["workflow"]["id"] == workflow_id


def test_records_written_before_timings_were_kept_still_read(isolated_settings):
    workflow_dir = isolated_settings / "workflows" / "old-1"
    workflow_dir.mkdir(parents=True)
    path = workflow_dir / catalog.STATE_FILE
    state = WorkflowState(path)
    state.record_workflow("old-1", "old", {"backend": "local"})
    state.record_task("t0001", "f", "f", [(0, "f[0]", "spec")])
    state.set_job_status("t0001", 0, "done", 0, value=1.5)
    state.close()
    with sqlite3.connect(path) as db:  # as an older version wrote it: no later columns
        for column in ("started", "ended", "value", "error"):
            db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    (job,) = catalog.job_summaries(isolated_settings, "old-1", "t0001")
    assert (job.status, job.started, job.value, job.error) == ("done", None, None, None)
    (timing,) = catalog.job_timings(isolated_settings, "old-1")
    assert (timing.status, timing.ended, timing.value) == ("done", None, None)
    assert catalog.task_values(isolated_settings, "old-1") == {}
    # Opened for writing again, the record gains the columns.
    WorkflowState(path).close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    assert {"started", "ended", "value", "error"} <= columns


def test_the_page_keeps_working_after_the_caller_exits_when_serve_holds_the_workflow(
    tmp_path, isolated_settings
):
    token = "serve-holds-the-workflow-" + "0123456789abcdef"
    port = free_port()
    env = {**os.environ, "IDDS_FAT_TOKEN": token}
    argv = [sys.executable, "-c", "from idds_fat.cli import main; main()", "serve"]
    argv += ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    serve = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert serve.poll() is None, serve.stderr.read().decode()
            try:
                return requests.get(url + "/healthz", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_until(answers, "idds-fat serve to answer", timeout=60)
        script = textwrap.dedent(
            """
            from idds_fat import Workflow

            def negated(x):
                return -x

            with Workflow(name="held", progress=False) as wf:
                assert wf.map_kwargs(negated, [{"x": -1}, {"x": -2}]).results() == [1, 2]
                print(wf.monitor_url, flush=True)
            """
        )
        caller = subprocess.run(
            [sys.executable, "-c", script],
            env={**env, "IDDS_FAT_SERVICE_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert caller.returncode == 0, caller.stderr
        monitor_url = caller.stdout.strip()
        page, fragment = monitor_url.split("#")
        assert page.startswith(url + "/workflows/held-") and fragment == f"token={token}"
        workflow_id = page.rsplit("/", 1)[1]
        # The caller is gone; the page and its data are served by `idds-fat serve`.
        assert requests.get(page, timeout=10).status_code == 200
        headers = {"Authorization": f"Bearer {token}"}
        answer = requests.get(f"{url}/api/workflows/{workflow_id}", headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        shown = answer.json()
        assert shown["workflow"]["status"] == "finished"
        assert [t["job_states"] for t in shown["tasks"]] == [{"done": 2}]
        assert [j["arguments"] for j in shown["timeline"]["jobs"]] == ["x=-1", "x=-2"]
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        serve.stderr.close()
