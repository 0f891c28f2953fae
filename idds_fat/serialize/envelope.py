"""The signed envelope every pickled object travels in.

The wire format is defined once, in ``idds_fat.node.envelope`` (which jobs run
too); this module is the SDK's face of it.
"""

from __future__ import annotations

from typing import Any

from idds_fat.node.envelope import WRAPPER_VERSION, peek, unseal
from idds_fat.node.envelope import seal as seal

ENVELOPE_VERSION: int = WRAPPER_VERSION


def open_envelope(data: bytes, key: bytes) -> tuple[dict[str, Any], bytes]:
    """Verify ``data``'s HMAC under ``key`` and its body's sha256; return ``(header, body)``.

    Raises:
        IntegrityError: malformed, signed with another key, or corrupted.
    """
    return unseal(data, key)


def peek_header(data: bytes) -> dict[str, Any]:
    """Return an envelope's header WITHOUT verifying it (for routing only).

    Raises:
        ValueError: ``data`` is not an envelope.
    """
    return peek(data)[0]
