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


def test_a_warm_job_that_prints_nothing_leaves_no_output_files():
    from click.testing import CliRunner

    from idds_fat.cli import main

    with Workflow(max_workers=1, progress=False) as wf:
        assert chatty(1) == 1
        assert whoami(2)[1] == 2  # silent, run between two that print
        assert chatty(3) == 3
        jobs = wf.work_dir / "jobs"
    assert not (jobs / "t0002" / "0").exists()  # neither files nor a dir for the silent job
    # Each printing job has its own output only, none of the others'.
    assert (jobs / "t0001" / "0" / "stdout.txt").read_text() == "out 1\n"
    assert (jobs / "t0003" / "0" / "stderr.txt").read_text() == "err 3\n"
    for path in (jobs / "t0001" / "0", jobs / "t0001" / "0" / "stdout.txt"):
        assert path.stat().st_mode & 0o077 == 0
    logs = CliRunner().invoke(main, ["logs", wf.id, "t0002", "0"], catch_exceptions=False)
    assert logs.exit_code == 0 and logs.output == ""  # printed nothing, not an error


def test_a_running_warm_jobs_output_is_read_from_its_workers_spool(tmp_path):
    from click.testing import CliRunner

    from idds_fat.cli import main
    from idds_fat.monitor.views import job_view

    gate = tmp_path / "gate"

    @work
    def talks_then_waits():
        print("halfway there", flush=True)
        os.write(2, b"still working\n")
        wait_until(gate.exists, "the gate", timeout=120)
        return 1

    def logs(*args: str) -> str:
        return CliRunner().invoke(main, ["logs", wf.id, "t0001", "0", *args]).output

    with Workflow(max_workers=1, progress=False) as wf:
        future = talks_then_waits.submit()
        wait_until(lambda: logs() == "halfway there\n", "the running job's output")
        assert logs("--stderr") == "still working\n"
        assert job_view(wf.work_dir.parent.parent, wf.id, "t0001", 0)["stderr_tail"] == (
            "still working\n"
        )
        gate.touch()
        assert future.result(timeout=60) == 1
    assert logs() == "halfway there\n"  # now from the job's own file
    assert (wf.work_dir / "jobs" / "t0001" / "0" / "stdout.txt").is_file()


def test_a_job_that_kills_its_warm_worker_still_shows_its_stderr_tail():
    @work
    def last_words():
        print("some output")
        os.write(2, b"last words before the crash\n")
        os.kill(os.getpid(), 9)

    with Workflow(max_workers=1, progress=False) as wf:
        with pytest.raises(JobLostError, match="its warm worker was killed") as lost:
            last_words()
        assert whoami(3)[1] == 3  # the next worker's spool starts empty
    assert "last words before the crash" in lost.value.stderr_tail
    assert lost.value.stderr_path == str(wf.work_dir / "jobs" / "t0001" / "0" / "stderr.txt")
    assert (wf.work_dir / "jobs" / "t0001" / "0" / "stdout.txt").read_text() == "some output\n"
    assert not (wf.work_dir / "jobs" / "t0002" / "0").exists()


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


def test_a_warm_job_that_exits_0_without_a_result_is_lost_at_once_with_a_broker(activemq, tmp_path):
    # Issue 17, item 3: with a broker, an exit 0 meant "a channel took the result", so
    # the caller waited 2 x 30 s and ran the job twice. A warm worker that dies in a
    # job never answered: no status of its says a result was handed over.
    runs = tmp_path / "runs"
    runs.mkdir()

    @work
    def vanishes():
        (runs / str(os.getpid())).touch()
        os._exit(0)

    settings = {
        "broker": activemq.url,
        "broker_user": "idds",
        "broker_password": "fat-secret",
        "result_grace_seconds": 600.0,  # waiting it out would fail the timeout below
    }
    with Workflow(max_workers=1, progress=False, **settings):
        future = vanishes.submit()
        with pytest.raises(JobLostError, match="its warm worker exited while the job ran"):
            future.result(timeout=120)
        assert whoami(5)[1] == 5  # and the next job runs, in a fresh worker
    assert len(os.listdir(runs)) == 1  # run once, not again after a grace period


@work
def meddle():
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    os.umask(0o077)
    os.environ["MEDDLED"] = "yes"
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.path.append("/meddled")
    return os.getpid(), soft


@work
def look():
    import resource
    import signal

    umask = os.umask(0o022)
    os.umask(umask)
    return {
        "pid": os.getpid(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "umask": umask,
        "meddled": "MEDDLED" in os.environ,
        "sigusr1": signal.getsignal(signal.SIGUSR1),
        "path": "/meddled" in sys.path,
        "uid": os.getuid(),
    }


def test_process_state_a_warm_job_changes_is_put_back_before_the_next_job():
    # Issue 17, item 9: a job's setrlimit leaked into the next job of its worker.
    with Workflow(max_workers=1, progress=False):
        pid, nofile = meddle()
        after = look()
    assert nofile > 64
    assert after["pid"] == pid  # the same worker, its state put back
    assert after["nofile"] == nofile
    assert after["umask"] != 0o077 and not after["meddled"] and not after["path"]
    assert after["sigusr1"] is not __import__("signal").SIG_IGN


@pytest.mark.skipif(sys.platform != "linux", reason="drops a Linux capability")
def test_a_warm_worker_whose_job_changed_what_cannot_be_put_back_is_replaced():
    @work
    def lower_for_good():
        import ctypes
        import resource

        if os.geteuid() == 0:  # root could raise the hard limit again: give that up first
            libc = ctypes.CDLL(None, use_errno=True)
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
            data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2)
            assert libc.capget(header, data) == 0
            cap_sys_resource = 1 << 24
            data[0] &= ~cap_sys_resource
            data[1] &= ~cap_sys_resource
            assert libc.capset(header, data) == 0
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # the hard limit too
        return os.getpid()

    with Workflow(max_workers=1, progress=False):
        pid = lower_for_good()
        after = look()
    assert after["pid"] != pid  # a fresh worker: the old one could not be put back
    assert after["nofile"] > 64


@work(memory_mb=400)
def hog():
    return len(bytearray(2 * 1024**3))  # 2 GiB: over its 400 MiB


@work
def address_space_limit():
    import resource

    return resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_memory_mb_is_enforced_and_lifted_for_the_next_job(mode):
    # Issue 17, item 10: memory_mb was accepted and not enforced on `local`.
    with Workflow(max_workers=1, local_mode=mode, progress=False):
        with pytest.raises(MemoryError):
            hog()
        assert address_space_limit()  # the next job (same warm worker) has no cap


def test_a_job_that_dies_out_of_memory_is_reported_as_such():
    @work(memory_mb=400)
    def unchecked_malloc():
        import ctypes

        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        size = 2 * 1024**3
        ctypes.memset(libc.malloc(size), 0, size)  # C code that trusts malloc: NULL

    with Workflow(max_workers=1, progress=False):
        with pytest.raises(JobLostError, match="memory_mb=400.*most likely out of memory"):
            unchecked_malloc()
        assert whoami(2)[1] == 2


@pytest.mark.parametrize("direct_results", [True, False])
def test_closing_a_workflow_leaves_no_unclosed_file(direct_results):
    # Issue 16, part 5: every close warned "ResourceWarning: unclosed file" (the warm
    # worker's pipe); a worker retired after its job killed it counts too.
    import gc
    import warnings

    @work
    def dies():
        os._exit(3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with Workflow(max_workers=2, local_direct_results=direct_results, progress=False):
            assert [x for _, x in whoami.map([{"x": i} for i in range(4)]).results()] == [
                0,
                1,
                2,
                3,
            ]
            with pytest.raises(JobLostError):
                dies()
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_a_new_callers_workers_take_names_no_earlier_worker_left(tmp_path) -> None:
    # After attach, an earlier caller's worker-N may still run: a new worker-N would
    # truncate its spool and overwrite its pid file.
    with Workflow(max_workers=1, progress=False) as wf:
        wf.start()
        workers = wf.work_dir / "workers"
        workers.mkdir(exist_ok=True)
        for name in ("worker-2.log", "worker-11.spool", "worker-3.pid", "worker-x.log"):
            (workers / name).touch()
        assert whoami(1)[1] == 1
    assert (workers / "worker-12.log").is_file()  # the first worker this caller started
    assert not (workers / "worker-1.log").exists()
    assert (workers / "worker-11.spool").is_file()  # an earlier worker's spool, untouched
