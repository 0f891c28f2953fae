from collections.abc import Iterator
from pathlib import Path

import pytest

from idds_fat.node.envelope import seal
from idds_fat.service import ResultStore

KEY = b"k" * 32


def envelope(workflow: str = "wf1", body: bytes = b"body", key: bytes = KEY, **header) -> bytes:
    fields = {"kind": "result", "workflow": workflow, "task": "t1", "job": 0, "attempt": 0}
    fields.update(status="ok", **header)
    return seal(fields, body, key)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    results = ResultStore(tmp_path / "results.sqlite3", ttl_seconds=100.0)
    yield results
    results.close()


def test_add_then_since_returns_envelopes_in_order(store: ResultStore) -> None:
    first, second = envelope(job=0), envelope(job=1)
    seq1, seq2 = store.add("wf1", first), store.add("wf1", second)
    assert seq1 is not None and seq2 is not None and seq1 < seq2
    assert store.since("wf1", 0, 100) == [(seq1, first), (seq2, second)]
    assert store.since("wf1", seq1, 100) == [(seq2, second)]
    assert store.since("wf1", seq2, 100) == []


def test_since_respects_limit_and_workflow(store: ResultStore) -> None:
    for job in range(3):
        store.add("wf1", envelope(job=job))
    store.add("wf2", envelope("wf2"))
    assert len(store.since("wf1", 0, 2)) == 2
    assert [env for _, env in store.since("wf2", 0, 10)] == [envelope("wf2")]


def test_identical_envelope_is_stored_once(store: ResultStore) -> None:
    data = envelope()
    assert store.add("wf1", data) == store.add("wf1", data)
    assert len(store.since("wf1", 0, 10)) == 1


def test_forged_envelope_for_same_job_does_not_block_the_real_one(store: ResultStore) -> None:
    forged = envelope(body=b"forged", key=b"x" * 32)
    real = envelope(body=b"real")
    store.add("wf1", forged)
    assert store.add("wf1", real) is not None
    assert [env for _, env in store.since("wf1", 0, 10)] == [forged, real]


def test_workflow_mismatch_raises_value_error(store: ResultStore) -> None:
    with pytest.raises(ValueError, match="wf2"):
        store.add("wf1", envelope("wf2"))


def test_garbage_raises_value_error(store: ResultStore) -> None:
    with pytest.raises(ValueError, match="envelope"):
        store.add("wf1", b"not an envelope at all, just bytes" * 3)


def test_purge_deletes_only_results_older_than_ttl(store: ResultStore) -> None:
    store.add("wf1", envelope())
    assert store.purge() == 0  # fresh
    assert store.purge(now=10**12) == 1
    assert store.since("wf1", 0, 10) == []


def test_sequence_numbers_are_not_reused_after_purge(store: ResultStore) -> None:
    old = store.add("wf1", envelope(job=0))
    store.purge(now=10**12)
    new = store.add("wf1", envelope(job=1))
    assert old is not None and new is not None and new > old


def test_results_survive_reopening_the_database(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite3"
    first = ResultStore(db, ttl_seconds=100.0)
    seq = first.add("wf1", envelope())
    first.close()
    second = ResultStore(db, ttl_seconds=100.0)
    try:
        assert second.since("wf1", 0, 10) == [(seq, envelope())]
    finally:
        second.close()
