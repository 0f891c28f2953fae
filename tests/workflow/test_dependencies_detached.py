"""A graph of futures submitted through a driver (``Workflow(func=...).submit()``) keeps
running after its caller has exited; a new process attaches for its value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from idds_fat.testing import wait_until
from idds_fat.workflow import catalog

PROGRAM = '''
"""Submit a body that builds a diamond of futures, print the id, and leave."""
import json
import os
import sys

from idds_fat import Workflow, work


@work
def gated(value, path):
    from idds_fat.testing import wait_until

    wait_until(lambda: os.path.exists(path), path, 300)
    return value


@work
def inc(x):
    return x + 1


@work
def add(a, b):
    return a + b


def diamond(gate):
    a = gated.submit(1, gate)  #     a
    b = inc.submit(a)  #           /   \\
    c = add.submit(a, 10)  #      b     c
    d = add.submit(b, c)  #        \\   /
    return d.result(), os.getpid()  # d


if __name__ == "__main__":
    wf = Workflow(func=diamond, args=(sys.argv[1],))
    wf.submit()
    print(json.dumps({"id": wf.id, "caller_pid": os.getpid()}), flush=True)
'''

ATTACH = """
import json
import sys

from idds_fat import Workflow

print(json.dumps({"value": Workflow.attach(sys.argv[1]).get_result(timeout=300)}))
"""


def _run(directory: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, *args], cwd=directory, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_diamond_submitted_through_a_driver_outlives_its_caller(tmp_path):
    (tmp_path / "program.py").write_text(textwrap.dedent(PROGRAM))
    (tmp_path / "attach.py").write_text(textwrap.dedent(ATTACH))
    gate = tmp_path / "gate"
    submitted = _run(tmp_path, "program.py", str(gate))  # the caller has exited here
    # The driver's body built the diamond: d waits for b and c, the caller is gone.
    work_dir = Path(os.environ["IDDS_FAT_WORK_DIR"])

    def d_status():
        try:
            return [j.status for j in catalog.job_summaries(work_dir, submitted["id"], "t0004")]
        except LookupError:
            return []

    wait_until(lambda: d_status() == ["waiting"], what="the driver to submit the diamond")
    gate.touch()  # only now may its first job end
    outcome = _run(tmp_path, "attach.py", submitted["id"])
    value, driver_pid = outcome["value"]
    assert value == (1 + 1) + (1 + 10)
    assert driver_pid != submitted["caller_pid"]
