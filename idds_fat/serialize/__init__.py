"""Serialization: the signed envelope, and cloudpickle with the user's code by value."""

from idds_fat.serialize.envelope import ENVELOPE_VERSION, open_envelope, peek_header, seal
from idds_fat.serialize.pickling import (
    PickledCall,
    dumps_call,
    dumps_job_kwargs,
    dumps_value,
    loads,
    register_user_modules,
)

__all__ = [
    "ENVELOPE_VERSION",
    "PickledCall",
    "dumps_call",
    "dumps_job_kwargs",
    "dumps_value",
    "loads",
    "open_envelope",
    "peek_header",
    "register_user_modules",
    "seal",
]
