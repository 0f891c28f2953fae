"""The signed envelope every pickled object travels in.

The wire format is defined once, in the job wrapper (which must run alone on a
node); this module is the SDK's face of it, raising the SDK's own errors.
"""

from __future__ import annotations

from typing import Any

from idds_fat.errors import IntegrityError
from idds_fat.wrapper_source import wrapper_module

ENVELOPE_VERSION: int = wrapper_module().WRAPPER_VERSION


def seal(header: dict[str, Any], body: bytes, key: bytes) -> bytes:
    """Return ``body`` sealed with ``header``, its sha256 and an HMAC-SHA256 under ``key``."""
    return wrapper_module().seal(header, body, key)


def open_envelope(data: bytes, key: bytes) -> tuple[dict[str, Any], bytes]:
    """Verify ``data``'s HMAC under ``key`` and its body's sha256; return ``(header, body)``.

    Raises:
        IntegrityError: malformed, signed with another key, or corrupted.
    """
    w = wrapper_module()
    try:
        return w.unseal(data, key)
    except w.IntegrityError as exc:
        raise IntegrityError(str(exc)) from None


def peek_header(data: bytes) -> dict[str, Any]:
    """Return an envelope's header WITHOUT verifying it (for routing only).

    Raises:
        ValueError: ``data`` is not an envelope.
    """
    return wrapper_module().peek(data)[0]
