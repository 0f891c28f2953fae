"""Content-addressed caches: a directory (``file://``), the service's HTTP cache, or S3."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from idds_fat.cache.base import ContentStore, content_key
from idds_fat.cache.directory import DirectoryStore
from idds_fat.cache.http import HttpStore

__all__ = ["ContentStore", "DirectoryStore", "HttpStore", "S3Store", "content_key", "open_store"]


def __getattr__(name: str) -> type:
    # boto3 takes ~0.1 s to import: load the S3 store only when someone asks for it.
    if name == "S3Store":
        from idds_fat.cache.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(location: str, token: str | None = None) -> ContentStore:
    """Return the store at ``location``.

    A plain path or a ``file://`` URL opens a :class:`DirectoryStore`; an
    ``http://`` or ``https://`` URL opens an :class:`HttpStore` (with ``token``);
    an ``s3://bucket/prefix`` URL an ``S3Store`` (credentials, endpoint and region
    from boto3's usual configuration).

    Raises:
        ValueError: ``location`` is empty or uses another URL scheme.
    """
    if not location:
        raise ValueError(
            "empty cache location: give a directory, a file://, an http(s):// or an s3:// URL"
        )
    if location.startswith(("http://", "https://")):
        return HttpStore(location, token=token)
    if location.startswith("s3://"):
        from idds_fat.cache.s3 import S3Store

        return S3Store(location)
    if location.startswith("file://"):
        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// cache location on another host is not supported: {location}")
        return DirectoryStore(Path(unquote(parsed.path)))
    scheme = urlparse(location).scheme
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(
            f"unsupported cache location {location!r}: "
            "give a directory, a file://, an http(s):// or an s3:// URL"
        )
    return DirectoryStore(Path(location).expanduser())
