"""Finding a test Slurm cluster's processes in ``/proc``, to kill what it leaves.

Both daemons of a :class:`~idds_fat.testing.SlurmCluster` run with
:data:`MARKER_VAR` set to the cluster's marker, and every ``slurmstepd`` inherits
it; the jobs are their descendants, or (when their ``slurmstepd`` died) carry the
cluster's ``SLURM_CONF`` and a ``SLURM_JOB_ID``. :func:`leftover_pids` walks the
process table for all of them, never this process or its ancestors, and
:func:`kill_pids` sends them SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: Set on a cluster's daemons (so inherited by every slurmstepd) to its marker.
MARKER_VAR = "IDDS_FAT_SLURM_CLUSTER"
# Process names (comm) of Slurm's own daemons, as opposed to job processes
# (the batch shell is "slurm_script").
_DAEMON_NAMES = frozenset({"slurmctld", "slurmd", "slurmstepd", "slurmscriptd"})


def stepd_pids(marker: str) -> list[int]:
    """Return the slurmstepd processes of the cluster with this marker."""
    assignment = f"{MARKER_VAR}={marker}".encode()
    return [
        pid
        for pid, _, environ in _processes()
        if _has_var(environ, assignment) and _command_name(pid).startswith("slurmstepd")
    ]


def leftover_pids(marker: str, conf_path: Path, jobs_only: bool = False) -> list[int]:
    """Return the processes of the cluster still alive: anything carrying its
    marker (the daemons, every slurmstepd), their descendants (the jobs), and
    processes whose ``SLURM_CONF`` names its config and that run a job (orphaned
    when their slurmstepd died). With ``jobs_only``, the Slurm daemons themselves
    are left out."""
    marker_var = f"{MARKER_VAR}={marker}".encode()
    conf_var = f"SLURM_CONF={conf_path}".encode()
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for pid, ppid, environ in _processes():
        children.setdefault(ppid, []).append(pid)
        # SLURM_JOB_ID, set in every job's environment, spares client commands
        # (squeue...) that merely run with this cluster's env.
        is_job = _has_var(environ, conf_var) and b"SLURM_JOB_ID=" in environ
        if is_job or _has_var(environ, marker_var):
            roots.append(pid)
    # Never ourselves or our ancestors, whatever their environment says.
    spared = set(_ancestors(os.getpid()))
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in found or pid in spared:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    if jobs_only:
        found = {pid for pid in found if _command_name(pid) not in _DAEMON_NAMES}
    return sorted(found)


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` that still exists (and that we may signal)."""
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    if pids:
        logger.info("killed %d leftover Slurm process(es): %s", len(pids), pids)


def _processes() -> Iterator[tuple[int, int, bytes]]:
    """(pid, parent pid, environ) of every process we may read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = _parent_pid(int(entry.name))
            with open(f"/proc/{entry.name}/environ", "rb") as environ:
                env = environ.read()
        except (OSError, IndexError, ValueError):
            continue
        yield int(entry.name), ppid, env


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        # The command name may hold spaces and parens: parse after the last ")".
        return int(stat.read().rsplit(b")", 1)[1].split()[1])


def _has_var(environ: bytes, assignment: bytes) -> bool:
    return environ.startswith(assignment + b"\0") or (b"\0" + assignment + b"\0") in environ


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ancestors(pid: int) -> Iterable[int]:
    while pid > 1:
        yield pid
        try:
            pid = _parent_pid(pid)
        except (OSError, IndexError, ValueError):
            return
