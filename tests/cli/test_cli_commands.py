"""The idds-fat commands against real workflows run in the test's own work dir."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from idds_fat import Workflow, __version__
from idds_fat.cli import main

needs_attach = pytest.mark.skipif(
    not hasattr(Workflow, "attach"), reason="Workflow.attach is not in this runtime yet"
)


def shout(word):
    print(f"job says {word}")
    print(f"job warns {word}", file=sys.stderr)
    return word.upper()


def broken():
    raise ValueError("broken on purpose")


def run(*args: str):
    """Run ``idds-fat ARGS`` in-process; return click's result."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def finished_workflow():
    """A closed workflow: task t0001 shout x3 (done), task t0002 broken x1 (failed)."""
    with Workflow(name="cli-test") as wf:
        words = wf.map_kwargs(shout, [{"word": w} for w in ("alpha", "beta", "gamma")])
        failure = wf.submit(broken)
    assert words.results() == ["ALPHA", "BETA", "GAMMA"]
    assert isinstance(failure.exception(), ValueError)
    return wf


# --- status --------------------------------------------------------------------------


def test_status_lists_workflows_newest_first_as_table_and_json(finished_workflow):
    with Workflow(name="second") as newer:
        newer.submit(shout, "x").result()

    table = run("status")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "STATUS", "CREATED"]
    assert lines[1].startswith(newer.id) and lines[2].startswith(finished_workflow.id)
    assert "done 3, failed 1" in lines[2]

    listed = json.loads(run("status", "--json").output)
    assert [w["id"] for w in listed["workflows"]] == [newer.id, finished_workflow.id]
    older = listed["workflows"][1]
    assert older["name"] == "cli-test" and older["status"] == "failed"
    assert older["tasks"] == 2 and older["jobs"] == 4
    assert older["job_states"] == {"done": 3, "failed": 1}
    assert older["backend"] == "local"


def test_status_with_no_workflows_says_where_it_looked(isolated_settings):
    result = run("status")
    assert result.exit_code == 0
    assert f"no workflows in {isolated_settings / 'workflows'}" in result.output
    assert json.loads(run("status", "--json").output)["workflows"] == []


def test_status_of_a_workflow_shows_its_tasks_with_counts_by_state(finished_workflow):
    result = run("status", finished_workflow.id)
    assert result.exit_code == 0, result.output
    header, _, tasks = result.output.partition("\n\n")
    assert f"workflow  {finished_workflow.id} (cli-test)" in header
    rows = [line.split() for line in tasks.splitlines()]
    assert rows[0] == ["TASK", "NAME", "FUNCTION", "JOBS", "DONE", "FAILED"]
    assert rows[1] == ["t0001", "shout", "shout", "3", "3", "0"]
    assert rows[2] == ["t0002", "broken", "broken", "1", "0", "1"]

    shown = json.loads(run("status", finished_workflow.id, "--json").output)
    assert shown["workflow"]["id"] == finished_workflow.id
    assert [(t["id"], t["jobs"], t["job_states"]) for t in shown["tasks"]] == [
        ("t0001", 3, {"done": 3}),
        ("t0002", 1, {"failed": 1}),
    ]


def test_status_accepts_a_unique_id_prefix(finished_workflow):
    result = run("status", finished_workflow.id[:-3], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["workflow"]["id"] == finished_workflow.id


def test_status_of_a_task_lists_its_jobs_by_name_or_id(finished_workflow):
    by_name = json.loads(run("status", finished_workflow.id, "shout", "--json").output)
    assert by_name["task"]["id"] == "t0001" and by_name["task"]["job_states"] == {"done": 3}
    assert [(j["job"], j["status"]) for j in by_name["jobs"]] == [
        (0, "done"),
        (1, "done"),
        (2, "done"),
    ]
    table = run("status", finished_workflow.id, "t0002")
    assert table.exit_code == 0
    assert table.output.splitlines()[-1].split()[:4] == ["t0002", "0", "broken[0]", "failed"]


def test_unknown_workflow_is_a_clear_error_naming_it_and_the_work_dir(
    finished_workflow, isolated_settings
):
    for command in (
        ["status", "no-such-flow"],
        ["logs", "no-such-flow", "t0001", "0"],
        ["results", "no-such-flow"],
        ["cancel", "no-such-flow"],
    ):
        result = run(*command)
        assert result.exit_code == 1, command
        assert "no workflow 'no-such-flow'" in result.stderr
        assert str(isolated_settings / "workflows") in result.stderr
        assert "Traceback" not in result.output


def test_ambiguous_prefix_names_the_candidates(finished_workflow):
    with Workflow(name="cli-test") as other:
        pass
    result = run("status", "cli-test")
    assert result.exit_code == 1
    assert "ambiguous" in result.stderr
    assert finished_workflow.id in result.stderr and other.id in result.stderr


def test_unknown_task_lists_the_tasks_there_are(finished_workflow):
    result = run("status", finished_workflow.id, "t0099")
    assert result.exit_code == 1
    assert "no task 't0099'" in result.stderr
    assert "t0001 (shout), t0002 (broken)" in result.stderr


# --- logs ----------------------------------------------------------------------------


def test_logs_print_what_the_job_printed(finished_workflow):
    result = run("logs", finished_workflow.id, "t0001", "1")
    assert result.exit_code == 0, result.output
    assert result.output == "job says beta\n"
    stderr = run("logs", finished_workflow.id, "shout", "2", "--stderr")
    assert stderr.output == "job warns gamma\n"


def test_logs_tail_and_json(finished_workflow, tmp_path):
    log = json.loads(run("logs", finished_workflow.id, "t0001", "0", "--json").output)
    assert log["text"] == "job says alpha\n"
    assert log["stream"] == "stdout" and log["status"] == "done"
    assert log["path"].endswith(os.path.join("t0001", "0", "stdout.txt"))
    assert run("logs", finished_workflow.id, "t0001", "0", "--tail", "0").output == ""


def test_logs_of_a_job_that_does_not_exist_names_the_range(finished_workflow):
    result = run("logs", finished_workflow.id, "t0001", "7")
    assert result.exit_code == 1
    assert "task t0001 has no job 7; its jobs are 0 to 2" in result.stderr


# --- config show ---------------------------------------------------------------------


def test_config_show_masks_the_token_and_says_where_values_come_from(monkeypatch, tmp_path):
    config_file = tmp_path / "config.toml"
    config_file.write_text('publish_timeout = 42.0\ntoken = "file-secret-token"\n')
    monkeypatch.setenv("IDDS_FAT_CONFIG", str(config_file))
    monkeypatch.setenv("IDDS_FAT_TOKEN", "env-secret-token")
    monkeypatch.setenv("IDDS_FAT_MAX_WORKERS", "3")

    table = run("config", "show")
    assert table.exit_code == 0, table.output
    assert "secret-token" not in table.output
    assert f"config file: {config_file}" in table.output
    rows = {line.split()[0]: line.split()[1:] for line in table.output.splitlines()[3:]}
    assert rows["token"] == ["********", "env"]
    assert rows["max_workers"] == ["3", "env"]
    assert rows["publish_timeout"] == ["42.0", "file"]
    assert rows["backend"] == ["local", "default"]
    assert rows["broker_password"] == ["-", "default"]

    shown = json.loads(run("config", "show", "--json").output)
    assert "secret-token" not in json.dumps(shown)
    assert shown["config_file"] == str(config_file) and shown["config_file_exists"]
    assert shown["settings"]["max_workers"] == {"value": 3, "source": "env"}
    assert shown["settings"]["token"] == {"value": "********", "source": "env"}
    assert shown["settings"]["broker_password"] == {"value": None, "source": "default"}


def test_config_show_reports_a_bad_setting_in_one_line(monkeypatch):
    monkeypatch.setenv("IDDS_FAT_MAX_WORKERS", "many")
    result = run("config", "show")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: max_workers = 'many' from $IDDS_FAT_MAX_WORKERS")


# --- smoke ---------------------------------------------------------------------------


def test_smoke_passes_on_the_local_backend():
    result = run("smoke", "--timeout", "120")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("smoke ok: backend local, channels rest, 5 jobs, ")
    assert len(result.output.splitlines()) == 1


def test_smoke_json_reports_each_run():
    report = json.loads(run("smoke", "--json").output)
    assert report["ok"] is True and report["jobs"] == 5
    (rest,) = report["runs"]
    assert rest["channel"] == "rest" and rest["stats"]["rest"] == 5
    listed = json.loads(run("status", rest["workflow_id"], "--json").output)
    assert listed["workflow"]["name"] == "smoke"


def test_smoke_fails_in_one_line_when_jobs_cannot_run(monkeypatch):
    monkeypatch.setenv("IDDS_FAT_PYTHON", "/bin/false")  # every job exits 1 at once
    result = run("smoke")
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("smoke failed: job square[0] of workflow smoke-")
    assert "JobLostError" in line and "exit status 1" in line
    # Named, and never a log that is not there: a warm worker's stderr is its own log.
    assert "the interpreter /bin/false exited before the job started" in line
    assert "stderr.txt" not in line
    assert re.search(r"\(stderr: \S+/workers/worker-\d+\.log\)$", line)


def test_smoke_fails_in_one_line_on_a_bad_configuration(monkeypatch):
    monkeypatch.setenv("IDDS_FAT_BACKEND", "no-such-backend")
    result = run("smoke", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["reason"].startswith(
        "ConfigError: backend = 'no-such-backend' from $IDDS_FAT_BACKEND: expected one of"
    )


def test_smoke_fails_in_one_line_when_time_runs_out():
    result = run("smoke", "--timeout", "0.001")  # far less than starting one job takes
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    # How many jobs finished before the deadline depends on the machine's load.
    assert re.match(r"smoke failed: [1-5] of 5 jobs of workflow smoke-\S+ unfinished", line)
    assert line.endswith("unfinished when the time ran out (backend local, channel rest)")


def test_smoke_verbose_adds_the_traceback(monkeypatch):
    monkeypatch.setenv("IDDS_FAT_BACKEND", "no-such-backend")
    result = run("smoke", "--verbose")
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("smoke failed: ConfigError")


def test_smoke_runs_over_stomp_then_rest_when_a_broker_is_configured(activemq, monkeypatch):
    monkeypatch.setenv("IDDS_FAT_BROKER", activemq.url)
    monkeypatch.setenv("IDDS_FAT_BROKER_USER", "idds")  # the session broker's login
    monkeypatch.setenv("IDDS_FAT_BROKER_PASSWORD", "fat-secret")
    result = run("smoke", "--json")
    assert result.exit_code == 0, result.output
    stomp, rest = json.loads(result.output)["runs"]
    assert stomp["channel"] == "stomp" and stomp["stats"]["stomp"] > 0
    assert rest["channel"] == "rest"
    # A drain after a job exits may read the same REST page as the long-poll in
    # flight; dedupe absorbs that, so duplicates are not asserted here.
    stats = {k: v for k, v in rest["stats"].items() if k != "duplicates"}
    assert stats == {"received": 5, "rejected": 0, "stomp": 0, "rest": 5, "local": 0}


# --- results and cancel (they reattach with Workflow.attach) ---------------------------


@needs_attach
def test_results_prints_every_task_in_input_order(finished_workflow):
    result = run("results", finished_workflow.id[:-2])
    assert result.exit_code == 0, result.output
    rows = [line.split(None, 5) for line in result.output.splitlines()]
    assert rows[0] == ["TASK", "NAME", "JOB", "KWARGS", "STATUS", "RESULT"]
    assert rows[1] == ["t0001", "shout", "0", "word='alpha'", "ok", "'ALPHA'"]
    assert rows[3] == ["t0001", "shout", "2", "word='gamma'", "ok", "'GAMMA'"]
    assert rows[4] == ["t0002", "broken", "0", "-", "error", "ValueError: broken on purpose"]


@needs_attach
def test_results_json_of_one_task(finished_workflow):
    result = run("results", finished_workflow.id, "--task", "shout", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["workflow"] == finished_workflow.id
    (task,) = shown["tasks"]
    assert (task["id"], task["name"]) == ("t0001", "shout")
    assert [(r["job"], r["kwargs"], r["status"], r["value"]) for r in task["results"]] == [
        (0, {"word": "alpha"}, "ok", "ALPHA"),
        (1, {"word": "beta"}, "ok", "BETA"),
        (2, {"word": "gamma"}, "ok", "GAMMA"),
    ]


@pytest.fixture
def orphaned_workflow(tmp_path):
    """A workflow whose caller was killed: t0001 done, t0002's two jobs running, blocked.

    The caller is killed once both blocked jobs have started. Yields the workflow
    id; opening the gate at teardown releases any job left over.
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

            # A short publish_timeout: a job left over gives up soon once released.
            with Workflow(name="orphan", max_workers=4, publish_timeout=5) as wf:
                wf.map_kwargs(quick, [{{"i": 0}}]).wait()
                pending = wf.map_kwargs(blocked, [{{"i": 1}}, {{"i": 2}}])
                started = [os.path.join({str(tmp_path)!r}, f"started-{{i}}") for i in (1, 2)]
                wait_until(lambda: all(map(os.path.exists, started)), "both blocked jobs to start")
                print("ID", wf.id, flush=True)
                pending.wait()
            """
        )
    )
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = caller.stdout.readline()
        assert line.startswith("ID "), caller.stderr.read()
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=30)
        yield line.split()[1]
    finally:
        gate.touch()
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=30)
        caller.stdout.close()
        caller.stderr.close()


@needs_attach
def test_cancel_one_task_counts_its_unfinished_jobs(orphaned_workflow):
    result = run("cancel", orphaned_workflow, "t0002")
    assert result.exit_code == 0, result.output
    assert result.output == f"cancelled 2 jobs of task t0002 of workflow {orphaned_workflow}\n"
    shown = json.loads(run("status", orphaned_workflow, "--json").output)
    assert [t["job_states"] for t in shown["tasks"]] == [{"done": 1}, {"cancelled": 2}]


@needs_attach
def test_cancel_a_workflow_leaves_its_finished_jobs_alone(orphaned_workflow):
    result = run("cancel", orphaned_workflow[:-2], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "workflow": orphaned_workflow,
        "task": None,
        "cancelled": 2,
    }
    shown = json.loads(run("status", orphaned_workflow, "--json").output)
    assert shown["workflow"]["job_states"] == {"cancelled": 2, "done": 1}
    assert shown["workflow"]["status"] == "cancelled"

    again = run("cancel", orphaned_workflow)
    assert again.output == f"cancelled 0 jobs of workflow {orphaned_workflow}\n"


@needs_attach
def test_results_with_a_timeout_shows_pending_jobs_and_leaves_them_running(orphaned_workflow):
    result = run("results", orphaned_workflow, "--timeout", "0", "--json")
    assert result.exit_code == 1
    (first, second) = json.loads(result.stdout)["tasks"]
    assert [r["status"] for r in first["results"]] == ["ok"]
    assert [r["status"] for r in second["results"]] == ["pending", "pending"]
    assert "2 of 3 jobs of workflow" in result.stderr and "still running" in result.stderr
    shown = json.loads(run("status", orphaned_workflow, "--json").output)
    assert shown["workflow"]["job_states"] == {"running": 2, "done": 1}


def _recorded_times(wf: Workflow) -> tuple[list, list]:
    db = sqlite3.connect(f"file:{wf.work_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        jobs = db.execute(
            "SELECT task, job, status, started, ended, updated FROM jobs ORDER BY task, job"
        ).fetchall()
        workflow = db.execute("SELECT status, created, updated FROM workflow").fetchall()
    finally:
        db.close()
    return jobs, workflow


@needs_attach
def test_reading_results_never_changes_what_was_recorded(finished_workflow):
    before = _recorded_times(finished_workflow)
    assert [job[2] for job in before[0]] == ["done", "done", "done", "failed"]
    assert all(job[4] is not None for job in before[0])  # every job has its end
    for _ in range(2):
        result = run("results", finished_workflow.id)
        assert result.exit_code == 0, result.output
        assert _recorded_times(finished_workflow) == before


def test_version_and_short_help():
    version = run("--version")
    assert version.exit_code == 0 and version.output.strip() == f"idds-fat, version {__version__}"
    for args in (["-h"], ["status", "-h"], ["logs", "-h"]):
        shown = run(*args)
        assert shown.exit_code == 0 and shown.output.startswith("Usage: "), args
        assert "-h, --help" in shown.output


def test_logs_stderr_of_a_job_that_raised_ends_with_its_traceback(finished_workflow):
    result = run("logs", finished_workflow.id, "broken", "0", "--stderr")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "raised" in lines[0] and "t0002/0" in lines[0]
    assert "Traceback (most recent call last)" in result.output
    assert 'raise ValueError("broken on purpose")' in result.output  # the job's own source line
    assert lines[-1] == "ValueError: broken on purpose"
    assert run("logs", finished_workflow.id, "broken", "0", "--stderr", "--tail", "1").output == (
        "ValueError: broken on purpose\n"
    )


def test_smoke_names_a_refused_stomp_login(activemq, monkeypatch):
    monkeypatch.setenv("IDDS_FAT_BROKER", activemq.url)
    monkeypatch.setenv("IDDS_FAT_BROKER_USER", "idds")
    monkeypatch.setenv("IDDS_FAT_BROKER_PASSWORD", "not-the-password")
    result = run("smoke", "--timeout", "120")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("smoke failed: no result of workflow")
    assert "the broker refused the login of user 'idds'" in line, line
    assert "not-the-password" not in line  # a secret never shows
