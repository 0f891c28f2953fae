"""Futures as arguments on the real Slurm: dependents go to Slurm at once with
``--dependency=afterok:`` on their inputs' array elements, and each node reads its
inputs' results from the REST store itself (idds_fat/workflow/dependencies.py,
``SlurmBackend.submit_after``, ``RESULT_OF`` in idds_fat/node/run.py)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess

import pytest

from idds_fat import DependencyError, JobLostError, Workflow, work
from idds_fat.service import EmbeddedService
from idds_fat.testing import wait_until
from idds_fat.workflow import catalog

pytestmark = pytest.mark.timeout(600)


def _settings(**extra):
    return {"backend": "slurm", "slurm_poll_min": 0.3, "slurm_poll_max": 1.0, **extra}


@work
def inc(x):
    return x + 1


def gated(value, path):
    """Return ``value`` once ``path`` exists: a job the test lets finish when it wants."""
    from idds_fat.testing import wait_until

    wait_until(lambda: os.path.exists(path), path, 300)
    return value


def padded(x):
    return str(x) * 5000  # over result_inline_bytes below: it travels by reference


def ran(tag, log_dir, *inputs):
    """Leave a mark that job ``tag`` ran; return its tag and its inputs."""
    with open(os.path.join(log_dir, tag), "w"):
        pass
    return [tag, *inputs]


def fails(tag, log_dir, *inputs):
    ran(tag, log_dir, *inputs)
    raise ValueError(f"{tag} broke")


def _refs(wf, futures):
    """The Slurm array element (``ARRAY_INDEX``) the state record holds for each future."""
    recorded = {
        (task, index): ref
        for task, _, jobs in wf.parts.state.tasks()
        for index, _, _, _, _, ref, _ in jobs
    }
    return [recorded.get((f.task_id, f.job)) for f in futures]


def _status(wf, future):
    """The status the workflow's record holds for ``future``'s job."""
    jobs = catalog.job_summaries(wf.config.work_dir, wf.id, future.task_id)
    return next(j.status for j in jobs if j.index == future.job)


def _squeue(elements):
    """``{element: (state, reason, dependency)}`` of these elements still in Slurm's queue."""
    arrays = sorted({e.partition("_")[0] for e in elements})
    listing = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i|%T|%r|%E", "-j", ",".join(arrays)],
        capture_output=True,
        text=True,
    ).stdout
    rows = (line.split("|") for line in listing.splitlines() if line.count("|") == 3)
    return {row[0]: tuple(row[1:]) for row in rows if row[0] in elements}


def test_a_chain_goes_to_slurm_at_once_and_runs_with_the_caller_submitting_nothing(
    slurm_env, tmp_path
):
    gate = str(tmp_path / "gate")
    with Workflow(**_settings(result_inline_bytes=1000)) as wf:
        root = wf.submit(gated, 7, gate)
        b = inc.submit(root)
        c = wf.submit(padded, b)  # 5,000 characters: stored in the cache, by reference
        d = wf.submit(len, c)
        e = inc.submit(d)
        chain = [root, b, c, d, e]
        # Every dependent is in Slurm while the root still runs: PENDING on its input.
        wait_until(lambda: all(_refs(wf, chain)), what="the whole chain to be in Slurm")
        refs = _refs(wf, chain)
        wait_until(
            lambda: [r for _, r, _ in _squeue(refs[1:]).values()] == ["Dependency"] * 4,
            what="Slurm to hold each dependent for its input",
        )
        queued = _squeue(refs[1:])
        assert not root.done()
        for ref, before in zip(refs[1:], refs, strict=False):
            state, _, dependency = queued[ref]
            assert state == "PENDING"
            assert dependency == f"afterok:{before}(unfulfilled)"
        open(gate, "w").close()
        assert e.result(600) == 5000 + 1
        assert c.reference() is not None  # c's value did travel by reference
    assert wf.dependents.counts() == {"held": 4, "released": 0, "followed": 4}


def test_with_slurm_afterok_off_the_caller_submits_each_link(slurm_env):
    with Workflow(**_settings(slurm_afterok=False)) as wf:
        last = inc.submit(0)
        for _ in range(2):
            last = inc.submit(last)
        assert last.result(600) == 3
    assert wf.dependents.counts() == {"held": 2, "released": 2, "followed": 0}


def test_a_failing_input_fails_exactly_its_descendants_on_slurm(slurm_env, tmp_path):
    log = str(tmp_path / "ran")
    os.mkdir(log)
    with Workflow(**_settings()) as wf:
        a = wf.submit(ran, "a", log)
        b = wf.submit(fails, "b", log, a)
        c = wf.submit(ran, "c", log, b)
        d = wf.submit(ran, "d", log, c)
        e = wf.submit(ran, "e", log, a)
        f = wf.submit(ran, "f", log, [b, e])
        everything = [a, b, c, d, e, f]
        concurrent.futures.wait(everything, timeout=600)
        assert wf.dependents.counts()["followed"] >= 4
        elements = [r for r in _refs(wf, [c, d, f]) if r]
        # Withdrawn from Slurm (or ended there): none waits for an input that failed.
        wait_until(lambda: not _squeue(elements), what="the failed inputs' dependents to leave")
    assert sorted(os.listdir(log)) == ["a", "b", "e"]  # c, d and f never ran
    assert e.result() == ["e", ["a"]]
    with pytest.raises(ValueError, match="b broke"):
        b.result()
    for dependent in (c, d, f):
        error = dependent.exception()
        assert isinstance(error, DependencyError)
        assert error.failed_job.startswith(b.task_id)
        assert "ValueError: b broke" in str(error)
    assert [_status(wf, x) for x in (c, d, f)] == ["failed"] * 3


def test_an_input_killed_in_slurm_fails_its_dependents_and_withdraws_them(slurm_env, tmp_path):
    gate = str(tmp_path / "never")
    with Workflow(**_settings()) as wf:
        root = wf.submit(gated, 1, gate)
        b = inc.submit(root)
        c = inc.submit(b)
        wait_until(lambda: all(_refs(wf, [root, b, c])), what="the chain to be in Slurm")
        root_ref, *dependents = _refs(wf, [root, b, c])
        subprocess.run(["scancel", root_ref], check=True)  # Slurm kills it: no result
        assert isinstance(c.exception(300), DependencyError)
        wait_until(lambda: not _squeue(dependents), what="the dependents to leave Slurm")
    assert isinstance(root.exception(), JobLostError)
    assert isinstance(b.exception(), DependencyError)


def test_cancelling_an_input_cancels_its_dependents_in_slurm(slurm_env, tmp_path):
    gate = str(tmp_path / "never")
    with Workflow(**_settings()) as wf:
        root = wf.submit(gated, 1, gate)
        b = inc.submit(root)
        c = inc.submit(b)
        wait_until(lambda: all(_refs(wf, [root, b, c])), what="the chain to be in Slurm")
        elements = _refs(wf, [root, b, c])
        assert root.kill()
        wait_until(lambda: b.cancelled() and c.cancelled(), what="the dependents to be cancelled")
        wait_until(lambda: not _squeue(elements), what="scancel to take effect")
    assert [_status(wf, x) for x in (root, b, c)] == ["cancelled"] * 3


def test_a_detached_chain_runs_to_its_end_in_slurm_and_a_later_attach_gets_it(slurm_env, tmp_path):
    gate = str(tmp_path / "gate")
    # A service of its own (as `idds-fat serve`): results have somewhere to go while
    # no process follows the workflow.
    with EmbeddedService(tmp_path / "service", token="t0ken-for-test") as service:
        settings = _settings(service_url=service.url, token="t0ken-for-test")
        wf = Workflow(**settings).open()
        root = wf.submit(gated, 1, gate)
        chain = [root]
        for _ in range(3):
            chain.append(inc.submit(chain[-1]))
        wait_until(lambda: all(_refs(wf, chain)), what="the chain to be in Slurm")
        elements = _refs(wf, chain)
        wf.detach()  # nobody follows the workflow: Slurm alone moves the chain on
        open(gate, "w").close()
        wait_until(lambda: not _squeue(elements), "the whole chain to end in Slurm", 300)
        again = Workflow.attach(wf.id, **settings)
        try:
            assert again.tasks[chain[-1].task_id].results(timeout=60) == [4]
        finally:
            again.close()
