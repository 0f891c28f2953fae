"""Job specs inline: warm workers start on the spec sent with the job while the caller
stores it; a spec key is recorded only once its spec is in the cache (issue 18); a long
task is recorded after its first chunk is handed over and stored, its futures returned
then, the rest handed over in the background (issue 21)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading

import pytest

from idds_fat import Workflow
from idds_fat.errors import CacheError
from idds_fat.testing import wait_until
from idds_fat.testing.bare_worker import start_bare_worker
from idds_fat.workflow.state import WorkflowState


def square(x):
    return x * x


def _record_checked(wf: Workflow, checked: list[bool]) -> None:
    """Make the workflow's record_task and set_spec_keys note whether every spec key they
    record is in the cache (a long task is recorded with its first chunk's keys only)."""
    state, cache = wf.parts.state, wf.parts.cache
    assert state is not None and cache is not None
    record_task, set_spec_keys = state.record_task, state.set_spec_keys

    def checking(task_id, name, function, jobs, arguments=None):
        jobs = list(jobs)
        keys = [spec_key for _, _, spec_key in jobs if spec_key is not None]
        if keys:
            checked.append(all(cache.exists(key) for key in keys))
        record_task(task_id, name, function, jobs, arguments)

    def checking_keys(task_id, keys):
        keys = list(keys)
        checked.append(all(cache.exists(key) for _, key in keys))
        set_spec_keys(task_id, keys)

    state.record_task = checking  # type: ignore[method-assign]
    state.set_spec_keys = checking_keys  # type: ignore[method-assign]


def test_warm_jobs_run_from_inline_specs_before_their_specs_are_stored():
    seen: list[tuple[bool, bool]] = []  # (a job had ended, its spec was in the cache)
    checked: list[bool] = []
    with Workflow(max_workers=1, progress=False, source_dir=False) as wf:
        cache = wf.parts.cache
        assert cache is not None
        put_many = cache.put_many

        def stored_late(items):
            # The first batch waits for a job of its own chunk to end: with jobs that
            # waited for their specs to be stored, none could, and this would time out.
            if not seen:
                futures = wf.tracker.futures()
                done = wait_until(
                    lambda: [f for f in futures if f.done()], "a job to end", timeout=60
                )
                request = wf.tracker.request(f"{done[0].task_id}/{done[0].job}")
                seen.append((True, cache.exists(request.spec_key)))
            return put_many(items)

        cache.put_many = stored_late  # type: ignore[method-assign]
        _record_checked(wf, checked)
        assert list(wf.map(square, range(20))) == [x * x for x in range(20)]
        wf.wait(wf.tasks["t0001"].futures)  # and its last chunk's specs stored
        requests = wf.tracker.requests()
        assert all(cache.exists(r.spec_key) for r in requests)
        # Stored, the requests hold no copy: a long map keeps no spec in memory.
        assert all(r.inline_spec is not None and r.spec_json is None for r in requests)
        # What the jobs reported before their task was recorded was held, then applied.
        state = wf.parts.state
        assert state is not None
        [(task_id, _, jobs)] = state.tasks()
        assert task_id == "t0001" and [job[3] for job in jobs] == ["done"] * 20
        assert [job[2] for job in jobs] == [r.spec_key for r in requests]
    assert seen == [(True, False)]
    assert checked == [True, True]  # the keys of its two chunks (8 and 12 jobs)


def read_env(name):
    return os.environ.get(name)


def test_a_warm_job_in_a_process_of_its_own_runs_from_its_inline_spec_not_yet_stored():
    # init_env makes the worker run the job in a child, which reads its spec from a
    # file: the worker writes the checked inline spec into the job's dir for it.
    seen: list[bool] = []
    with Workflow(max_workers=1, progress=False, source_dir=False) as wf:
        cache = wf.parts.cache
        assert cache is not None
        put_many = cache.put_many

        def stored_late(items):
            futures = wf.tracker.futures()
            seen.append(bool(wait_until(lambda: futures[-1].done(), "the job to end", 60)))
            return put_many(items)

        cache.put_many = stored_late  # type: ignore[method-assign]
        [future] = wf.submit_task(
            read_env, ("IDDS_FAT_TEST_MARK",), {}, init_env="export IDDS_FAT_TEST_MARK=set;"
        )
        assert future.result(timeout=60) == "set"
        request = wf.tracker.request(f"{future.task_id}/0")
        assert (request.workdir / request.spec_key).is_file()
    assert seen == [True]


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_a_spec_key_is_recorded_only_once_its_spec_is_in_the_cache(mode):
    checked: list[bool] = []
    with Workflow(max_workers=2, progress=False, source_dir=False, local_mode=mode) as wf:
        _record_checked(wf, checked)
        assert wf.map_kwargs(square, [{"x": x} for x in range(12)]).results(timeout=120) == [
            x * x for x in range(12)
        ]
        assert wf.submit(square, 7).result(timeout=60) == 49
    # Warm: the map's keys chunk by chunk (8, then 4), the submit's with its record.
    assert checked == ([True] * 3 if mode == "warm" else [True] * 2)


def test_a_cold_backend_gets_each_job_only_once_its_spec_is_stored():
    stored: list[bool] = []
    with Workflow(max_workers=2, progress=False, source_dir=False, local_mode="cold") as wf:
        backend, cache = wf.parts.backend, wf.parts.cache
        assert backend is not None and cache is not None
        assert not backend.runs_inline_specs(wf.resources)
        submit = backend.submit

        def checking(jobs):
            stored.extend(cache.exists(job.spec_key) for job in jobs)
            submit(jobs)

        backend.submit = checking  # type: ignore[method-assign]
        assert list(wf.map(square, range(5))) == [0, 1, 4, 9, 16]
    assert stored == [True] * 5


def test_a_long_map_goes_to_warm_workers_in_growing_chunks():
    chunks: list[int] = []
    with Workflow(max_workers=2, progress=False, source_dir=False) as wf:
        backend = wf.parts.backend
        assert backend is not None and backend.runs_inline_specs(wf.resources)
        submit = backend.submit

        def counting(jobs):
            chunks.append(len(jobs))
            submit(jobs)

        backend.submit = counting  # type: ignore[method-assign]
        assert list(wf.map(square, range(100))) == [x * x for x in range(100)]
        assert any(t.name.startswith("idds-fat-specs") for t in threading.enumerate())
    assert chunks == [8, 16, 32, 44]
    # Closing the workflow stops its spec writer thread.
    assert not any(t.name.startswith("idds-fat-specs") for t in threading.enumerate())


def _failing_store(wf: Workflow, fail_at: int) -> tuple[list[str], list[str]]:
    """Make the cache refuse the ``fail_at``-th batch of specs (and only it); return
    the job ids handed to the backend and those cancelled there, as they come."""
    backend, cache = wf.parts.backend, wf.parts.cache
    assert backend is not None and cache is not None
    put_many, cancel, submit = cache.put_many, backend.cancel, backend.submit
    calls: list[int] = []
    submitted: list[str] = []
    cancelled: list[str] = []

    def handing(jobs):
        submitted.extend(job.job_id for job in jobs)
        submit(jobs)

    def failing(items):
        calls.append(len(items))
        if len(calls) == fail_at:
            raise CacheError("the disk is full")
        return put_many(items)

    def noting(job_ids):
        cancelled.extend(job_ids)
        cancel(job_ids)

    cache.put_many = failing  # type: ignore[method-assign]
    backend.cancel = noting  # type: ignore[method-assign]
    backend.submit = handing  # type: ignore[method-assign]
    return submitted, cancelled


@pytest.mark.parametrize("jobs", [5, 30])  # one chunk, and a long task
def test_a_submission_whose_first_specs_cannot_be_stored_cancels_its_jobs_and_records_nothing(
    jobs,
):
    with Workflow(max_workers=1, progress=False, source_dir=False) as wf:
        state = wf.parts.state
        assert state is not None
        submitted, cancelled = _failing_store(wf, fail_at=1)
        # The first chunk (up to 8 jobs) is handed over, stored, then the task recorded.
        with pytest.raises(CacheError, match="the disk is full"):
            wf.map_kwargs(square, [{"x": x} for x in range(jobs)])
        assert state.tasks() == []  # not recorded: attach finds nothing to rerun
        assert wf.tasks == {}
        assert wf.submit(square, 3).result(timeout=60) == 9  # the workflow goes on
    # Only the first chunk went to the backend, and it is withdrawn.
    handed = [job_id for job_id in submitted if job_id.startswith("t0001/")]
    assert handed == [f"t0001/{i}" for i in range(min(jobs, 8))]
    assert sorted(cancelled) == sorted(handed)


def test_a_long_map_returns_after_its_first_chunk_and_hands_the_rest_over_in_order():
    gate = threading.Event()
    with Workflow(max_workers=2, progress=False, source_dir=False) as wf:
        backend, state = wf.parts.backend, wf.parts.state
        assert backend is not None and state is not None
        submit = backend.submit
        handed: list[list[str]] = []

        def gated(jobs):
            if handed:  # the later chunks wait until the caller has its futures
                assert gate.wait(60)
            handed.append([job.job_id for job in jobs])
            submit(jobs)

        backend.submit = gated  # type: ignore[method-assign]
        futures = wf.map_kwargs(square, [{"x": x} for x in range(40)]).futures
        # Returned with the first chunk handed over, every job already recorded.
        assert handed == [[f"t0001/{i}" for i in range(8)]]
        [(_, _, jobs)] = state.tasks()
        assert [job[3] for job in jobs[8:]] == ["queued"] * 32
        assert all(job[2] is None for job in jobs[8:])  # no key: not stored yet
        assert [f.result(timeout=60) for f in futures[:8]] == [x * x for x in range(8)]
        gate.set()
        later = wf.submit(square, 100)  # handed over after the whole map
        assert later.result(timeout=60) == 10000
        assert [f.result(timeout=60) for f in futures] == [x * x for x in range(40)]
        assert [len(chunk) for chunk in handed] == [8, 16, 16, 1]
        assert [j for chunk in handed[:3] for j in chunk] == [f"t0001/{i}" for i in range(40)]
        assert handed[3] == ["t0002/0"]
        wf.wait(futures)  # and the last chunk's specs stored
        [(_, _, jobs), _] = state.tasks()
        assert all(job[2] is not None for job in jobs)  # every key recorded


def test_a_cancel_stops_a_long_task_being_handed_over():
    release = threading.Event()
    with Workflow(max_workers=1, progress=False, source_dir=False) as wf:
        backend, state = wf.parts.backend, wf.parts.state
        assert backend is not None and state is not None
        submit = backend.submit
        handed: list[str] = []

        def gated(jobs):
            if handed:  # the second chunk waits until the cancel has begun
                assert release.wait(60)
            handed.extend(job.job_id for job in jobs)
            submit(jobs)

        backend.submit = gated  # type: ignore[method-assign]
        futures = wf.map_kwargs(square, [{"x": x} for x in range(100)]).futures
        assert futures[50].cancel()  # before its job is handed over: it must never be

        def release_once_cancelled():
            wait_until(lambda: futures[-1].cancelled(), "the cancel", timeout=60)
            release.set()

        releaser = threading.Thread(target=release_once_cancelled)
        releaser.start()
        wf.cancel("t0001")
        releaser.join()
        assert all(f.cancelled() for f in futures if f.job >= 8)
        # The chunk being handed over when the cancel came may have gone (what of it
        # was not cancelled yet when it was built; withdrawn); none after it.
        assert handed[:8] == [f"t0001/{i}" for i in range(8)]
        assert all(int(job_id.split("/")[1]) < 24 for job_id in handed)
        [(_, _, jobs)] = state.tasks()
        assert {job[3] for job in jobs[24:]} == {"cancelled"}
    assert not any(t.name.startswith("idds-fat-submit") for t in threading.enumerate())


def test_shutdown_cancelling_futures_stops_a_long_task_being_handed_over():
    release = threading.Event()
    wf = Workflow(max_workers=1, progress=False, source_dir=False).open()
    backend = wf.parts.backend
    assert backend is not None
    submit = backend.submit
    handed: list[str] = []

    def gated(jobs):
        if handed:
            assert release.wait(60)
        handed.extend(job.job_id for job in jobs)
        submit(jobs)

    backend.submit = gated  # type: ignore[method-assign]
    futures = wf.map_kwargs(square, [{"x": x} for x in range(100)]).futures
    wf.shutdown(wait=False, cancel_futures=True)
    release.set()
    wf.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert all(f.cancelled() for f in futures if f.job >= 8)
    assert handed[:8] == [f"t0001/{i}" for i in range(8)]
    assert all(int(job_id.split("/")[1]) < 24 for job_id in handed)
    assert not any(t.name.startswith("idds-fat-submit") for t in threading.enumerate())


def test_specs_that_cannot_be_stored_in_the_background_fail_the_jobs_not_yet_safe():
    with Workflow(max_workers=1, progress=False, source_dir=False) as wf:
        state = wf.parts.state
        assert state is not None
        # Chunks of 8, 16, 32, 64, 128, 52: the third batch (jobs 24-55) is refused.
        submitted, cancelled = _failing_store(wf, fail_at=3)
        futures = wf.map_kwargs(square, [{"x": x} for x in range(300)]).futures
        assert [f.result(timeout=60) for f in futures[:24]] == [x * x for x in range(24)]
        wait_until(lambda: all(f.done() for f in futures), "every future to settle", 60)
        for future in futures[24:]:  # handed over and not stored, or never handed over
            if future.exception() is not None:
                assert isinstance(future.exception(), CacheError)
            else:
                assert future.result() == future.job**2  # it ended before the failure
        never = futures[120:]  # not handed over when the failure came (one chunk builds)
        assert all(isinstance(f.exception(), CacheError) for f in never)
        assert not any(int(j.split("/")[1]) >= 120 for j in submitted if j.startswith("t0001/"))
        failed = {int(j.split("/")[1]) for j in cancelled if j.startswith("t0001/")}
        assert failed and min(failed) >= 24 and max(failed) < 120
        [(_, _, jobs)] = state.tasks()
        for job in jobs[120:]:
            assert job[3] == "failed" and job[2] is None
        assert wf.submit(square, 3).result(timeout=60) == 9  # the workflow goes on
    detail = _recorded_error(wf, "t0001", 299)
    assert "CacheError: the disk is full" in detail
    assert not any(
        t.name.startswith(("idds-fat-submit", "idds-fat-specs")) for t in threading.enumerate()
    )


def _recorded_error(wf: Workflow, task_id: str, job: int) -> str:
    """The error text the workflow's record keeps of one job."""
    assert wf.work_dir is not None
    db = sqlite3.connect(wf.work_dir / "state.sqlite3")
    try:
        (error,) = db.execute(
            "SELECT error FROM jobs WHERE task = ? AND job = ?", (task_id, job)
        ).fetchone()
    finally:
        db.close()
    return error or ""


def test_changes_to_a_held_task_apply_in_order_when_it_is_recorded(tmp_path):
    state = WorkflowState(tmp_path / "state.sqlite3")
    state.hold_task("t0001")
    state.set_job_started("t0001", 0, "pid-1")
    state.set_job_status("t0001", 0, "done", 0, value=2.0)
    state.set_job_started("t0001", 1, "pid-2")
    assert state.tasks() == []  # nothing written yet
    state.record_task("t0001", "f", "f", [(0, "f[0]", "a" * 64), (1, "f[1]", "b" * 64)])
    [(_, _, jobs)] = state.tasks()
    assert [(job[0], job[3], job[5]) for job in jobs] == [
        (0, "done", "pid-1"),
        (1, "running", "pid-2"),
    ]
    state.set_job_status("t0001", 1, "failed", 1)  # after the record: written at once
    assert state.job_counts() == {"done": 1, "failed": 1}
    state.hold_task("t0002")
    state.set_job_started("t0002", 0, "pid-3")
    state.drop_task("t0002")  # its submission failed: it is never recorded
    state.record_task("t0003", "g", "g", [(0, "g[0]", "c" * 64)])
    assert state.job_counts() == {"done": 1, "failed": 1, "queued": 1}
    state.close()


def test_a_warm_worker_refuses_an_inline_spec_that_does_not_match_its_key(tmp_path):
    worker = start_bare_worker(tmp_path)
    assert worker.stdin is not None and worker.stdout is not None
    workdir = tmp_path / "j0"
    command = {
        "spec": str(tmp_path / "not-there.json"),  # not read: the inline spec is the spec
        "workdir": str(workdir),
        "spec_json": json.dumps({"version": 1, "tampered": True}),
        "spec_key": "0" * 64,
    }
    worker.stdin.write(json.dumps(command) + "\n")
    worker.stdin.flush()
    answer = json.loads(worker.stdout.readline())
    worker.stdin.close()
    assert worker.wait(timeout=60) == 0
    assert answer["exit"] != 0 and "result" not in answer
    stderr = (workdir / "stderr.txt").read_text()
    assert "does not match its sha256 " + "0" * 64 in stderr
    assert "not-there.json" not in stderr
