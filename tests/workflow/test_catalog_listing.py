"""Listing workflows reads again only the state databases that changed."""

from __future__ import annotations

import os
import time

from idds_fat import Workflow, work
from idds_fat.workflow import catalog
from idds_fat.workflow.state import WorkflowState


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
