"""A remote traceback names the user's file and shows the raising line.

cloudpickle 3.1 and later write ``co_filename = "<dynamic-code>"`` into code it
pickles by value; idds-fat keeps the file name and ships the source, and these
tests hold that under the oldest and the newest cloudpickle we support.
"""

from __future__ import annotations

import json
import linecache
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest

from idds_fat import RemoteTraceback, Workflow, work

# The oldest release pyproject admits; the newest is whatever the lock installs.
OLDEST_CLOUDPICKLE = "3.0.0"

HELPER = textwrap.dedent(
    """\
    def explode(x):
        doubled = x * 2
        raise RuntimeError(f"helper exploded on {doubled}")
    """
)

SCRIPT = textwrap.dedent(
    """\
    import json
    import sys

    import cloudpickle

    import helper
    from idds_fat import Workflow, work


    @work
    def fails_in_main(x):
        y = x + 1
        raise ValueError(f"main failed with {y}")


    @work
    def fails_in_helper(x):
        return helper.explode(x)


    report = {"cloudpickle": cloudpickle.__version__}
    with Workflow(source_dir="."):
        for fn in (fails_in_main, fails_in_helper):
            try:
                fn(1)
            except Exception as exc:
                report[fn.__name__] = exc.__cause__.tb
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def oldest_cloudpickle(tmp_path_factory) -> Path:
    """A directory holding cloudpickle OLDEST_CLOUDPICKLE, to put first on PYTHONPATH."""
    target = tmp_path_factory.mktemp(f"cloudpickle-{OLDEST_CLOUDPICKLE}")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
        + [str(target), f"cloudpickle=={OLDEST_CLOUDPICKLE}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"cannot install cloudpickle {OLDEST_CLOUDPICKLE}: {done.stderr}"
    return target


def _line_of(text: str, source: str) -> int:
    return next(n for n, line in enumerate(source.splitlines(), 1) if text in line)


def _run_script(tmp_path: Path, pythonpath: Path | None) -> dict:
    source = tmp_path / "project"
    source.mkdir()
    (source / "helper.py").write_text(HELPER)
    (source / "main_script.py").write_text(SCRIPT)
    env = dict(os.environ)
    if pythonpath is not None:
        # Jobs inherit the caller's environment, so the node gets the same cloudpickle.
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "main_script.py"],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["source"] = str(source.resolve())
    return report


@pytest.mark.slow
@pytest.mark.parametrize("which", ["installed", "oldest"])
def test_traceback_names_main_script_and_source_dir_module_with_their_lines(
    which, tmp_path, request
):
    pythonpath = request.getfixturevalue("oldest_cloudpickle") if which == "oldest" else None
    report = _run_script(tmp_path, pythonpath)
    expected = OLDEST_CLOUDPICKLE if which == "oldest" else cloudpickle.__version__
    assert report["cloudpickle"] == expected

    in_main = report["fails_in_main"]
    line = _line_of("raise ValueError", SCRIPT)
    assert f'File "{report["source"]}/main_script.py", line {line}, in fails_in_main' in in_main
    assert 'raise ValueError(f"main failed with {y}")' in in_main
    assert "<dynamic-code>" not in in_main

    in_helper = report["fails_in_helper"]
    line = _line_of("return helper.explode", SCRIPT)
    assert f'File "{report["source"]}/main_script.py", line {line}, in fails_in_helper' in in_helper
    assert f'File "{report["source"]}/helper.py", line 3, in explode' in in_helper
    assert 'raise RuntimeError(f"helper exploded on {doubled}")' in in_helper


def test_notebook_cell_lines_come_from_the_caller_not_the_nodes_disk():
    # A notebook cell exists in no file: IPython keeps its text in linecache, as here.
    cell = "/nonexistent/ipykernel_1/cell_7.py"
    code = "def fails_in_cell(n):\n    total = n * 3\n    raise KeyError(f'cell says {total}')\n"
    linecache.cache[cell] = (len(code), None, code.splitlines(keepends=True), cell)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(code, cell, "exec"), namespace)
        with Workflow():
            with pytest.raises(KeyError, match="cell says 6") as info:
                work(namespace["fails_in_cell"])(2)
    finally:
        linecache.cache.pop(cell, None)
    remote = info.value.__cause__
    assert isinstance(remote, RemoteTraceback)
    assert f'File "{cell}", line 3, in fails_in_cell' in remote.tb
    assert "raise KeyError(f'cell says {total}')" in remote.tb
