"""Job specs inline: warm workers start on the spec sent with the job while the caller
stores it; the task is recorded only once every spec is in the cache (issue 18)."""

from __future__ import annotations

import json
import os
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
    """Make the workflow's record_task note whether every spec it records is in the cache."""
    state, cache = wf.parts.state, wf.parts.cache
    assert state is not None and cache is not None
    record_task = state.record_task

    def checking(task_id, name, function, jobs, arguments=None):
        jobs = list(jobs)
        checked.append(all(cache.exists(spec_key) for _, _, spec_key in jobs))
        record_task(task_id, name, function, jobs, arguments)

    state.record_task = checking  # type: ignore[method-assign]


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
        requests = wf.tracker.requests()
        assert all(cache.exists(r.spec_key) for r in requests)
        # Stored, the requests hold no copy: a long map keeps no spec in memory.
        assert all(r.inline_spec is not None and r.spec_json is None for r in requests)
        # What the jobs reported before their task was recorded was held, then applied.
        state = wf.parts.state
        assert state is not None
        [(task_id, _, jobs)] = state.tasks()
        assert task_id == "t0001" and [job[3] for job in jobs] == ["done"] * 20
    assert seen == [(True, False)]
    assert checked == [True]


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
def test_a_task_is_recorded_only_once_every_spec_is_in_the_cache(mode):
    checked: list[bool] = []
    with Workflow(max_workers=2, progress=False, source_dir=False, local_mode=mode) as wf:
        _record_checked(wf, checked)
        assert wf.map_kwargs(square, [{"x": x} for x in range(12)]).results(timeout=120) == [
            x * x for x in range(12)
        ]
        assert wf.submit(square, 7).result(timeout=60) == 49
    assert checked == [True, True]


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


def test_a_submission_whose_specs_cannot_be_stored_cancels_its_jobs_and_records_nothing():
    cancelled: list[str] = []
    with Workflow(max_workers=1, progress=False, source_dir=False) as wf:
        backend, cache, state = wf.parts.backend, wf.parts.cache, wf.parts.state
        assert backend is not None and cache is not None and state is not None
        put_many, cancel, submit = cache.put_many, backend.cancel, backend.submit
        calls, submitted = [], []

        def handing(jobs):
            submitted.extend(job.job_id for job in jobs)
            submit(jobs)

        def failing(items):
            calls.append(len(items))
            if len(calls) == 2:
                raise CacheError("the disk is full")
            return put_many(items)

        def noting(job_ids):
            cancelled.extend(job_ids)
            cancel(job_ids)

        cache.put_many = failing  # type: ignore[method-assign]
        backend.cancel = noting  # type: ignore[method-assign]
        backend.submit = handing  # type: ignore[method-assign]
        with pytest.raises(CacheError, match="the disk is full"):
            wf.map_kwargs(square, [{"x": x} for x in range(30)])
        assert state.tasks() == []  # not recorded: attach finds nothing to rerun
        assert wf.tasks == {}
        cache.put_many = put_many  # type: ignore[method-assign]
        assert wf.submit(square, 3).result(timeout=60) == 9  # the workflow goes on
    # Every job handed over (at least the two chunks of 8 and 16) is withdrawn.
    handed = [job_id for job_id in submitted if job_id.startswith("t0001/")]
    assert len(handed) >= 24 and sorted(cancelled) == sorted(handed)


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
