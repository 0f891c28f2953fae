"""A pack (several jobs in one batch slot) and the batch system ending it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from idds_fat.node import worker


@pytest.fixture
def ran(monkeypatch):
    """Replace running a job by a record of it; the job named "killed" dies of ``status``."""
    calls: list[str] = []

    def fake_run(command, secrets, idle, warm):
        Path(command["workdir"]).mkdir(parents=True, exist_ok=True)  # as the real one does
        calls.append(command["spec"])
        if command["spec"] == "killed":
            return command["status"], None, None
        return 0, None, None

    monkeypatch.setattr(worker, "_run_command", fake_run)
    return calls


@pytest.mark.parametrize("status", [-signal.SIGTERM, 128 + signal.SIGTERM])
def test_a_job_ended_by_sigterm_ends_the_pack_before_the_next_job_starts(tmp_path, ran, status):
    jobs = [
        {"workdir": str(tmp_path / "0"), "spec": "first"},
        {"workdir": str(tmp_path / "1"), "spec": "killed", "status": status},
        {"workdir": str(tmp_path / "2"), "spec": "never"},
    ]
    assert worker.run_pack(jobs, {"token": None}) == status
    assert ran == ["first", "killed"]
    assert (tmp_path / "0" / "exit_status").read_text() == "0\n"
    # No exit status for the killed job: the backend asks the scheduler how it ended.
    assert not (tmp_path / "1" / "exit_status").exists()


def test_a_job_that_fails_otherwise_does_not_stop_the_pack(tmp_path, ran):
    jobs = [
        {"workdir": str(tmp_path / "0"), "spec": "killed", "status": -signal.SIGKILL},
        {"workdir": str(tmp_path / "1"), "spec": "next"},
    ]
    assert worker.run_pack(jobs, {"token": None}) == -signal.SIGKILL
    assert ran == ["killed", "next"]
    assert (tmp_path / "0" / "exit_status").read_text() == f"{-signal.SIGKILL}\n"
    assert (tmp_path / "1" / "exit_status").read_text() == "0\n"
