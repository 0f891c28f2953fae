"""What a job's end means: why it ended, its last stderr lines, settling its future."""

from __future__ import annotations

import concurrent.futures
import math
import numbers
import os
import signal
from pathlib import Path
from typing import Any

from idds_fat.backends import JobExit
from idds_fat.results import AsyncResult
from idds_fat.wrapper_source import wrapper_module


def _exit_reason(outcome: JobExit) -> str:
    if outcome.reason:
        return outcome.reason
    code = outcome.returncode
    if code is None:
        return "its process could not be followed"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    module = wrapper_module()
    if code == module.EXIT_UNDELIVERED:
        return "its result could not be delivered to the result store"
    if code == module.EXIT_UNREPORTED:
        return "the wrapper could not start the job"
    if code == 0:
        return "it exited cleanly but no valid result arrived"
    return "its process exited"


def _tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _settle(future: AsyncResult, ok: bool, value: Any) -> bool:
    """Complete ``future`` unless something else already did; return whether this did."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def recorded_outcome(ok: bool, value: Any) -> dict[str, Any]:
    """Return what the state record keeps of a job's outcome: ``value`` or ``error``.

    A real number (not a bool, finite) is kept as ``value`` for the monitoring
    page's best-so-far plot; an exception is kept as ``error``: its type, message
    and remote traceback. Anything else is kept as nothing: the record is not a
    result store.
    """
    if ok:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            return {"value": number} if math.isfinite(number) else {}
        return {}
    remote = getattr(value, "remote_traceback", None)  # ends with the exception's own line
    return {"error": remote.rstrip() if remote else f"{type(value).__name__}: {value}"}
