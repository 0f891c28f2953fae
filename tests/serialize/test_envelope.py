"""The signed envelope: what verifies, and what is refused before any unpickling."""

from __future__ import annotations

import pytest

from idds_fat.errors import IntegrityError
from idds_fat.serialize import ENVELOPE_VERSION, open_envelope, peek_header, seal

KEY = b"k" * 32


def test_sealed_envelope_opens_with_its_key():
    data = seal({"kind": "result", "job": 3}, b"payload", KEY)
    header, body = open_envelope(data, KEY)
    assert body == b"payload"
    assert header["job"] == 3 and header["v"] == ENVELOPE_VERSION and header["size"] == 7


def test_envelope_signed_with_another_key_is_rejected():
    data = seal({"kind": "result"}, b"payload", b"x" * 32)
    with pytest.raises(IntegrityError, match="forged or wrong key"):
        open_envelope(data, KEY)


@pytest.mark.parametrize("position", [0, 12, -40, -1])
def test_any_flipped_byte_is_rejected(position):
    data = bytearray(seal({"kind": "result"}, b"payload" * 10, KEY))
    data[position] ^= 0x01
    with pytest.raises(IntegrityError):
        open_envelope(bytes(data), KEY)


def test_header_edited_and_resigned_without_key_cannot_pass():
    data = seal({"kind": "result", "status": "error"}, b"payload", KEY)
    forged = data.replace(b'"status":"error"', b'"status":"ok"   ')
    with pytest.raises(IntegrityError):
        open_envelope(forged, KEY)


@pytest.mark.parametrize("garbage", [b"", b"IDDSFAT1", b"not an envelope at all" * 3])
def test_garbage_is_rejected_and_peek_says_why(garbage):
    with pytest.raises(IntegrityError):
        open_envelope(garbage, KEY)
    with pytest.raises(ValueError):
        peek_header(garbage)


def test_peek_reads_header_without_key():
    assert peek_header(seal({"workflow": "w1"}, b"", KEY))["workflow"] == "w1"
