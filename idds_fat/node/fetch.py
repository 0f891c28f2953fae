"""Reading from the content cache (a directory or HTTP), every object checked against its sha256."""

from __future__ import annotations

import os
import sys
import time

from .envelope import sha256_hex
from .errors import IntegrityError, WrapperError
from .spec import JobSpec


def http_request(
    method: str, url: str, token: str | None, data: bytes | None, timeout: float
) -> bytes:
    """Send one HTTP request (with the bearer ``token``, if any); return the response body."""
    # Imported here: a job that touches no URL (a directory cache, its result
    # handed back in a file) never pays for the HTTP stack (~9 ms).
    import urllib.request

    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _http_status(exc: BaseException | None) -> int | None:
    """The status of an HTTP error response, else None (no import if no HTTP was done)."""
    errors = sys.modules.get("urllib.error")
    if errors is not None and isinstance(exc, errors.HTTPError):
        return exc.code
    return None


def transient(exc: BaseException) -> bool:
    """Whether trying again may help: a network error, or HTTP 5xx, 408 or 429."""
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(exc, (OSError, TimeoutError))  # URLError is an OSError


def with_retries(action, deadline: float, what: str):
    """Run ``action`` until it succeeds, a permanent error, or ``deadline`` passes."""
    delay = 0.05
    while True:
        try:
            return action()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise WrapperError(f"{what}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def cache_object_location(cache: str, key: str) -> str:
    """Return where object ``key`` lives in ``cache`` (a directory, ``file://`` or HTTP URL)."""
    if cache.startswith(("http://", "https://")):
        return cache.rstrip("/") + "/" + key
    root = cache[len("file://") :] if cache.startswith("file://") else cache
    if cache.startswith("file://") and "%" in root:
        import urllib.parse  # and the ipaddress it loads: ~4 ms a plain cold job skips

        root = urllib.parse.unquote(root)
    return os.path.join(root, key[:2], key)


def public_url(location: str) -> str:
    """``location`` without its query string: a presigned URL's signature stays out of logs."""
    if "?" not in location:  # no query string (a path, a plain URL): nothing to parse
        return location
    import urllib.parse

    parts = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(parts._replace(query="")) if parts.query else location


def fetch(location: str, key: str | None, token: str | None, timeout: float = 300.0) -> bytes:
    """Read ``location`` (a path or HTTP URL); when ``key`` is given, check its sha256.

    Raises IntegrityError on a mismatch, WrapperError when it cannot be read (a
    refused presigned URL says it may have expired).
    """
    shown = public_url(location)
    if location.startswith(("http://", "https://")):
        deadline = time.monotonic() + timeout
        try:
            data = with_retries(
                lambda: http_request("GET", location, token, None, 60.0),
                deadline,
                "fetching " + shown,
            )
        except WrapperError as exc:
            if _http_status(exc.__cause__) == 403 and shown != location:
                raise WrapperError(
                    f"fetching {shown}: HTTP 403: the presigned URL was refused; it may have "
                    "expired (raise the store's url_lifetime for long-queued jobs)"
                ) from None
            raise
    else:
        path = location[len("file://") :] if location.startswith("file://") else location
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise WrapperError(f"fetching {location}: {exc}") from None
    if key is not None and sha256_hex(data) != key:
        raise IntegrityError(f"{shown}: content does not match its sha256 {key}")
    return data


def fetch_object(spec: JobSpec, secrets: dict, key: str) -> bytes:
    """Fetch cache object ``key`` of this job (a presigned URL when the spec has one)."""
    urls = spec.urls or {}
    if key in urls:
        return fetch(urls[key], key, None)
    return fetch(cache_object_location(spec.cache, key), key, secrets["token"])


def load_spec(location: str, token: str | None) -> JobSpec:
    """Fetch the job spec at ``location``, checked against the sha256 its name gives."""
    shown = public_url(location)
    name = shown.rstrip("/").rsplit("/", 1)[-1]
    key = name if len(name) == 64 and not name.strip("0123456789abcdef") else None
    presigned = shown != location
    return JobSpec.from_json(fetch(location, key, None if presigned else token))
