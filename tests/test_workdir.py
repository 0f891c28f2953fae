"""The work-dir layout, the private writer and the tail reader of idds_fat.workdir."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from idds_fat.node.errors import EXIT_UNREPORTED
from idds_fat.workdir import (
    JobPaths,
    WorkDirPaths,
    WorkflowPaths,
    read_tail,
    slug,
    write_private,
)


def test_the_node_writes_a_jobs_files_where_job_paths_names_them(tmp_path):
    # The node runs without the SDK and spells these names itself: a pack whose
    # job cannot start still leaves its output and exit status where the SDK looks.
    job = JobPaths(tmp_path / "jobs" / "t0001" / "0")
    run = (
        "import sys; from idds_fat.node.worker import run_pack; "
        "sys.exit(run_pack([{'workdir': sys.argv[1], 'spec': sys.argv[2]}], {'token': None}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", run, str(job.root), str(tmp_path / "no-such-spec.json")],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == EXIT_UNREPORTED
    assert job.stdout.is_file()
    assert "cannot start job" in job.stderr.read_text()
    assert job.exit_status.read_text() == f"{EXIT_UNREPORTED}\n"


def test_a_workflows_files_sit_under_its_id_in_the_work_dir(tmp_path):
    workflow = WorkDirPaths(tmp_path).workflow("demo-20250101T000000-abcdef")
    assert workflow.root == tmp_path / "workflows" / "demo-20250101T000000-abcdef"
    assert workflow.workflow_id == "demo-20250101T000000-abcdef"
    assert workflow.state.name == "state.sqlite3"
    assert workflow.job("t0002", 7).root == workflow.root / "jobs" / "t0002" / "7"
    assert workflow.job("t0002", 7, attempt=2).root.name == "7.2"
    assert workflow.wrapper("ab" * 32).name == "wrapper_abababababababab.py"


def test_the_last_run_of_a_job_is_its_highest_attempt_on_disk(tmp_path):
    workflow = WorkflowPaths(tmp_path)
    assert workflow.last_run("t0001", 3) == workflow.job("t0001", 3)
    for attempt in (0, 1, 2):
        workflow.job("t0001", 3, attempt).root.mkdir(parents=True)
    workflow.job("t0001", 31).root.mkdir()  # another job, not a run of job 3
    (workflow.task("t0001") / "3.notes").mkdir()
    assert workflow.last_run("t0001", 3) == workflow.job("t0001", 3, 2)


def test_slug_keeps_a_name_fit_for_a_file_name():
    assert slug("my fit / v2") == "my-fit-v2"
    assert slug("///") == "workflow"
    assert len(slug("x" * 100)) == 40


def test_write_private_creates_a_file_only_its_owner_may_read(tmp_path):
    path = tmp_path / "secret"
    write_private(path, b"key")
    assert path.read_bytes() == b"key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_private(path, b"k")
    assert path.read_bytes() == b"k"


def _log(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "log"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "lines", "tail"),
    [
        (b"a\nb\nc\n", 2, "b\nc\n"),
        (b"a\nb\nc", 2, "b\nc"),
        (b"a\nb\nc\n", 10, "a\nb\nc\n"),
        (b"a\nb\nc\n", 0, ""),
        (b"a\nb\nc\n", None, "a\nb\nc\n"),
        (b"", 3, ""),
        (b"bar 10%\rbar 90%\rdone\n", 1, "bar 10%\rbar 90%\rdone\n"),
    ],
)
def test_read_tail_returns_the_last_lines_as_the_file_has_them(tmp_path, data, lines, tail):
    assert read_tail(_log(tmp_path, data), lines, max_bytes=None) == tail


def test_read_tail_reads_back_over_many_blocks(tmp_path):
    path = _log(tmp_path, b"".join(b"line %d\n" % i for i in range(20000)))
    assert read_tail(path, 3, max_bytes=None) == "line 19997\nline 19998\nline 19999\n"
    assert read_tail(path, None, max_bytes=None) == path.read_text()


def test_read_tail_leaves_out_the_line_its_byte_bound_cut(tmp_path):
    path = _log(tmp_path, b"0123456789\nabc\nxyz\n")
    assert read_tail(path, 10, max_bytes=12) == "abc\nxyz\n"
    # A line longer than the bound is all there is: its end is shown.
    assert read_tail(_log(tmp_path, b"x" * 100), 5, max_bytes=10) == "x" * 10


def test_read_tail_replaces_bytes_that_are_not_utf8(tmp_path):
    assert read_tail(_log(tmp_path, b"ok \xff\n"), 1, max_bytes=None) == "ok \ufffd\n"


def test_read_tail_of_a_file_that_is_not_there_is_none(tmp_path):
    assert read_tail(tmp_path / "missing", 5, max_bytes=100) is None


# --- issue 17, item 5: a work dir is its user's alone, whatever the umask ------------

_SMALL_WORKFLOW = """
import os, sys
os.umask(int(sys.argv[1], 8))
from idds_fat import Workflow, work

@work
def square(x):
    print("stderr of job", x, file=sys.stderr)
    if x == 2:
        raise ValueError("a traceback that stays private")
    return x * x

with Workflow(name="modes", local_mode=sys.argv[2], cache=sys.argv[3] or None) as wf:
    futures = square.map([{"x": x} for x in range(3)]).futures
    assert [f.result() for f in futures[:2]] == [0, 1]
    assert isinstance(futures[2].exception(), Exception)
"""


def _modes_under(root: Path) -> dict[str, list[str]]:
    """Every directory not 0700 and every file not 0600 under ``root`` (and ``root``)."""
    wrong: dict[str, list[str]] = {"dirs": [], "files": []}
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        if path.is_dir() and mode != 0o700:
            wrong["dirs"].append(f"{path.relative_to(root)} {mode:o}")
        elif path.is_file() and mode != 0o600:
            wrong["files"].append(f"{path.relative_to(root)} {mode:o}")
    return wrong


@pytest.mark.parametrize("umask", ["022", "000"])
@pytest.mark.parametrize("local_mode,cache", [("warm", ""), ("cold", "service")])
def test_a_work_dir_is_private_whatever_the_umask(tmp_path, umask, local_mode, cache):
    work_dir = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-c", _SMALL_WORKFLOW, umask, local_mode, cache],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "IDDS_FAT_WORK_DIR": str(work_dir)},
    )
    assert done.returncode == 0, done.stderr
    files = [p for p in work_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # What must be private is there to be checked: state, results, stderr, cache objects.
    assert {"state.sqlite3", "results.sqlite3", "stderr.txt", "hmac.key"} <= names, names
    assert any(len(p.name) == 64 for p in files)
    assert _modes_under(work_dir) == {"dirs": [], "files": []}
