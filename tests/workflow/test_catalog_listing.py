"""Listing workflows: only changed state databases are read again; a caller gone is seen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from idds_fat import Workflow, work
from idds_fat.cli import main
from idds_fat.workflow import catalog
from idds_fat.workflow.state import WorkflowState, caller_gone, caller_identity


@work
def one():
    return 1


def _age(path, seconds=60):
    past = time.time_ns() - seconds * 1_000_000_000
    for part in (path, path.with_name(path.name + "-wal")):
        if part.exists():
            os.utime(part, ns=(past, past))


def test_a_settled_workflow_is_listed_from_memory_until_its_state_changes(monkeypatch):
    with Workflow(progress=False) as wf:
        one()
    root = wf.config.work_dir
    state = wf.work_dir / "state.sqlite3"
    _age(state)
    (first,) = catalog.list_workflows(root)
    assert first.status == "finished"
    reads = []
    real = catalog._summary
    monkeypatch.setattr(catalog, "_summary", lambda *a: reads.append(a) or real(*a))
    assert catalog.list_workflows(root) == [first]
    assert reads == []  # nothing changed: no database opened
    writer = WorkflowState(state)
    writer.set_workflow_status("cancelled")  # a write: size or mtime moves
    writer.close()
    (again,) = catalog.list_workflows(root)
    assert again.status == "cancelled" and len(reads) == 1


def test_a_recently_written_workflow_is_always_read_again(monkeypatch):
    with Workflow(progress=False) as wf:
        one()
    catalog.list_workflows(wf.config.work_dir)
    reads = []
    real = catalog._summary
    monkeypatch.setattr(catalog, "_summary", lambda *a: reads.append(a) or real(*a))
    catalog.list_workflows(wf.config.work_dir)
    assert len(reads) == 1  # written seconds ago: its stamp is not trusted yet


_UNCLOSED_CALLER = """
import sys
from idds_fat import Workflow

wf = Workflow(name="unclosed", progress=False).open()  # never closed
assert wf.submit(abs, -3).result(timeout=60) == 3
print("ID", wf.id, flush=True)
if sys.argv[1] == "block":
    sys.stdin.readline()
"""


def _start_unclosed(how: str) -> tuple[subprocess.Popen, str]:
    caller = subprocess.Popen(
        [sys.executable, "-c", _UNCLOSED_CALLER, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = caller.stdout.readline()
    assert line.startswith("ID "), caller.stderr.read()
    return caller, line.split()[1]


@pytest.mark.parametrize("ending", ["exits", "is killed"])
def test_a_workflow_whose_caller_ended_without_closing_it_shows_caller_gone(
    isolated_settings, ending
):
    caller, workflow_id = _start_unclosed("block")
    try:
        assert catalog.workflow_summary(isolated_settings, workflow_id).status == "running"
        if ending == "exits":
            caller.stdin.close()  # lets the script end without closing its workflow
        else:
            caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=60)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=30)
    summary = catalog.workflow_summary(isolated_settings, workflow_id)
    assert summary.status == catalog.CALLER_GONE
    assert summary.ended is not None and summary.caller["pid"] == caller.pid
    (listed,) = catalog.list_workflows(isolated_settings)
    assert listed.status == catalog.CALLER_GONE
    shown = CliRunner().invoke(main, ["status"], catch_exceptions=False)
    assert "caller gone" in shown.output


def test_a_pid_reused_by_another_process_is_not_the_caller():
    me = caller_identity()
    assert not caller_gone(me)
    assert caller_gone({**me, "start": "1"})  # this pid, but a process started at boot
    assert not caller_gone({**me, "host": "another-host"})  # cannot tell: not gone
    assert not caller_gone(None)
