"""``idds-fat wrapper`` writes the file jobs run, byte for byte."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from click.testing import CliRunner

from idds_fat.cli import main
from idds_fat.wrapper_source import wrapper_bytes


def test_wrapper_command_writes_the_shipped_file_and_names_its_sha256(tmp_path):
    target = tmp_path / "wrapper.py"
    done = CliRunner().invoke(main, ["wrapper", "--output", str(target)])
    assert done.exit_code == 0, done.output
    assert target.read_bytes() == wrapper_bytes()
    assert f"sha256 {hashlib.sha256(wrapper_bytes()).hexdigest()}" in done.output
    # The file runs alone: without arguments it prints its usage and exits 2.
    run = subprocess.run([sys.executable, "-I", str(target)], capture_output=True, text=True)
    assert run.returncode == 2 and "usage: wrapper.py --spec LOCATION" in run.stderr


def test_wrapper_command_writes_to_stdout_by_default():
    done = CliRunner().invoke(main, ["wrapper"])
    assert done.exit_code == 0
    assert done.stdout_bytes == wrapper_bytes()
