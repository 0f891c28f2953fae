"""A warm worker on its own, for tests of the worker's line protocol (docs/contracts.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from idds_fat.node.spec import SECRETS_FD_ENV, secrets_pipe
from idds_fat.wrapper_source import launch_command, wrapper_file


def start_bare_worker(directory: Path) -> subprocess.Popen:
    """Start ``wrapper --worker`` in ``directory/home`` with its secrets on a pipe, as the
    local backend gives them (an all-zero HMAC key, no token); return the process, its
    stdin and stdout open as text.

    Raises:
        FileExistsError: ``directory/home`` exists already.
        OSError: the process cannot be started.
    """
    wrapper = wrapper_file(directory)
    home = directory / "home"
    home.mkdir()
    fd = secrets_pipe(json.dumps({"hmac_key": "00" * 32, "token": None}).encode())
    try:
        return subprocess.Popen(
            [*launch_command(sys.executable, wrapper), "--worker"],
            cwd=home,
            env={**os.environ, SECRETS_FD_ENV: str(fd)},
            pass_fds=(fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(fd)
