"""The detached driver: ``wf.submit()`` runs the body away from the caller (issue 14).

Each test runs real processes: a caller script submits and exits at once, and
a NEW process attaches for the body's value (or its error). The body runs in
its own process (a new session on ``local``, a job on the real Slurm), and its
``@work`` calls go to the same backend from there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from idds_fat.testing.waiting import wait_until
from idds_fat.workdir import WorkDirPaths
from idds_fat.workflow.driver import Driver

PROGRAM = '''
"""An iDDS-style program: Workflow(func=...), submit(), and the caller leaves."""
import json
import os
import sys

from idds_fat import Workflow, work, workflow


@work
def square(x):
    return x * x, os.environ.get("SLURM_JOB_ID")


def body(n, mode="ok"):
    if mode == "raise":
        values = square(multi_jobs_kwargs_list=[{"x": 2}])
        raise ValueError(f"body failed after {values[0][0]}")
    if mode == "block":
        print("driver body is blocking now", file=sys.stderr, flush=True)
        open("started", "w").close()
        import threading

        threading.Event().wait()  # until the test kills this process
    values = square(multi_jobs_kwargs_list=[{"x": i} for i in range(n)])
    return {
        "squares": [v for v, _ in values],
        "job_slurm_ids": [s for _, s in values],
        "driver_pid": os.getpid(),
        "driver_slurm_id": os.environ.get("SLURM_JOB_ID"),
    }


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "decorator":  # iDDS's @workflow(local=False): returns the Workflow at once
        wf = workflow(local=False)(body)(3)
    else:
        wf = Workflow(func=body, args=(3,), kwargs={"mode": mode})
        wf.queue = os.environ.get("DRIVER_TEST_QUEUE")
        wf.submit()
    print(json.dumps({"id": wf.id, "caller_pid": os.getpid()}), flush=True)
'''

ATTACH = '''
"""A new process: attach to the workflow and wait for its body's value."""
import json
import sys

from idds_fat import Workflow

wf = Workflow.attach(sys.argv[1])
try:
    print(json.dumps({"value": wf.get_result(timeout=600)}))
except Exception as exc:
    print(json.dumps({
        "error": type(exc).__name__,
        "message": str(exc),
        "remote_traceback": str(exc.__cause__ or ""),
    }))
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "program.py").write_text(textwrap.dedent(PROGRAM))
    (directory / "attach.py").write_text(textwrap.dedent(ATTACH))
    return directory


def _run(project: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _submit_and_leave(project: Path, mode: str) -> dict:
    """The caller: submit, print the id, exit (its process is gone when this returns)."""
    return _run(project, "program.py", mode)


def _attach_for_result(project: Path, workflow_id: str) -> dict:
    return _run(project, "attach.py", workflow_id)


def _idds_fat(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from idds_fat.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def _driver(workflow_id: str) -> Driver:
    root = WorkDirPaths(Path(os.environ["IDDS_FAT_WORK_DIR"])).workflow(workflow_id).root
    driver = Driver.of(root)
    assert driver is not None
    return driver


@pytest.mark.parametrize("mode", ["ok", "decorator"])
def test_a_local_driver_outlives_its_caller_and_a_new_process_gets_the_value(project, mode):
    submitted = _submit_and_leave(project, mode)
    outcome = _attach_for_result(project, submitted["id"])
    value = outcome["value"]
    assert value["squares"] == [0, 1, 4]
    assert value["driver_pid"] != submitted["caller_pid"]  # the body ran elsewhere
    driver = _driver(submitted["id"])
    assert driver.status == "finished"
    assert driver.where["pid"] == value["driver_pid"]
    shown = _idds_fat("results", "--json", submitted["id"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["value"]["squares"] == [0, 1, 4]
    status = _idds_fat("status", submitted["id"])
    assert "driver    finished" in status.stdout
    assert "square" in status.stdout  # the driver's @work task is the workflow's


def test_the_body_s_exception_reaches_the_attaching_process_with_its_traceback(project):
    submitted = _submit_and_leave(project, "raise")
    outcome = _attach_for_result(project, submitted["id"])
    assert outcome["error"] == "ValueError"
    assert outcome["message"] == "body failed after 4"
    assert "in body" in outcome["remote_traceback"]  # the driver's traceback, with its frame
    assert _driver(submitted["id"]).status == "failed"
    shown = _idds_fat("results", submitted["id"])
    assert shown.returncode == 1
    assert "body failed after 4" in shown.stderr


def test_a_killed_driver_is_reported_lost_with_its_stderr_tail(project):
    submitted = _submit_and_leave(project, "block")
    driver = _driver(submitted["id"])
    try:
        wait_until(lambda: (project / "started").exists(), "the driver's body to start", 120)
        assert driver.status == "running"
    finally:
        os.kill(driver.where["pid"], signal.SIGKILL)  # it would block for ever
    outcome = _attach_for_result(project, submitted["id"])
    assert outcome["error"] == "JobLostError"
    assert f"driver of workflow {submitted['id']}" in outcome["message"]
    assert "driver body is blocking now" in outcome["message"]  # the stderr tail
    assert str(driver.files.stderr) in outcome["message"]
    assert driver.status == "lost"
    assert "driver    lost" in _idds_fat("status", submitted["id"]).stdout


def test_the_driver_s_outcome_is_not_unpickled_unless_it_verifies(project):
    submitted = _submit_and_leave(project, "ok")
    assert "value" in _attach_for_result(project, submitted["id"])
    driver = _driver(submitted["id"])
    forged = bytearray(driver.files.outcome.read_bytes())
    forged[-1] ^= 1  # the last byte of the MAC
    driver.files.outcome.write_bytes(bytes(forged))
    outcome = _attach_for_result(project, submitted["id"])
    assert outcome["error"] == "IntegrityError"


@pytest.fixture
def slurm_backend(slurm_env, monkeypatch):
    """The test cluster (conftest's slurm_env), and the slurm backend for every process."""
    monkeypatch.setenv("IDDS_FAT_BACKEND", "slurm")
    monkeypatch.setenv("IDDS_FAT_SLURM_POLL_MIN", "0.3")
    monkeypatch.setenv("IDDS_FAT_SLURM_POLL_MAX", "1.0")
    return slurm_env


def test_a_slurm_driver_submits_its_jobs_from_its_own_job_and_outlives_its_caller(
    project, slurm_backend, monkeypatch
):
    partition = slurm_backend.partitions[1]  # wf.queue: the driver's job goes there too
    monkeypatch.setenv("DRIVER_TEST_QUEUE", partition)
    submitted = _submit_and_leave(project, "ok")
    outcome = _attach_for_result(project, submitted["id"])
    value = outcome["value"]
    assert value["squares"] == [0, 1, 4]
    driver = _driver(submitted["id"])
    assert value["driver_slurm_id"] == driver.where["slurm_job"]  # the body ran in its job
    assert all(s and s != value["driver_slurm_id"] for s in value["job_slurm_ids"])
    assert driver.status == "finished"
