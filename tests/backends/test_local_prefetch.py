"""A warm worker gets its next job before the caller has recorded the last one (issue 18)."""

from __future__ import annotations

import json
import os
import time

from idds_fat import Workflow, work
from idds_fat.testing import wait_until
from idds_fat.testing.bare_worker import start_bare_worker


@work
def gated(gate=None, x=0):
    # Waits for the test to open the gate: the test, not a sleep, decides when it ends.
    deadline = time.monotonic() + 60
    while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid(), x


def test_a_warm_worker_gets_its_next_job_before_the_last_one_is_recorded(tmp_path):
    gate = tmp_path / "gate"
    seen: list[bool] = []
    with Workflow(max_workers=1, progress=False) as wf:
        first, second = gated.map([{"gate": str(gate), "x": 0}, {"x": 1}]).futures

        def while_recording(_future) -> None:
            # This runs while the caller records the first job's end, before the worker
            # is acked: with the worker waiting on that, the second job could not start.
            try:
                seen.append(wait_until(second.running, "the second job to start", timeout=30))
            except TimeoutError:
                seen.append(False)

        first.add_done_callback(while_recording)
        gate.touch()
        (pid0, x0), (pid1, x1) = first.result(timeout=60), second.result(timeout=60)
    assert seen == [True]
    assert (x0, x1) == (0, 1) and pid0 == pid1  # one worker ran both
    assert wf.stats["local"] == 2 and wf.stats["duplicates"] == 0


def test_a_warm_worker_takes_acks_after_the_next_command_and_ends_at_end_of_input(tmp_path):
    # No job here: the protocol alone. An ack with nothing to acknowledge is ignored,
    # a command after it is run, and end of input ends the worker with status 0.
    worker = start_bare_worker(tmp_path)
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(json.dumps({"ack": True}) + "\n")
    missing = {"spec": str(tmp_path / "no-spec.json"), "workdir": str(tmp_path / "j0")}
    worker.stdin.write(json.dumps(missing) + "\n")
    worker.stdin.flush()
    answer = json.loads(worker.stdout.readline())
    assert answer["exit"] != 0 and "result" not in answer  # the spec cannot be read
    worker.stdin.close()
    assert worker.wait(timeout=60) == 0
