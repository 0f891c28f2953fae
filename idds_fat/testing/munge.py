"""A private ``munged`` on its own socket, for one test Slurm cluster.

:class:`MungeDaemon` runs ``munged -F`` as user ``munge`` with the machine's key
``/etc/munge/munge.key`` and a socket in a fresh directory under ``/tmp``, and is
ready once ``munge -n | unmunge`` succeeds on that socket. A ``munged`` another
process runs on the default socket is never used, stopped or depended on, so
clusters of parallel test runs cannot pull each other's authentication away.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from idds_fat.errors import IddsFatError
from idds_fat.testing.processes import ServerProcess, find_command

logger = logging.getLogger(__name__)

MUNGE_KEY = Path("/etc/munge/munge.key")
_COMMAND_TIMEOUT = 10.0


class MungeError(IddsFatError):
    """munged could not be started; the message carries its log's last lines."""


class MungeDaemon(ServerProcess):
    """One ``munged`` in the foreground, its output appended to ``log_path``.

    :attr:`socket` is its socket while it runs (None before); :meth:`stop` also
    removes the directory holding the socket, pid and seed files.
    """

    _error = MungeError
    _label = "munged"
    _log_tail_lines = 30

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.directory: Path | None = None

    @property
    def socket(self) -> Path | None:
        """The socket clients pass as ``munge -S`` (Slurm's ``AuthInfo=socket=``)."""
        return self.directory / "munge.socket" if self.directory is not None else None

    @property
    def _where(self) -> str:
        return str(self.socket)

    def start(self, timeout: float = 30.0) -> None:
        """Start munged and wait until it signs and verifies a credential.

        Raises:
            MungeError: munge not installed, no key, munged exited or did not
                answer within ``timeout`` seconds (with its log's tail).
        """
        began = time.monotonic()
        munged = find_command("munged")
        if munged is None:
            raise MungeError("munged is not installed (apt-get install munge)")
        if not os.access(MUNGE_KEY, os.R_OK):
            raise MungeError(f"no munge key {MUNGE_KEY} (apt-get install munge creates it)")
        # Not under the cluster's base_dir: munged runs as user munge, which must
        # traverse every parent (pytest's /tmp/pytest-of-root is 0700), and the
        # socket path must stay short.
        self.directory = Path(tempfile.mkdtemp(prefix="idds-fat-munge-", dir="/tmp"))
        self.directory.chmod(0o755)
        shutil.chown(self.directory, "munge", "munge")
        # As `runuser -u munge -- munged -F`, but munged is our own child: one
        # SIGTERM and a reap stop it. It logs to stderr in the foreground.
        command = [
            munged,
            "-F",
            f"--socket={self.socket}",
            f"--pid-file={self.directory / 'munged.pid'}",
            f"--seed-file={self.directory / 'munged.seed'}",
        ]
        process = self._launch(
            command,
            self.directory,
            f"starting munged on {self.socket}",
            user="munge",
            group="munge",
            extra_groups=[],
        )
        try:
            self._wait_until_ready(lambda _: _munge_works(self.socket), began, timeout)
        except BaseException:
            self.stop(kill=True)
            raise
        logger.debug("started munged pid %d on %s", process.pid, self.socket)

    def stop(self, timeout: float = 10.0, kill: bool = False) -> None:
        """Stop munged (SIGKILL at once with ``kill``) and remove its directory."""
        self._terminate(kill=kill, timeout=timeout)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _munge_works(socket_path: Path | None) -> bool:
    """Whether ``munge -n | unmunge`` succeeds on ``socket_path``."""
    munge, unmunge = find_command("munge"), find_command("unmunge")
    if munge is None or unmunge is None:
        return False
    try:
        credential = subprocess.run(
            [munge, "-n", "-S", str(socket_path)],
            capture_output=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
        if credential.returncode != 0:
            return False
        decoded = subprocess.run(
            [unmunge, "-S", str(socket_path)],
            input=credential.stdout,
            capture_output=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return decoded.returncode == 0
