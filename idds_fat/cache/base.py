"""The content-addressed store every cache implements."""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable

from idds_fat.errors import IntegrityError

_HEX = frozenset("0123456789abcdef")


def content_key(data: bytes) -> str:
    """Return the key of ``data`` in any store: its hex sha256."""
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    """Return ``key`` if it is a 64-character lower-case hex sha256, else raise ValueError."""
    if len(key) != 64 or not _HEX.issuperset(key):
        raise ValueError(f"not a content key (64 hex digits): {key!r}")
    return key


def verify(key: str, data: bytes, where: str) -> bytes:
    """Return ``data`` if its sha256 is ``key``; raise IntegrityError naming ``where``."""
    if content_key(data) != key:
        raise IntegrityError(f"{where}: content does not match its sha256 {key}")
    return data


class ContentStore(abc.ABC):
    """Objects addressed by the sha256 of their bytes.

    ``location`` is what a job's wrapper is given to read the same objects: a
    ``file://`` URL of a directory (objects at ``ROOT/ab/abcd…``) or an HTTP base
    URL (objects at ``BASE/abcd…``).
    """

    location: str

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether ``key`` is stored. Raises CacheError if the store is unreachable."""

    @abc.abstractmethod
    def _write(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (already checked to be its sha256)."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the bytes stored under ``key``, verified against it.

        Raises:
            KeyError: nothing is stored under ``key``.
            IntegrityError: the stored bytes do not match ``key``.
            CacheError: the store is unreachable.
        """

    def put(self, data: bytes) -> str:
        """Store ``data`` unless its key is already there; return the key.

        Raises CacheError if the store is unreachable.
        """
        key = content_key(data)
        if not self.exists(key):
            self._write(key, data)
        return key

    def put_many(self, items: Iterable[bytes]) -> list[str]:
        """Store each of ``items`` unless its key is already there; return their keys,
        in order. Stores that can write a batch faster than one ``put`` at a time
        override it.

        Raises CacheError if the store is unreachable (objects put before stay put).
        """
        return [self.put(data) for data in items]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store may not be used afterwards."""
