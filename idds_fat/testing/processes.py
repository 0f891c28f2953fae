"""Process and port chores shared by the test servers (ActiveMQ, moto, Slurm)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

HOST = "127.0.0.1"

logger = logging.getLogger(__name__)


def free_port(host: str = HOST) -> int:
    """Return a port that is free on ``host`` right now.

    Another process may take it before the server binds it; rare on loopback,
    and the server's start then fails with its log tail.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


def spawn_logged(command: list[str], cwd: Path, log_path: Path, banner: str) -> subprocess.Popen:
    """Start a server process whose stdout and stderr are appended to ``log_path``.

    The process gets its own session, so a Ctrl-C in the test terminal does not
    reach it before the test's own teardown stops it in order.
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


def file_tail(path: Path, lines: int) -> str:
    """Return the last ``lines`` lines of the log at ``path`` ("" if it does not exist yet)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            text = log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
