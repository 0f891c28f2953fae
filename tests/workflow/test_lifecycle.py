"""Opening and closing workflows: waiting, cancelling, Ctrl-C, timeouts, state on disk."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from idds_fat import (
    ConfigError,
    IgnoredParameterWarning,
    NoActiveWorkflowError,
    Workflow,
    current_workflow,
    work,
)
from idds_fat.testing import wait_until
from idds_fat.workflow import options as options_module
from idds_fat.workflow import require_workflow


@work
def wait_for_file(path, timeout=120):
    """Block until ``path`` exists (a job that runs until the test lets it go)."""
    wait_until(lambda: os.path.exists(path), path, timeout)
    return os.getpid()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workflow_is_current_only_while_open():
    assert current_workflow() is None
    with pytest.raises(NoActiveWorkflowError):
        require_workflow()
    with Workflow() as wf:
        assert current_workflow() is wf
        with Workflow() as inner:
            assert current_workflow() is inner
        assert current_workflow() is wf
    assert current_workflow() is None


def test_leaving_waits_for_running_jobs_by_default(tmp_path):
    release = tmp_path / "release"
    with Workflow() as wf:
        future = wait_for_file.submit(str(release))
        release.touch()
    assert future.done() and future.result() > 0
    assert wf.stats["received"] == 1


def test_leaving_with_cancel_kills_running_jobs(tmp_path):
    with Workflow(on_exit="cancel") as wf:
        future = wait_for_file.submit(str(tmp_path / "never"))
        _wait_until_running(wf)
    assert future.cancelled()


def test_exception_in_body_cancels_outstanding_jobs(tmp_path):
    with pytest.raises(RuntimeError, match="user bug"):
        with Workflow():
            future = wait_for_file.submit(str(tmp_path / "never"))
            raise RuntimeError("user bug")
    assert future.cancelled()


def test_kill_one_future_kills_its_running_job_and_others_go_on(tmp_path):
    release = tmp_path / "release"
    with Workflow() as wf:
        doomed = wait_for_file.submit(str(tmp_path / "never"))
        kept = wait_for_file.submit(str(release))
        _wait_until_running(wf, count=2)
        assert not doomed.cancel()  # it runs: Future.cancel refuses
        assert doomed.kill()
        release.touch()
        assert kept.result(timeout=60) > 0
    assert doomed.cancelled()
    counts = _job_counts(wf)
    assert counts == {"cancelled": 1, "done": 1}


def test_timeout_on_blocking_call_cancels_and_raises(tmp_path):
    with Workflow(timeout=0.5) as wf:
        with pytest.raises(TimeoutError, match="cancelled"):
            wait_for_file(str(tmp_path / "never"))
    assert _job_counts(wf) == {"cancelled": 1}


def test_result_timeout_raises_without_cancelling(tmp_path):
    release = tmp_path / "release"
    with Workflow():
        future = wait_for_file.submit(str(release))
        with pytest.raises(TimeoutError):
            future.result(timeout=0.05)
        release.touch()
        assert future.result(timeout=60) > 0


@pytest.mark.parametrize("delivered_to", ["process", "another thread"])
def test_keyboard_interrupt_in_caller_cancels_outstanding_jobs(tmp_path, delivered_to):
    # "another thread": a process-directed SIGINT may land on any thread (macOS
    # often picks one); the main thread, blocked on its jobs, must still raise.
    pid_file = tmp_path / "job.pid"
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, threading, time
            from idds_fat import work, workflow

            # Ctrl-C raises KeyboardInterrupt, as in a terminal, whatever started the test
            # (a shell's background job or a test runner's worker may ignore SIGINT).
            signal.signal(signal.SIGINT, signal.default_int_handler)

            def interrupt_from_another_thread():
                while not os.path.exists({str(pid_file)!r}):
                    time.sleep(0.01)
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)

            if {delivered_to == "another thread"!r}:
                threading.Thread(target=interrupt_from_another_thread, daemon=True).start()

            @work
            def forever():
                open({str(pid_file)!r}, "w").write(str(os.getpid()))
                time.sleep(600)

            @workflow
            def main():
                try:
                    forever()
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
                    raise

            main()
            """
        )
    )
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def started() -> str | bool:
        assert caller.poll() is None, caller.stderr.read()
        return pid_file.exists() and pid_file.read_text()

    job_pid = int(wait_until(started, "the job's pid"))
    if delivered_to == "process":
        caller.send_signal(signal.SIGINT)
    out, err = caller.communicate(timeout=60)
    assert "interrupted" in out
    assert "KeyboardInterrupt" in err
    wait_until(lambda: not _pid_alive(job_pid), f"the job (pid {job_pid}) to die", timeout=10)


def test_state_on_disk_records_tasks_and_jobs():
    square = work(map_results=True)(lambda x: x * x)
    with Workflow(name="recorded") as wf:
        square(multi_jobs_kwargs_list=[{"x": i} for i in range(3)])
    db = sqlite3.connect(wf.work_dir / "state.sqlite3")
    assert db.execute("SELECT name, status FROM workflow").fetchall() == [("recorded", "finished")]
    assert db.execute("SELECT jobs FROM tasks").fetchall() == [(3,)]
    assert _job_counts(wf) == {"done": 3}
    key_file = wf.work_dir / "hmac.key"
    assert key_file.stat().st_mode & 0o077 == 0
    assert key_file.read_bytes().hex() not in (wf.work_dir / "state.sqlite3").read_bytes().hex()
    # The jobs printed nothing: a warm worker made them no output files (nor dirs).
    assert list((wf.work_dir / "jobs").glob("*/*/stdout.txt")) == []


def test_work_dir_comes_from_configuration(isolated_settings):
    with Workflow() as wf:
        pass
    assert Path(isolated_settings) in wf.work_dir.parents


def test_idds_parameters_are_accepted_and_unused_ones_warned_once(monkeypatch):
    monkeypatch.setattr(options_module, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            Workflow(
                queue="BNL_GPU",
                site="BNL",
                cloud="US",
                core_count=2,
                total_memory=4000,
                max_walltime=3600,
                init_env="source setup.sh",
                container_options={"image": "x"},
                service="panda",
                local=True,
            )
    names = sorted(str(w.message).split(" ")[0] for w in caught)
    assert all(w.category is IgnoredParameterWarning for w in caught)
    assert names == sorted(
        # init_env and container_options are applied by the wrapper on every backend;
        # memory_mb caps a local job's address space.
        ["queue", "site", "cloud", "cores", "service"]
    )


def test_unknown_option_and_backend_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        Workflow(colour="blue")
    with pytest.raises(ConfigError, match="backend = 'moon' from the arguments: expected one of"):
        Workflow(backend="moon")


def test_gpus_are_handed_out_per_job_and_too_many_is_an_error_at_submission():
    @work(gpus=1)
    def visible():
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    @work(gpus=2)
    def both():
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    with Workflow(gpu_devices=("0", "1"), max_workers=2) as wf:
        singles = visible.map([{}] * 4).results(timeout=60)
        assert set(singles) <= {"0", "1"} and len(singles) == 4
        assert sorted(both().split(",")) == ["0", "1"]
        with pytest.raises(ValueError, match="asks for 3 GPU"):
            work(gpus=3)(lambda: None)()
    assert _job_counts(wf) == {"done": 5}


def test_work_resources_override_the_workflows():
    from idds_fat.backends import Resources

    merged = Resources(cores=4, gpus=2).merged(Resources(gpus=1, walltime=5))
    assert merged == Resources(cores=4, gpus=1, walltime=5)


def _wait_until_running(wf: Workflow, count: int = 1) -> None:
    """Wait until ``count`` jobs have been handed to their processes (recorded running)."""
    wait_until(lambda: _job_counts(wf).get("running", 0) >= count, f"{count} job(s) to start")


def _job_counts(wf: Workflow) -> dict[str, int]:
    db = sqlite3.connect(wf.work_dir / "state.sqlite3")
    return dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())


def test_a_detached_caller_exits_while_its_job_runs_on(tmp_path):
    # Issue 17, item 2: the process stayed until the running job ended (20.8 s for a
    # 20 s job). The job writes its pid and then waits for a gate nobody opens.
    pid_file, gate = tmp_path / "pid", tmp_path / "gate"
    script = tmp_path / "detacher.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from idds_fat import Workflow, work
            from idds_fat.testing import wait_until

            @work
            def long():
                open({str(pid_file)!r}, "w").write(str(os.getpid()))
                wait_until(lambda: os.path.exists({str(gate)!r}), "the gate", timeout=600)

            wf = Workflow(max_workers=1, publish_timeout=600).open()
            long.submit()
            wait_until(lambda: os.path.exists({str(pid_file)!r}), "the job to start")
            wf.detach()
            """
        )
    )
    caller = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = caller.communicate(timeout=60)  # a hang guard, not a measurement
        job_pid = int(pid_file.read_text())  # written before the caller detached
        assert caller.returncode == 0, stderr
        assert _pid_alive(job_pid)  # the caller is gone; its job runs on
    finally:
        caller.kill()
        if pid_file.exists():
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # its warm worker's group
