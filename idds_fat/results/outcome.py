"""Turn a verified result envelope into a value or the exception to raise."""

from __future__ import annotations

import pickle
from typing import Any

from idds_fat import errors
from idds_fat.errors import RemoteError, RemoteTraceback
from idds_fat.serialize import loads

# Failures of the wrapper itself, by the name it reports, raised as the SDK's own types.
_WRAPPER_ERRORS: dict[str, type[Exception]] = {
    "IntegrityError": errors.IntegrityError,
    "UnsafeArchiveError": errors.UnsafeArchiveError,
    "JobEnvironmentError": errors.JobEnvironmentError,
    "InterpreterMismatchError": errors.InterpreterMismatchError,
}


def remote_exception(error: dict[str, Any], setup: bool = False) -> BaseException:
    """Rebuild the exception a job reported, with its remote traceback as ``__cause__``.

    ``error`` is the wrapper's error description: type, module, message,
    traceback and, when it round-tripped on the node, the pickled exception.
    An exception that cannot be rebuilt becomes :class:`RemoteError`.
    """
    tb = error.get("traceback") or ""
    exc: BaseException | None = None
    if setup and error.get("type") in _WRAPPER_ERRORS:
        exc = _WRAPPER_ERRORS[error["type"]](f"on the node: {error.get('message')}")
    elif error.get("pickled") is not None:
        try:
            exc = pickle.loads(error["pickled"])
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(
            f"{error.get('module', '')}.{error.get('type', '?')}".lstrip("."),
            str(error.get("message", "")),
            tb,
        )
    exc.__cause__ = RemoteTraceback(tb)
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    except AttributeError:  # exceptions with __slots__
        pass
    return exc


def decode_result(header: dict[str, Any], body: bytes) -> tuple[bool, Any]:
    """Return ``(True, value)`` or ``(False, exception)`` from a VERIFIED result envelope."""
    status = header.get("status")
    payload = loads(body)
    if status == "ok":
        return True, payload
    return False, remote_exception(payload, setup=status == "setup_error")
