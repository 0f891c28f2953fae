"""The signed envelope every pickled object travels in: the wire format, defined once.

The SDK seals calls and opens results with these functions; a job opens calls
and seals results with the same ones, so the two never disagree.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from .errors import IntegrityError

WRAPPER_VERSION = 1
ENVELOPE_MAGIC = b"IDDSFAT1"
_MAC_LEN = 32
_HEADER_LEN_BYTES = 4
# One encoder for every header (json.dumps makes one per call when given options).
_header_json = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def sha256_hex(data: bytes) -> str:
    """Return the hex sha256 of ``data``: the content key of the cache."""
    return hashlib.sha256(data).hexdigest()


def seal(header: dict, body: bytes, key: bytes) -> bytes:
    """Wrap ``body`` with a JSON ``header`` and an HMAC-SHA256 under ``key``.

    Layout: magic, header length (4 bytes, big-endian), header JSON (with the
    body's sha256 added), body, then the 32-byte MAC over everything before it.
    """
    header = dict(header, v=WRAPPER_VERSION, sha256=sha256_hex(body), size=len(body))
    head = _header_json(header).encode()
    signed = ENVELOPE_MAGIC + len(head).to_bytes(_HEADER_LEN_BYTES, "big") + head + body
    return signed + hmac.digest(key, signed, "sha256")


def peek(data: bytes) -> tuple[dict, bytes]:
    """Split an envelope into header and body WITHOUT verifying it.

    For routing and indexing only (the service does this); never unpickle what
    this returns. Raises ValueError when ``data`` is not an envelope.
    """
    start = len(ENVELOPE_MAGIC) + _HEADER_LEN_BYTES
    if len(data) < start + _MAC_LEN or not data.startswith(ENVELOPE_MAGIC):
        raise ValueError("not an idds-fat envelope")
    head_len = int.from_bytes(data[len(ENVELOPE_MAGIC) : start], "big")
    if start + head_len + _MAC_LEN > len(data):
        raise ValueError("truncated idds-fat envelope")
    try:
        header = json.loads(data[start : start + head_len])
    except ValueError:
        raise ValueError("idds-fat envelope with an unreadable header") from None
    if not isinstance(header, dict):
        raise ValueError("idds-fat envelope with an unreadable header")
    return header, data[start + head_len : -_MAC_LEN]


def unseal(data: bytes, key: bytes) -> tuple[dict, bytes]:
    """Verify an envelope's HMAC and body sha256; return ``(header, body)``.

    Raises IntegrityError when the envelope is malformed, signed with another
    key, or its body does not match the sha256 in its header.
    """
    try:
        header, body = peek(data)
    except ValueError as exc:
        raise IntegrityError(str(exc)) from None
    expected = hmac.digest(key, data[:-_MAC_LEN], "sha256")
    if not hmac.compare_digest(expected, data[-_MAC_LEN:]):
        raise IntegrityError("envelope signature does not verify (forged or wrong key)")
    if header.get("v") != WRAPPER_VERSION:
        raise IntegrityError(f"envelope version {header.get('v')!r} is not {WRAPPER_VERSION}")
    if header.get("sha256") != sha256_hex(body):
        raise IntegrityError("envelope body does not match its sha256")
    return header, body
