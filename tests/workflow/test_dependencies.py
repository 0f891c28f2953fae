"""Futures as arguments: a call waits for the jobs whose futures it takes, then runs with
their values (idds_fat/workflow/dependencies.py), on the local backend."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from idds_fat import DependencyError, MapResult, Workflow, work
from idds_fat.cli import main
from idds_fat.testing import wait_until
from idds_fat.workflow import catalog
from idds_fat.workflow.dependencies import inputs_of, substitute


@work
def inc(x):
    return x + 1


@work
def add(a, b):
    return a + b


def gated(value, path):
    """Return ``value`` once ``path`` exists: a job the test lets finish when it wants."""
    from idds_fat.testing import wait_until

    wait_until(lambda: os.path.exists(path), path, 120)
    return value


def ran(tag, log_dir, *inputs):
    """Leave a mark that job ``tag`` ran; return its tag and its inputs."""
    with open(os.path.join(log_dir, tag), "w"):
        pass
    return [tag, *inputs]


def fails(tag, log_dir, *inputs):
    ran(tag, log_dir, *inputs)
    raise ValueError(f"{tag} broke")


def structure(*args, **kwargs):
    return args, kwargs


Point = collections.namedtuple("Point", "x y")


def _job_states(wf, task):
    return {j.index: j for j in catalog.job_summaries(wf.config.work_dir, wf.id, task)}


def test_diamond_is_submitted_at_once_and_runs_without_the_caller_waiting(tmp_path):
    gate = str(tmp_path / "gate")
    with Workflow(backend="local") as wf:
        a = wf.submit(gated, 1, gate)
        b = inc.submit(a)
        c = add.submit(a, 10)
        d = add.submit(b, c)
        # submit returned while a still runs: b, c and d wait for it, unsubmitted.
        assert not a.done() and not d.done()
        assert _job_states(wf, d.task_id)[0].status == "waiting"
        assert _job_states(wf, d.task_id)[0].dependencies == [
            f"{b.task_id}/0",
            f"{c.task_id}/0",
        ]
        open(gate, "w").close()
        assert d.result(60) == (1 + 1) + (1 + 10)
        # The caller records a job's end just after its future settles.
        wait_until(lambda: _job_states(wf, d.task_id)[0].status == "done", "d recorded done")


def test_a_chain_of_fifty_runs_to_its_end():
    with Workflow(backend="local") as wf:
        first = last = wf.submit(inc.fn, 0)
        for _ in range(49):
            last = inc.submit(last)
        assert last.result(120) == 50
        assert first.result() == 1


def test_futures_nested_in_containers_are_replaced_by_their_values():
    with Workflow(backend="local") as wf:
        one, two = inc.submit(0), inc.submit(1)
        many = inc.map([{"x": i} for i in range(3)])
        assert isinstance(many, MapResult)
        nested = wf.submit(
            structure,
            [one, (two, {"deep": [one]})],
            Point(one, 5),
            {one, 7},
            collections.OrderedDict(k=two),
            many,
            key={"list": [two, many]},
        )
        args, kwargs = nested.result(60)
        assert args == (
            [1, (2, {"deep": [1]})],
            (1, 5),
            {1, 7},
            collections.OrderedDict(k=2),
            [1, 2, 3],
        )
        assert type(args[1]).__name__ == "Point" and isinstance(args[3], collections.OrderedDict)
        assert kwargs == {"key": {"list": [2, [1, 2, 3]]}}


def test_every_call_form_takes_futures():
    with Workflow(backend="local") as wf:
        one = inc.submit(0)
        assert add(one, 1) == 2  # the blocking call
        mapped = add.map([{"a": one}, {"a": inc.submit(one)}], b=one)  # entries and common
        assert mapped.results(60) == [2, 3]
        assert list(wf.map(add, [one, one], [inc.submit(1), 3])) == [3, 4]  # Executor.map
        assert wf.map_kwargs(add, [{"a": one}], b=10).results(60) == [11]
        assert add(*[one], b=MapResult([one])[0]) == 2  # a value taken from a future is a value


def test_a_failing_middle_job_fails_exactly_its_descendants(tmp_path):
    log = str(tmp_path / "ran")
    os.mkdir(log)
    with Workflow(backend="local") as wf:
        a = wf.submit(ran, "a", log)
        b = wf.submit(fails, "b", log, a)
        c = wf.submit(ran, "c", log, b)
        d = wf.submit(ran, "d", log, c)
        e = wf.submit(ran, "e", log, a)
        f = wf.submit(ran, "f", log, [b, e])
        g = wf.submit(ran, "g", log)
        concurrent.futures.wait([a, b, c, d, e, f, g], timeout=60)
    assert sorted(os.listdir(log)) == ["a", "b", "e", "g"]  # c, d and f never ran
    assert a.result() == ["a"] and e.result() == ["e", ["a"]] and g.result() == ["g"]
    with pytest.raises(ValueError, match="b broke"):
        b.result()
    for dependent in (c, d, f):
        error = dependent.exception()
        assert isinstance(error, DependencyError)
        assert error.failed_job.endswith("fails[0]") and error.failed_job.startswith(b.task_id)
        assert "ValueError: b broke" in str(error)
    assert c.exception().__cause__ is b.exception()
    assert d.exception().__cause__ is c.exception()  # the chain of causes goes back to b
    assert d.exception().dependency.startswith(c.task_id)
    assert _job_states(wf, d.task_id)[0].status == "failed"
    assert "DependencyError" in _job_states(wf, d.task_id)[0].error


def test_cancelling_a_job_cancels_what_depends_on_it(tmp_path):
    gate = str(tmp_path / "gate")
    with Workflow(backend="local") as wf:
        a = wf.submit(gated, 1, gate)
        b = inc.submit(a)
        c = inc.submit(b)
        d = add.submit(a, 1)
        other = inc.submit(inc.submit(5))
        assert b.cancel()  # a waiting job has not started: cancel() takes it back
        assert b.cancelled() and c.cancelled()
        assert not d.done() and not a.done()
        wait_until(a.running, "a to start", 60)
        assert a.kill()  # a running job: kill() stops it, and what waits for it
        assert d.cancelled()
        assert other.result(60) == 7
        states = _job_states(wf, c.task_id)[0].status, _job_states(wf, d.task_id)[0].status
        assert states == ("cancelled", "cancelled")


def test_closing_with_cancel_cancels_the_waiting_jobs(tmp_path):
    gate = str(tmp_path / "gate")
    wf = Workflow(backend="local").open()
    a = wf.submit(gated, 1, gate)
    b = inc.submit(a)
    wf.close(cancel=True)
    assert a.cancelled() and b.cancelled()


def test_a_value_too_large_to_travel_fails_its_dependent_with_argument_error():
    from idds_fat import ArgumentError

    with Workflow(backend="local", max_argument_bytes=4096) as wf:
        big = wf.submit(bytes, 100_000)
        small = wf.submit(len, big)
        with pytest.raises(ArgumentError):
            small.result(60)


def test_status_json_shows_the_waiting_state_and_the_dependencies(tmp_path):
    gate = str(tmp_path / "gate")
    with Workflow(backend="local") as wf:
        a = wf.submit(gated, 1, gate)
        b = add.submit(a, a)
        answer = CliRunner().invoke(
            main,
            ["status", wf.id, b.task_id, "--json", "--work-dir", str(wf.config.work_dir)],
            catch_exceptions=False,
        )
        job = json.loads(answer.output)["jobs"][0]
        assert (job["status"], job["depends"]) == ("waiting", [f"{a.task_id}/0"])
        open(gate, "w").close()
        assert b.result(60) == 2


def test_inputs_and_substitution_walk_containers_without_a_workflow():
    from idds_fat.results import AsyncResult

    f = AsyncResult("t", 0)
    f.set_result(3)
    value = {"a": [f, (f, {f})], "b": Point(f, 1)}
    assert inputs_of(value, [f]) == [f]
    assert substitute(value, lambda x: x.result()) == {"a": [3, (3, {3})], "b": Point(3, 1)}
    untouched = [1, [2]]
    assert substitute(untouched, lambda x: None) is untouched


_BY_REFERENCE = textwrap.dedent(
    """
    import json, resource, sys
    from idds_fat import Workflow

    def make(n):
        return b"x" * n

    def size(data):
        return len(data)

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n = 100 * 1024 * 1024
    with Workflow(backend="local", max_workers=1) as wf:
        wf.submit(size, b"warm-up").result(120)  # imports and workers, before measuring
        before = peak_mb()
        big = wf.submit(make, n)
        measured = wf.submit(size, big)
        value = measured.result(300)
        reference = big.reference()
        after = peak_mb()
    print(json.dumps({"value": value, "before": before, "after": after,
                      "by_reference": reference is not None}))
    """
)


def test_a_large_result_reaches_its_dependent_without_entering_the_caller(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(_BY_REFERENCE)
    env = {**os.environ, "IDDS_FAT_WORK_DIR": str(tmp_path / "work")}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["value"] == 100 * 1024 * 1024
    assert answer["by_reference"]
    # Fetched into the caller, the value alone would raise its peak by 100 MB.
    assert answer["after"] - answer["before"] < 40, answer


def test_a_diamond_then_a_chain_of_fifty_run_on_slurm(slurm_env, tmp_path):
    log = str(tmp_path / "ran")
    os.mkdir(log)
    settings = {"backend": "slurm", "slurm_poll_min": 0.3, "slurm_poll_max": 1.0}
    with Workflow(**settings) as wf:
        a = inc.submit(1)
        b = inc.submit(a)
        c = add.submit(a, 10)
        d = add.submit(b, c)
        last = d
        for _ in range(50):
            last = inc.submit(last)
        broken = wf.submit(fails, "x", log, d)
        after = wf.submit(ran, "y", log, broken)
        assert not last.done()  # every submit returned before the first job ended
        assert d.result(600) == 3 + 12
        assert last.result(1800) == 15 + 50
        assert isinstance(after.exception(600), DependencyError)
    assert os.listdir(log) == ["x"]


def test_outside_a_workflow_futures_are_taken_as_their_values():
    one = inc.submit(0)  # no workflow: runs in-process, a completed AsyncResult
    assert add(one, [one][0]) == 2
    assert add.submit(inc.submit(one), b=one).result() == 3
    assert add.map([{"a": one}], b=MapResult([one])[0]).results() == [2]
