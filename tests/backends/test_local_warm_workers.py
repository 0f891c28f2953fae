"""Warm and cold workers of the local backend: what each job sees, and how jobs end."""

from __future__ import annotations

import os
import sys
import time

import pytest

from idds_fat import JobLostError, Workflow, work
from idds_fat.testing import wait_until


@work
def whoami(x=0):
    return os.getpid(), x


@work
def chatty(x):
    print(f"out {x}")
    os.write(2, f"err {x}\n".encode())  # at the descriptor level, as C code would
    return x


def test_a_warm_worker_runs_job_after_job_in_one_process():
    with Workflow(max_workers=1, progress=False) as wf:
        results = whoami.map([{"x": i} for i in range(6)]).results()
    assert [x for _, x in results] == list(range(6))
    assert len({pid for pid, _ in results}) == 1
    assert wf.config.local_mode == "warm"


def test_cold_mode_starts_an_interpreter_per_job():
    with Workflow(max_workers=1, local_mode="cold", progress=False):
        results = whoami.map([{"x": i} for i in range(4)]).results()
    assert len({pid for pid, _ in results}) == 4


def test_each_warm_job_keeps_its_own_stdout_and_stderr():
    with Workflow(max_workers=1, progress=False) as wf:
        assert chatty.map([{"x": 1}, {"x": 2}]).results() == [1, 2]
        jobs = wf.work_dir / "jobs" / "t0001"
    for index, x in enumerate((1, 2)):
        assert (jobs / str(index) / "stdout.txt").read_text() == f"out {x}\n"
        assert (jobs / str(index) / "stderr.txt").read_text() == f"err {x}\n"


def test_killing_a_running_warm_job_replaces_its_worker(tmp_path):
    started = tmp_path / "started"

    @work
    def stuck():
        started.write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)

    with Workflow(max_workers=1, progress=False) as wf:
        future = stuck.submit()
        wait_until(lambda: started.exists() and started.read_text(), what="the job to start")
        stuck_pid = int(started.read_text())
        assert (wf.work_dir / "workers" / "worker-1").is_dir()  # the worker's own files
        assert future.kill()
        pid, _ = whoami(1)  # the next job runs, in a fresh worker
    assert future.cancelled()
    assert pid != stuck_pid
    # The killed worker could not clean up after itself: the backend did.
    assert not (wf.work_dir / "workers" / "worker-1").exists()
    assert (wf.work_dir / "workers" / "worker-1.log").is_file()
    with pytest.raises(ProcessLookupError):
        os.kill(stuck_pid, 0)  # the worker that ran it was killed (and reaped)


def test_a_warm_job_over_its_walltime_is_killed_and_the_next_one_runs(tmp_path):
    @work(walltime=0.5)
    def too_long():
        while True:
            time.sleep(0.05)

    with Workflow(max_workers=1, progress=False):
        with pytest.raises(JobLostError, match="walltime of 0.5 s exceeded"):
            too_long()
        assert whoami(7)[1] == 7


def test_a_job_that_kills_its_warm_worker_is_lost_and_the_next_one_runs():
    @work
    def dies():
        os._exit(17)

    with Workflow(max_workers=1, progress=False):
        with pytest.raises(JobLostError, match="exit status 17"):
            dies()
        assert whoami(3)[1] == 3


def test_the_code_context_is_extracted_once_per_warm_worker(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "helper_mod.py").write_text("import os\nPID = os.getpid()\n")

    @work
    def where():
        import helper_mod

        return os.getcwd(), helper_mod.PID

    with Workflow(source_dir=source, max_workers=1, progress=False):
        first, second = where.map([{}, {}]).results()
    assert first == second  # same extracted dir, and the module imported once
    assert os.path.isdir(first[0]) is False  # removed when the worker ended


def test_warm_results_come_back_over_the_pipe_and_a_copy_stays_for_attach():
    with Workflow(max_workers=2, progress=False) as wf:
        values = whoami.map([{"x": i} for i in range(5)]).results()
    assert wf.stats["local"] == 5 and wf.stats["rest"] == 0 and wf.stats["duplicates"] == 0
    with Workflow.attach(wf.id) as again:  # reads the REST store's copies
        assert again.tasks["t0001"].results(timeout=60) == values


def test_without_direct_results_warm_jobs_deliver_over_rest():
    with Workflow(max_workers=1, local_direct_results=False, progress=False) as wf:
        assert whoami(4)[1] == 4
    assert wf.stats["rest"] == 1 and wf.stats["local"] == 0


def test_cold_jobs_leave_their_results_in_a_file_for_a_live_caller():
    with Workflow(max_workers=2, local_mode="cold", progress=False) as wf:
        values = whoami.map([{"x": i} for i in range(3)]).results()
        job_dirs = [request.workdir for request in wf.tracker.requests()]
    assert [x for _, x in values] == [0, 1, 2]
    assert wf.stats["local"] == 3 and wf.stats["rest"] == 0
    assert not any((d / "result.reply").exists() for d in job_dirs)  # read and removed
    with Workflow.attach(wf.id) as again:  # the REST store's copies
        assert again.tasks["t0001"].results(timeout=60) == values


# --- paths and interpreters: what a job's process is started with -----------------------


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_relative_path_settings_name_the_same_places_for_the_jobs(mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "relmod.py").write_text("VALUE = 'from the code context'\n")
    monkeypatch.setenv("IDDS_FAT_WORK_DIR", "wd")
    monkeypatch.setenv("IDDS_FAT_ENV_CACHE_DIR", "envs")  # jobs inherit it: absolute there too
    python = os.path.relpath(sys.executable)  # a path with a slash, relative to here

    @work
    def where():
        import relmod

        return relmod.VALUE, os.environ.get("IDDS_FAT_ENV_CACHE_DIR")

    settings = {"cache": "store", "python": python, "local_mode": mode}
    with Workflow(source_dir="proj", max_workers=1, progress=False, **settings) as wf:
        results = where.map([{}, {}]).results()
    assert results == [("from the code context", str(tmp_path / "envs"))] * 2
    assert wf.work_dir.parent == tmp_path / "wd" / "workflows"
    assert wf.config.python == sys.executable
    assert any((tmp_path / "store").iterdir())  # the relative cache is the one jobs read


def _interpreter_script(tmp_path, body: str):
    script = tmp_path / "broken-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_an_interpreter_that_exits_at_once_is_named_with_what_it_printed(mode, tmp_path, caplog):
    python = _interpreter_script(tmp_path, 'echo "broken install: no site" >&2; exit 3')
    with Workflow(python=python, local_mode=mode, max_workers=1, progress=False):
        with pytest.raises(JobLostError) as lost:
            whoami(1)
    message = str(lost.value)
    assert f"the interpreter {python} exited before the job started (exit status 3)" in message
    assert lost.value.exit_status == 3
    assert "broken install: no site" in lost.value.stderr_tail
    assert os.path.exists(lost.value.stderr_path)  # the file it cites is there
    expected_log = "worker-1.log" if mode == "warm" else "stderr.txt"
    assert lost.value.stderr_path.endswith(expected_log)
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_a_nonexistent_interpreter_is_named_without_a_traceback(mode, caplog):
    with Workflow(python="/nonexistent/python", local_mode=mode, progress=False):
        with pytest.raises(JobLostError) as lost:
            whoami(1)
    assert str(lost.value).endswith(
        "ended without a result: the interpreter /nonexistent/python could not be started: "
        "No such file or directory"
    )
    assert lost.value.stderr_path is None  # nothing ran, so no log to point at
    assert not [r for r in caplog.records if r.exc_info]


def test_a_cold_job_that_exits_is_not_blamed_on_its_interpreter():
    @work
    def dies():
        os._exit(1)

    with Workflow(local_mode="cold", progress=False):
        with pytest.raises(JobLostError, match=r"its process exited \(exit status 1\)") as lost:
            dies()
    assert "the interpreter" not in str(lost.value)
    assert lost.value.stderr_path.endswith("stderr.txt")
