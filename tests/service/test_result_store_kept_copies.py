"""Copies a caller keeps of results it got over a warm worker's pipe (issue 18): the
store keeps them for every reader but the one that holds them, which never reads
them back, while its cursor moves past them."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from idds_fat import Workflow, work
from idds_fat.node.envelope import seal
from idds_fat.results import RestResultSource
from idds_fat.service import EmbeddedService, ResultStore

KEY = b"k" * 32
TOKEN = "kept-copies-token"


def envelope(job: int, workflow: str = "wf1") -> bytes:
    header = {"kind": "result", "workflow": workflow, "task": "t1", "job": job, "attempt": 0}
    return seal(dict(header, status="ok"), f"body {job}".encode(), KEY)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    results = ResultStore(tmp_path / "results.sqlite3", ttl_seconds=100.0)
    yield results
    results.close()


def test_a_kept_copy_is_left_out_for_its_holder_and_read_by_everyone_else(store) -> None:
    posted, kept, later = envelope(0), envelope(1), envelope(2)
    seq0 = store.add("wf1", posted)
    seq1 = store.add("wf1", kept, holder="caller-a")
    seq2 = store.add("wf1", later)
    assert store.since("wf1", 0, 10, holder="caller-a") == [(seq0, posted), (seq2, later)]
    assert store.since("wf1", seq0, 10, holder="caller-a") == [(seq2, later)]
    everything = [(seq0, posted), (seq1, kept), (seq2, later)]
    assert store.since("wf1", 0, 10) == everything  # attach, `idds-fat results`
    assert store.since("wf1", 0, 10, holder="caller-b") == everything


def test_a_holder_whose_newest_rows_are_its_own_copies_moves_past_them(store) -> None:
    posted = envelope(0)
    seq0 = store.add("wf1", posted)
    store.add("wf1", envelope(1), holder="caller-a")
    seq2 = store.add("wf1", envelope(2), holder="caller-a")
    assert store.since("wf1", 0, 10, holder="caller-a") == [(seq0, posted), (seq2, None)]
    assert store.since("wf1", seq2, 10, holder="caller-a") == []
    # Only its own workflow's rows move its cursor.
    store.add("wf2", envelope(0, "wf2"))
    assert store.since("wf1", seq2, 10, holder="caller-a") == []


def test_a_full_page_does_not_move_the_cursor_past_results_it_did_not_hold(store) -> None:
    first, second = envelope(0), envelope(2)
    seq0 = store.add("wf1", first)
    store.add("wf1", envelope(1), holder="caller-a")
    seq2 = store.add("wf1", second)
    assert store.since("wf1", 0, 1, holder="caller-a") == [(seq0, first)]
    assert store.since("wf1", seq0, 1, holder="caller-a") == [(seq2, second)]


def test_the_same_bytes_posted_by_the_job_itself_stay_a_kept_copy(store) -> None:
    # A worker not acked delivers the result itself: identical bytes, one row.
    data = envelope(0)
    seq = store.add("wf1", data, holder="caller-a")
    assert store.add("wf1", data) == seq
    assert store.since("wf1", 0, 10, holder="caller-a") == [(seq, None)]


def test_a_store_made_before_kept_copies_gains_the_column_and_keeps_its_rows(tmp_path) -> None:
    path = tmp_path / "results.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE results (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, workflow TEXT NOT NULL, task TEXT,
            job INTEGER, attempt INTEGER, digest TEXT NOT NULL, received REAL NOT NULL,
            envelope BLOB NOT NULL, UNIQUE (workflow, digest)
        );
        """
    )
    old.execute(
        "INSERT INTO results (workflow, task, job, attempt, digest, received, envelope) "
        "VALUES ('wf1', 't1', 0, 0, 'd0', 1e12, ?)",
        (envelope(0),),
    )
    old.commit()
    old.close()
    store = ResultStore(path, ttl_seconds=100.0)
    try:
        seq = store.add("wf1", envelope(1), holder="caller-a")
        assert store.since("wf1", 0, 10, holder="caller-a") == [(1, envelope(0)), (seq, None)]
    finally:
        store.close()


def test_the_rest_endpoint_leaves_out_the_holders_copies_and_moves_its_cursor(tmp_path):
    with EmbeddedService(tmp_path, token=TOKEN) as service:
        posted = envelope(0)
        service.keep_result("wf1", envelope(1), holder="caller-a")
        with requests.Session() as http:
            http.post(
                service.url + "/results/wf1",
                data=posted,
                headers={"Authorization": "Bearer " + TOKEN},
                timeout=10,
            ).raise_for_status()
        service.keep_result("wf1", envelope(2), holder="caller-a")
        source = RestResultSource(service.url, "wf1", TOKEN)
        try:
            cursor, mine = source.fetch(0, holder="caller-a")
            assert mine == [posted]
            assert source.fetch(cursor, holder="caller-a") == (cursor, [])
            _, everything = source.fetch(0)
            assert everything == [envelope(1), posted, envelope(2)]
        finally:
            source.close()


@work
def square(x):
    return x * x


def test_a_caller_never_reads_back_the_copies_it_kept_and_attach_reads_them(tmp_path):
    with Workflow(work_dir=tmp_path, max_workers=2, source_dir=False, progress=False) as wf:
        assert square.map([{"x": i} for i in range(20)]).results() == [i * i for i in range(20)]
        wf.parts.collector.drain()  # its own REST read, as after every job
        stats = wf.stats
        store = RestResultSource(wf.service_url, wf.id, wf.parts.token)
        try:
            _, kept = store.fetch(0, limit=100)
        finally:
            store.close()
    assert stats["local"] == 20 and stats["rest"] == 0 and stats["duplicates"] == 0
    assert len(kept) == 20  # every copy is there for others
    with Workflow.attach(wf.id, work_dir=tmp_path) as again:
        assert again.tasks["t0001"].results(timeout=60) == [i * i for i in range(20)]
        assert again.stats["rest"] == 20
