"""Process and port chores shared by the test servers (ActiveMQ, moto, Slurm).

:class:`ServerProcess` is one logged server process: launched in its own session
with a finalizer that kills it, probed until ready, terminated in order; the
functions around it pick ports (:func:`free_port`, :func:`reserve_ports`), find
commands (:func:`find_command`) and start or stop a logged process.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from idds_fat.workdir import read_tail

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

HOST = "127.0.0.1"
#: Where daemons live; not on every user's PATH.
SBIN = Path("/usr/sbin")
#: The most of a log read from its end to find the lines an error message shows.
LOG_TAIL_BYTES = 64 * 1024
_POLL_INTERVAL = 0.05

logger = logging.getLogger(__name__)


def free_port(host: str = HOST) -> int:
    """Return a port that is free on ``host`` right now.

    Another process may take it before the server binds it; rare on loopback,
    and the server's start then fails with its log tail.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_reserved_ports: set[int] = set()
_ports_lock = threading.Lock()


def reserve_ports(count: int) -> list[int]:
    """Return ``count`` ports free on every address right now, none of them handed
    out by this function before in this process.

    For servers that listen on all addresses and keep their ports across restarts;
    another process racing for the same port is rare, and the server's start then
    reports the bind failure from its log.
    """
    ports: list[int] = []
    with _ports_lock:
        while len(ports) < count:
            port = free_port("")
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                ports.append(port)
    return ports


def find_command(name: str) -> str | None:
    """Return the path of command ``name`` on PATH or in ``/usr/sbin``, or None."""
    found = shutil.which(name)
    if found is not None:
        return found
    candidate = SBIN / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def port_in_use(port: int, host: str = HOST) -> bool:
    """Return whether a live listener holds ``port`` on ``host``.

    Binds with SO_REUSEADDR, as servers do, so connections of a killed server
    lingering in TIME_WAIT do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def kill_process(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` if it still runs, and reap it.

    For finalizers (interpreter exit, a server object collected while its
    process runs): a test run must never leave a server behind.
    """
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait()


def spawn_logged(
    command: list[str], cwd: Path, log_path: Path, banner: str, **options: Any
) -> subprocess.Popen:
    """Start a server process whose stdout and stderr are appended to ``log_path``.

    The process gets its own session, so a Ctrl-C in the test terminal does not
    reach it before the test's own teardown stops it in order. ``options`` go to
    :class:`subprocess.Popen` (``env``, ``user``, ``group``...).
    """
    with open(log_path, "ab") as log:
        log.write(f"--- {banner}\n".encode())
        log.flush()
        return subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **options,
        )


def stop_process(process: subprocess.Popen, timeout: float, kill: bool = False) -> None:
    """Stop ``process`` and reap it: SIGKILL at once with ``kill`` (a crash), else
    SIGTERM and, if it is still alive after ``timeout`` seconds, SIGKILL."""
    if process.poll() is not None:
        return
    if kill:
        process.kill()
        process.wait()
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d ignored SIGTERM for %.0f s; killing it", process.pid, timeout)
        process.kill()
        process.wait()


class Started:
    """A test server or cluster as a context manager: ``with`` starts it and stops it.

    A subclass has ``start()`` and ``stop()``; ``stop`` must be safe to call when
    ``start`` failed part-way.
    """

    def start(self) -> Any:
        """Start what this stands for (a subclass's)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop what ``start`` started (a subclass's)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess(Started):
    """What a test server with one logged process has in common: start it, probe
    it until ready, stop it, and never leave it behind.

    A subclass sets ``log_path`` and calls ``_launch`` then ``_wait_until_ready``
    from its ``start``; its ``stop`` calls ``_terminate``. ``_error`` is the
    exception it raises, ``_label`` names it in messages and ``_where`` is its
    address.
    """

    log_path: Path
    _error: type[Exception] = RuntimeError
    _label = "server"
    _log_tail_lines = 40
    _process: subprocess.Popen[bytes] | None = None
    _finalizer: weakref.finalize | None = None

    @property
    def _where(self) -> str:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the server process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id while it is started (running or exited), else None."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the server and wait until it answers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and wait until its process is gone."""
        raise NotImplementedError

    def log_tail(self, lines: int | None = None) -> str:
        """Return the last ``lines`` lines of the server's log ("" if none yet)."""
        return read_tail(self.log_path, lines or self._log_tail_lines, LOG_TAIL_BYTES) or ""

    def _launch(
        self, command: list[str], cwd: Path, banner: str, **options: Any
    ) -> subprocess.Popen[bytes]:
        # The finalizer kills the process if this object goes away while it runs.
        self._process = spawn_logged(command, cwd, self.log_path, banner, **options)
        self._finalizer = weakref.finalize(self, kill_process, self._process)
        return self._process

    def _wait_until_ready(
        self, probe: Callable[[float], bool], began: float, timeout: float, what: str = ""
    ) -> None:
        """Call ``probe(seconds_left)`` until it says ready; raise ``_error`` with the
        log's tail if the process exits or ``timeout`` passes first."""
        assert self._process is not None
        deadline = began + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise self._error(
                    f"{self._label} for {self._where} exited with code {code} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._error(
                    f"{self._label} for {self._where} did not answer{what} within "
                    f"{timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            if probe(min(2.0, remaining)):
                return
            time.sleep(_POLL_INTERVAL)

    def _terminate(self, kill: bool = False, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None:
            stop_process(process, timeout, kill=kill)
