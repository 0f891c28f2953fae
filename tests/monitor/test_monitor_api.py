"""The monitoring API: the data the page shows, behind the service token, and cancel."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from click.testing import CliRunner

from idds_fat import MapResult, Workflow, work
from idds_fat.cli import main
from idds_fat.results.display import arguments_repr
from idds_fat.testing import wait_until
from idds_fat.workflow import catalog


@work
def score(x):
    return (x - 3) ** 2


@work
def held(gate, i):
    print(f"job {i} waits for the gate", file=sys.stderr, flush=True)
    wait_until(lambda: os.path.exists(gate), "the gate", timeout=120)
    return i


@work
def fails(x):
    print("about to fail <b>", file=sys.stderr, flush=True)
    raise ValueError(f"no good: <script>{x}</script>")


@dataclass
class Running:
    wf: Workflow
    token: str
    scores: MapResult
    waiting: MapResult

    def url(self, path: str) -> str:
        return self.wf.service_url + path

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return requests.get(self.url(path), headers=headers, timeout=30)

    def post(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return requests.post(self.url(path), headers=headers, timeout=60)


def _states(running: Running, task: str) -> dict[str, int]:
    answer = running.get(f"/api/workflows/{running.wf.id}").json()
    return {t["id"]: t["job_states"] for t in answer["tasks"]}[task]


@pytest.fixture
def running(tmp_path) -> Iterator[Running]:
    """A workflow with a finished task (t0001) and two jobs held by a gate (t0002)."""
    gate = tmp_path / "gate"
    wf = Workflow(name="monitor <api>", max_workers=3).open()
    try:
        scores = score.map([{"x": x} for x in range(4)])
        scores.wait(timeout=60)
        waiting = held.map([{"gate": str(gate), "i": i} for i in range(2)])
        token = json.loads((wf.work_dir / "connection.json").read_text())["token"]
        found = Running(wf, token, scores, waiting)
        wait_until(lambda: _states(found, "t0002").get("running") == 2, "both held jobs to run")
        yield found
    finally:
        gate.touch()
        wf.close(cancel=True)


def test_api_and_cancel_refuse_a_missing_or_wrong_token(running):
    wf = running.wf
    for path in ("/api/workflows", f"/api/workflows/{wf.id}"):
        assert requests.get(running.url(path), timeout=30).status_code == 401
        assert running.get(path, token="wrong").status_code == 401
    cancel = f"/api/workflows/{wf.id}/tasks/t0002/cancel"
    assert requests.post(running.url(cancel), timeout=30).status_code == 401
    assert running.post(cancel, token="wrong").status_code == 401
    assert running.post(f"/api/workflows/{wf.id}/cancel", token="wrong").status_code == 401
    # Nothing was cancelled: the held jobs still run.
    assert not any(f.done() for f in running.waiting.futures)
    assert _states(running, "t0002") == {"running": 2}


def test_workflow_api_shares_the_status_json_shape(running):
    wf = running.wf
    answer = running.get(f"/api/workflows/{wf.id}").json()
    shown = CliRunner().invoke(main, ["status", wf.id, "--json"])
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.output)
    assert {k: v for k, v in answer["workflow"].items() if k != "user"} == status["workflow"]
    assert [{k: v for k, v in t.items() if k != "values"} for t in answer["tasks"]] == status[
        "tasks"
    ]
    listing = running.get("/api/workflows").json()
    assert [w["id"] for w in listing["workflows"]] == [wf.id]
    assert listing["workflows"][0]["name"] == "monitor <api>"
    assert listing["workflows"][0]["job_states"] == {"done": 4, "running": 2}


def test_task_values_and_timeline_come_from_the_record(running):
    answer = running.get(f"/api/workflows/{running.wf.id}").json()
    by_id = {t["id"]: t for t in answer["tasks"]}
    assert by_id["t0001"]["values"] == {"count": 4, "min": 0.0, "max": 9.0}
    assert by_id["t0002"]["values"] is None
    jobs = {(j["task"], j["job"]): j for j in answer["timeline"]["jobs"]}
    assert answer["timeline"]["total"] == 6 and len(jobs) == 6
    done = jobs[("t0001", 2)]
    assert done["status"] == "done" and done["value"] == 1.0
    assert done["queued"] <= done["ended"]
    assert done["started"] is None or done["queued"] <= done["started"] <= done["ended"]
    waiting = jobs[("t0002", 0)]
    assert waiting["status"] == "running" and waiting["ended"] is None
    assert waiting["started"] >= waiting["queued"]


def test_a_failed_job_shows_its_remote_traceback_and_stderr_tail(running):
    failed = fails.map([{"x": 1}])
    with pytest.raises(ValueError):
        failed.results(timeout=60)
    wf = running.wf
    job = wait_until(
        lambda: (
            (j := running.get(f"/api/workflows/{wf.id}/tasks/t0003/jobs/0").json())["error"] and j
        ),
        "the failure to be recorded",
    )
    assert job["status"] == "failed"
    assert "Traceback" in job["error"] and "in fails" in job["error"]
    assert "ValueError: no good: <script>1</script>" in job["error"]
    assert "about to fail <b>" in job["stderr_tail"]

    # A running job's stderr tail grows as it runs: wait for the line, not for luck.
    def held_job_said_it_waits() -> dict | bool:
        record = running.get(f"/api/workflows/{wf.id}/tasks/t0002/jobs/1").json()
        return "job 1 waits for the gate" in (record["stderr_tail"] or "") and record

    waiting = wait_until(held_job_said_it_waits, "job 1's stderr line to show")
    assert waiting["error"] is None


def test_cancel_a_task_cancels_its_running_jobs_and_nothing_else(running):
    wf = running.wf
    answer = running.post(f"/api/workflows/{wf.id[:-2]}/tasks/held/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"workflow": wf.id, "task": "t0002", "cancelled": 2}
    assert all(f.cancelled() for f in running.waiting.futures)
    wait_until(lambda: _states(running, "t0002") == {"cancelled": 2}, "the record to say cancelled")
    assert _states(running, "t0001") == {"done": 4}
    again = running.post(f"/api/workflows/{wf.id}/cancel").json()
    assert again["cancelled"] == 0


def test_unknown_workflow_task_or_job_is_a_404_naming_it(running):
    wf = running.wf
    missing = running.get("/api/workflows/nope")
    assert missing.status_code == 404 and "no workflow 'nope'" in missing.json()["error"]
    no_task = running.post(f"/api/workflows/{wf.id}/tasks/t0099/cancel")
    assert no_task.status_code == 404 and "t0099" in no_task.json()["error"]
    no_job = running.get(f"/api/workflows/{wf.id}/tasks/t0001/jobs/7")
    assert no_job.status_code == 404 and "no job 7" in no_job.json()["error"]


def test_pages_escape_the_workflow_id_and_load_only_their_own_files(running):
    hostile = "/workflows/%3Cimg%20src%3Dx%20onerror%3D%22alert(1)%22%3E"
    page = requests.get(running.url(hostile), timeout=30)
    assert page.status_code == 200
    assert "<img" not in page.text and 'onerror="' not in page.text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    index = requests.get(running.url("/"), timeout=30)
    assert index.status_code == 200 and 'data-page="index"' in index.text
    assert running.token not in index.text and running.token not in page.text
    for name, kind in (("monitor.js", "javascript"), ("monitor.css", "text/css")):
        static = requests.get(running.url("/static/" + name), timeout=30)
        assert static.status_code == 200 and kind in static.headers["content-type"]
        assert "http://" not in static.text.replace("http://www.w3.org/2000/svg", "")


def test_summary_updated_moves_with_its_jobs_and_a_finished_timeline_ends_at_its_end(
    isolated_settings,
):
    from idds_fat.monitor import views

    gate = isolated_settings.parent / "gate-updated"
    with Workflow(name="moving", max_workers=2) as wf:
        waiting = held.map([{"gate": str(gate), "i": 0}])
        wait_until(lambda: waiting.futures[0].running(), "the job to start")
        before = views.workflow_view(isolated_settings, wf.id)
        assert before["timeline"]["end"] == before["now"]  # running: its timeline reaches now
        started = catalog.workflow_summary(isolated_settings, wf.id).updated
        gate.touch()
        waiting.wait(timeout=60)
        # The job's end is recorded by a thread of the caller just after the future settles.
        wait_until(
            lambda: catalog.workflow_summary(isolated_settings, wf.id).updated > started,
            "the summary's updated to move",
        )
        wait_until(
            lambda: views.workflow_view(isolated_settings, wf.id)["timeline"]["jobs"][0]["ended"],
            "the job's end to be recorded",
        )
        moved = views.workflow_view(isolated_settings, wf.id)
        job = moved["timeline"]["jobs"][0]
        # As the caller wrote it: a long path is shortened (under xdist the path is longer).
        assert job["arguments"] == arguments_repr(kwargs={"gate": str(gate), "i": 0})
    after = views.workflow_view(isolated_settings, wf.id)
    summary = after["workflow"]
    assert summary["status"] == "finished" and summary["ended"] is not None
    ended = catalog.workflow_summary(isolated_settings, wf.id).ended
    assert after["timeline"]["end"] == ended < after["now"]
    assert ended >= after["timeline"]["jobs"][0]["ended"]
