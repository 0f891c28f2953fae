"""A result a warm worker handed back counts as delivered only once its copy is kept."""

from __future__ import annotations

import sqlite3

from idds_fat import Workflow, work
from idds_fat.results import RestResultSource
from idds_fat.service import EmbeddedService
from idds_fat.testing import wait_until


@work
def square(x):
    return x * x


def test_a_result_whose_copy_could_not_be_kept_is_delivered_by_its_worker(
    tmp_path, monkeypatch
) -> None:
    keep = EmbeddedService.keep_result
    failed: list[bytes] = []

    def keep_failing_once(self, workflow, envelope, holder=None):
        if not failed:
            failed.append(envelope)
            raise sqlite3.OperationalError("database or disk is full")
        return keep(self, workflow, envelope, holder)

    monkeypatch.setattr(EmbeddedService, "keep_result", keep_failing_once)
    with Workflow(work_dir=tmp_path, max_workers=1, source_dir=False, progress=False) as wf:
        assert square.map([{"x": 3}]).results() == [9]  # the value is in hand
        store = RestResultSource(wf.service_url, wf.id, wf.parts.token)
        try:
            # Told its answer was not recorded, the worker posts the result itself.
            wait_until(lambda: failed[0] in store.fetch(0)[1], "the worker's own delivery")
        finally:
            store.close()
    assert len(failed) == 1
    with Workflow.attach(wf.id, work_dir=tmp_path) as again:
        assert again.tasks["t0001"].results(timeout=60) == [9]
