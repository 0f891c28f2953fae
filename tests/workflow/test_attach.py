"""A caller that dies loses nothing: attach from a new process and collect every result."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from idds_fat import IddsFatError, JobLostError, Workflow, work
from idds_fat.backends.local import LocalBackend
from idds_fat.config import load_config
from idds_fat.testing import wait_until
from idds_fat.workdir import WorkDirPaths, WorkflowPaths
from idds_fat.workflow.catalog import WorkflowNotFound
from idds_fat.workflow.state import WorkflowState


def square(x):
    return x * x


def _caller_script(tmp_path, gate, n, local_mode="warm"):
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from idds_fat import Workflow, work

            @work
            def job(i):
                if i >= 2:  # these wait until the test opens the gate
                    from idds_fat.testing import wait_until

                    wait_until(lambda: os.path.exists({str(gate)!r}), "the gate", timeout=120)
                return i * i

            with Workflow(
                name="doomed", max_workers=4, publish_timeout=120, local_mode={local_mode!r}
            ) as wf:
                results = job.map([{{"i": i}} for i in range({n})])
                job.map([{{"i": 100}}])  # queued behind the others: never starts here
                done = 0
                for _ in results.as_completed():
                    done += 1
                    if done == 2:
                        print("ID", wf.id, flush=True)
                results.wait()
            """
        )
    )
    return script


@pytest.mark.slow  # a caller process, five jobs, a kill and an attach: 3-4 s each
@pytest.mark.parametrize("local_mode", ["warm", "cold"])
def test_results_survive_the_caller_being_killed_mid_map(tmp_path, local_mode):
    # Warm workers and cold jobs both hand results straight to a live caller; with
    # the caller gone they must deliver through the service (which attach restarts).
    gate = tmp_path / "gate"
    n = 4  # max_workers=4: jobs 0-3 start; the second task's job is still queued
    caller = subprocess.Popen(
        [sys.executable, str(_caller_script(tmp_path, gate, n, local_mode))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = caller.stdout.readline()
    assert line.startswith("ID "), caller.stderr.read()
    workflow_id = line.split()[1]
    caller.send_signal(signal.SIGKILL)
    caller.wait(timeout=30)
    gate.touch()  # the orphaned jobs finish now, with no caller listening

    with Workflow.attach(workflow_id[:-2]) as wf:  # a unique prefix is enough
        assert wf.id == workflow_id
        tasks = wf.tasks
        assert list(tasks) == ["t0001", "t0002"]
        first, second = tasks.values()
        assert [f.kwargs["i"] for f in first.futures] == list(range(n))
        assert first.results(timeout=120) == [i * i for i in range(n)]
        assert second.results(timeout=120) == [10000]
        assert wf.task_names["t0001"] == "job"
    assert wf.stats["rejected"] == 0


def test_attach_to_an_unknown_workflow_is_a_clear_error():
    # The same lookup, and the same error, as `idds-fat status nope`.
    with pytest.raises(WorkflowNotFound, match="no workflow 'nope' in"):
        Workflow.attach("nope")


def test_attached_workflow_reports_a_job_that_died_meanwhile(tmp_path):
    pid_file = tmp_path / "pid"

    @work
    def dies_later(path):
        open(path, "w").write(str(os.getpid()))
        time.sleep(600)

    wf = Workflow(max_workers=2).open()
    future = dies_later.submit(str(pid_file))
    job_pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the job's pid"))
    # The caller stops following, as if it had died: the job runs on, watched by nobody.
    wf.detach()
    assert not future.done()

    attached = Workflow.attach(wf.id)
    try:
        os.killpg(job_pid, signal.SIGKILL)
        (lost,) = attached.tasks["t0001"].futures
        with pytest.raises(JobLostError, match="no caller was watching"):
            lost.result(timeout=60)
    finally:
        attached.close()


def test_detach_leaves_jobs_running_and_attach_collects_them(tmp_path):
    gate = tmp_path / "gate"
    started = tmp_path / "started"

    @work
    def gated(value):
        started.touch()
        wait_until(gate.exists, "the gate", timeout=120)
        return value

    wf = Workflow(publish_timeout=120).open()
    gated.submit("collected later")
    wait_until(started.exists, "the job to start")
    wf.detach()
    gate.touch()  # the job finishes with nobody listening, and retries its delivery
    with Workflow.attach(wf.id) as again:
        assert again.tasks["t0001"].results(timeout=120) == ["collected later"]


def test_attach_refuses_while_the_original_caller_lives(tmp_path):
    script = tmp_path / "alive.py"
    script.write_text(
        "import sys\nfrom idds_fat import Workflow\n"
        "with Workflow() as wf:\n    print(wf.id, flush=True)\n    sys.stdin.readline()\n"
    )
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        workflow_id = caller.stdout.readline().strip()
        with pytest.raises(IddsFatError, match="still running"):
            Workflow.attach(workflow_id)
        forced = Workflow.attach(workflow_id, force=True)
        forced.detach()
    finally:
        caller.communicate("\n", timeout=60)
    assert caller.returncode == 0


def _workers_of(pid: int) -> list[int]:
    """The pids of the warm workers (``wrapper --worker``) that process ``pid`` started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"--worker" in cmdline:
            found.append(int(entry))
    return found


def _blocked_reading_a_pipe(pid: int) -> bool:
    """Whether process ``pid`` sits in read(2) on a pipe (its caller's end of the protocol)."""
    try:
        fields = open(f"/proc/{pid}/syscall").read().split()
        if fields[0] != "0":  # read(2) on x86_64
            return False
        return os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}").startswith("pipe:")
    except (OSError, IndexError, ValueError):
        return False


@pytest.mark.slow  # 200 jobs, a stopped and killed caller, an attach: ~10 s
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads read(2)'s x86_64 number")
def test_answers_a_stopped_caller_never_read_are_not_lost_when_it_is_killed(tmp_path):
    # Issue 17, item 1: a warm worker's answer sat in its pipe, unread by a caller that
    # was stopped and then killed; the worker took end of input for "delivered" and the
    # job ran but was reported lost. Now an answer counts only once the caller acks it.
    runs = tmp_path / "runs"
    runs.mkdir()
    n = 200
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sqlite3, time
            from idds_fat import Workflow, work
            from idds_fat.testing import wait_until
            from idds_fat.workdir import WorkflowPaths

            @work
            def job(i):
                time.sleep(0.02)
                open(os.path.join({str(runs)!r}, f"{{i}}-{{os.getpid()}}-{{time.time_ns()}}"), "w")
                return i * i

            def handed_over(wf):
                # Read-only: every job's spec key recorded, so a stop now cannot leave
                # a job never submitted (failed by attach: not what this test is about).
                state = WorkflowPaths(wf.work_dir).state.resolve().as_uri() + "?mode=ro"
                db = sqlite3.connect(state, uri=True)
                try:
                    sql = "SELECT COUNT(*) FROM jobs WHERE task = 't0001' AND spec IS NULL"
                    return db.execute(sql).fetchone()[0] == 0
                finally:
                    db.close()

            with Workflow(name="stopped", max_workers=4, publish_timeout=120) as wf:
                results = job.map([{{"i": i}} for i in range({n})])
                for done, _ in enumerate(results.as_completed(), 1):
                    if done == 20:
                        wait_until(lambda: handed_over(wf), "the whole task handed over")
                        print("ID", wf.id, flush=True)
            """
        )
    )
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = caller.stdout.readline()
    assert line.startswith("ID "), caller.stderr.read()
    workflow_id = line.split()[1]
    caller.send_signal(signal.SIGSTOP)
    workers = wait_until(lambda: _workers_of(caller.pid), "the caller's warm workers")
    # Each worker finishes its job and answers into its pipe, which nobody reads now.
    wait_until(lambda: all(_blocked_reading_a_pipe(w) for w in workers), "every worker to answer")
    assert len(os.listdir(runs)) < n  # stopped mid-map
    caller.send_signal(signal.SIGKILL)
    caller.wait(timeout=30)

    with Workflow.attach(workflow_id) as wf:
        values = wf.tasks["t0001"].results(timeout=180)
    assert values == [i * i for i in range(n)]  # 200 of 200: none lost
    runs_per_job = [name.split("-")[0] for name in os.listdir(runs)]
    assert len(runs_per_job) == len(set(runs_per_job)) == n  # none run twice
    assert wf.stats["rejected"] == 0


def _handed_over(workflow_id: str) -> bool:
    """Whether every job of the workflow's first task has its spec key recorded (read-only)."""
    state = WorkDirPaths(load_config().work_dir).workflow(workflow_id).state
    db = sqlite3.connect(state.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        sql = "SELECT COUNT(*) FROM jobs WHERE task = 't0001' AND spec IS NULL"
        return db.execute(sql).fetchone()[0] == 0
    finally:
        db.close()


@pytest.mark.slow  # a caller killed mid-map, an attach, nine jobs: 4-8 s
@pytest.mark.parametrize("local_mode", ["warm", "cold"])
def test_a_job_a_killed_caller_handed_over_but_never_recorded_is_followed_not_run_again(
    tmp_path, local_mode
):
    # The caller dies between handing job 1 to a process (a warm worker's pipe, a cold
    # job's Popen) and recording that it started: its record says queued while the
    # process runs it. Held at that point here (the stopped-caller test's flake), the
    # job held at a gate until attach has decided: attach must follow that process,
    # which delivers the result itself, and not run the job again.
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    n = 9  # one over the first chunk: a long task
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, threading
            from idds_fat import Workflow, work
            from idds_fat.testing import wait_until
            from idds_fat.workflow.tracker import JobTracker

            record_start = JobTracker.job_started

            def job_started(self, job, ref):
                if job.job_id == "t0001/1":  # handed over, its start not recorded
                    # The task is recorded once its first chunk's specs are stored,
                    # which may come after a warm worker took job 1.
                    wait_until(lambda: self._parts.state.tasks(), "the task's record")
                    print("ID", self._parts.workflow_id, flush=True)
                    threading.Event().wait()
                record_start(self, job, ref)

            JobTracker.job_started = job_started

            @work
            def job(i):
                open(os.path.join({str(runs)!r}, f"{{i}}-{{os.getpid()}}"), "w")
                if i == 1:
                    wait_until(lambda: os.path.exists({str(gate)!r}), "the gate", timeout=120)
                return i * i

            with Workflow(
                name="gap", max_workers=1, publish_timeout=120, local_mode={local_mode!r}
            ) as wf:
                job.map([{{"i": i}} for i in range({n})]).wait()
            """
        )
    )
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = caller.stdout.readline()
        assert line.startswith("ID "), caller.stderr.read()
        workflow_id = line.split()[1]
        wait_until(lambda: _handed_over(workflow_id), "every spec key recorded")
        # Started: a warm worker names it in its spool first (attach reads that).
        wait_until(lambda: any(n.startswith("1-") for n in os.listdir(runs)), "job 1 to run")
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=30)

        with Workflow.attach(workflow_id, local_mode=local_mode) as wf:
            state = WorkflowState(WorkflowPaths(wf.work_dir).state)
            try:
                [(_, _, jobs)] = state.tasks()
            finally:
                state.close()
            assert jobs[1][3] == "running"  # followed: recorded running by attach itself
            gate.touch()  # only now does job 1 end, and its process deliver its result
            values = wf.tasks["t0001"].results(timeout=120)
    finally:
        caller.kill()  # held in the gap for good, should the test fail before its kill
        caller.wait(timeout=30)
        gate.touch()  # and the job at the gate ends
    assert values == [i * i for i in range(n)]
    runs_per_job = sorted(int(name.split("-")[0]) for name in os.listdir(runs))
    assert runs_per_job == list(range(n))  # job 1 ran once, in the earlier caller's process
    assert wf.stats["rejected"] == 0


@pytest.mark.slow  # two jobs, a detach, the CLI attaching with a 3 s timeout
def test_results_with_a_timeout_exits_at_it_while_the_jobs_it_started_run_on(tmp_path):
    # Issue 17, item 2: `idds-fat results --timeout 3` was still running at 45 s: the
    # job it started itself (one that never started before) held the process.
    gate = tmp_path / "gate"
    script = tmp_path / "detacher.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from idds_fat import Workflow, work
            from idds_fat.testing import wait_until

            @work
            def gated(i):
                open(os.path.join({str(tmp_path)!r}, f"pid-{{i}}"), "w").write(str(os.getpid()))
                wait_until(lambda: os.path.exists({str(gate)!r}), "the gate", timeout=600)
                return i

            wf = Workflow(max_workers=1, publish_timeout=600).open()
            gated.map([{{"i": 0}}, {{"i": 1}}])  # one worker: job 1 never starts here
            wait_until(lambda: os.path.exists({str(tmp_path / "pid-0")!r}), "the first job")
            wf.detach()
            print(wf.id, flush=True)
            """
        )
    )
    caller = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert caller.returncode == 0, caller.stderr
    workflow_id = caller.stdout.strip()
    first = int((tmp_path / "pid-0").read_text())
    pids = [first]
    try:
        cli = os.path.join(os.path.dirname(sys.executable), "idds-fat")
        command = [cli, "results", workflow_id, "--timeout", "3"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        second = (tmp_path / "pid-1").read_text()  # the CLI started it
        pids.append(int(second))
        assert done.returncode == 1, done.stderr  # the documented status of a timeout
        assert "unfinished after 3 s; still running" in done.stderr
        assert not gate.exists() and all(_alive(pid) for pid in pids)  # both run on
    finally:
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_attach_fails_the_jobs_a_killed_caller_never_submitted_and_follows_the_others(
    tmp_path, monkeypatch
):
    # A caller killed while handing a long task over leaves its later jobs recorded
    # queued with no spec key (runtime.Workflow._submit_rest): written here as it
    # leaves them, beside a task that ran whole.
    wf = Workflow(max_workers=2, progress=False, source_dir=False).open()
    assert wf.map_kwargs(square, [{"x": x} for x in range(3)]).results(timeout=60) == [0, 1, 4]
    wf.detach()
    assert wf.work_dir is not None
    state = WorkflowState(WorkflowPaths(wf.work_dir).state)
    state.record_task(
        "t0002", "square", "square", [(i, f"square[{i}]", None) for i in range(2)], ["x=1", "x=2"]
    )
    state.close()
    submitted: list[str] = []
    submit = LocalBackend.submit

    def noting(self, jobs):
        submitted.extend(job.job_id for job in jobs)
        submit(self, jobs)

    monkeypatch.setattr(LocalBackend, "submit", noting)
    with Workflow.attach(wf.id) as attached:
        assert attached.tasks["t0001"].results(timeout=60) == [0, 1, 4]
        unsubmitted = attached.tasks["t0002"].futures
        assert [f.arguments for f in unsubmitted] == ["x=1", "x=2"]
        for future in unsubmitted:  # settled before attach returned: never pending
            assert future.done()
            with pytest.raises(JobLostError, match="never submitted.*submit it again"):
                future.result(timeout=0)
    assert not [job_id for job_id in submitted if job_id.startswith("t0002/")]  # never rerun
    state = WorkflowState(WorkflowPaths(wf.work_dir).state)
    try:
        [_, (_, _, jobs)] = state.tasks()
        assert [job[3] for job in jobs] == ["lost", "lost"]
    finally:
        state.close()


@pytest.mark.slow  # 5,000 calls, a caller killed while it submits them, an attach: ~4 s
def test_a_caller_killed_while_a_long_map_is_handed_over_loses_no_trace_of_a_job(tmp_path):
    n = 5000
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from idds_fat import Workflow
            from idds_fat.workflow.specs import JobSpecs

            build = JobSpecs.build

            def slow_build(self, task_id, index, *args):
                if index >= 8:  # the later chunks take ~10 s to hand over
                    time.sleep(0.002)
                return build(self, task_id, index, *args)

            JobSpecs.build = slow_build

            def square(x):
                return x * x

            with Workflow(name="submitting", max_workers=2, publish_timeout=120,
                          source_dir=False) as wf:
                futures = wf.map_kwargs(square, [{{"x": x}} for x in range({n})]).futures
                futures[0].result(timeout=60)
                print("ID", wf.id, flush=True)
                futures[-1].result()
            """
        )
    )
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = caller.stdout.readline()
    assert line.startswith("ID "), caller.stderr.read()
    workflow_id = line.split()[1]
    caller.send_signal(signal.SIGKILL)
    caller.wait(timeout=30)
    state = WorkflowState(WorkDirPaths(load_config().work_dir).workflow(workflow_id).state)
    try:
        [(_, _, before)] = state.tasks()
    finally:
        state.close()
    keyed = {job[0] for job in before if job[2]}
    unkeyed_queued = {job[0] for job in before if not job[2] and job[3] == "queued"}
    assert len(before) == n  # every job recorded before any was handed over
    assert set(range(8)) <= keyed and unkeyed_queued  # killed mid-submission

    with Workflow.attach(workflow_id) as wf:
        futures = wf.tasks["t0001"].futures
        wait_until(lambda: all(f.done() for f in futures), "every future to settle", 180)
    lost = set()
    for future in futures:
        if future.exception() is None:
            assert future.result() == future.job**2
        else:
            assert isinstance(future.exception(), JobLostError), future.exception()
            lost.add(future.job)
    assert lost and lost <= set(range(n)) - keyed  # a job with its spec stored is followed
    assert all(
        "never submitted" in str(f.exception())
        for f in futures
        if f.job in unkeyed_queued and f.exception()
    )
