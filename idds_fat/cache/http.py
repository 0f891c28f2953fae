"""A content store behind the idds-fat service's HTTP cache: objects at ``BASE/<key>``."""

from __future__ import annotations

import logging

import requests
import tenacity

from idds_fat.cache.base import ContentStore, check_key, verify
from idds_fat.errors import CacheError

logger = logging.getLogger(__name__)

_TRANSIENT_STATUSES = frozenset({408, 429})


def is_transient(exc: BaseException) -> bool:
    """Return whether a failed request is worth retrying.

    Connection failures, timeouts, broken transfers, 5xx and 429 (and 408) are
    transient; any other HTTP status (400, 401, 403, 404, …) is permanent.
    """
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status >= 500 or status in _TRANSIENT_STATUSES
    return isinstance(
        exc,
        (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError),
    )


class HttpStore(ContentStore):
    """Objects kept by an idds-fat service (``PUT``/``GET``/``HEAD`` on ``BASE/<key>``).

    One ``requests.Session`` per store reuses connections; every call has a
    timeout; transient failures are retried ``attempts`` times in all, with
    exponential backoff. The bearer ``token`` is sent in a header and never
    appears in an error message or log.
    """

    _backoff_seconds = 0.2  # first wait between attempts; doubles each time
    _backoff_max_seconds = 10.0

    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 30.0, attempts: int = 5
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.location = base_url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = "Bearer " + token

    def url(self, key: str) -> str:
        """Return the URL of object ``key``. Raises ValueError if it is not a content key."""
        return self.location + "/" + check_key(key)

    def _request(self, method: str, key: str, data: bytes | None = None) -> requests.Response:
        """Send one request with retries; return the response of any non-transient status.

        Raises CacheError when the service cannot be reached or keeps failing.
        """
        url = self.url(key)

        def attempt() -> requests.Response:
            response = self._session.request(method, url, data=data, timeout=self.timeout)
            if response.status_code >= 500 or response.status_code in _TRANSIENT_STATUSES:
                response.raise_for_status()  # an HTTPError with the response attached
            return response

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(
                multiplier=self._backoff_seconds, max=self._backoff_max_seconds
            ),
            before_sleep=_log_retry(method, url),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise CacheError(
                f"{method} {url}: HTTP {status} after {self.attempts} attempts"
            ) from exc
        except requests.RequestException as exc:
            raise CacheError(
                f"{method} {url}: {type(exc).__name__} after {self.attempts} attempts: {exc}"
            ) from exc

    def exists(self, key: str) -> bool:
        """Return whether ``key`` is stored. Raises CacheError on any answer but 200 or 404."""
        response = self._request("HEAD", key)
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise _status_error(response)

    def _write(self, key: str, data: bytes) -> None:
        response = self._request("PUT", key, data)
        if response.status_code not in (200, 201):
            raise _status_error(response)
        logger.debug("stored %s (%d bytes) at %s", key, len(data), self.location)

    def get(self, key: str) -> bytes:
        """Return the bytes stored under ``key``, verified against it.

        Raises:
            KeyError: the service answered 404.
            IntegrityError: the bytes received do not match ``key``.
            CacheError: the service is unreachable or answered another error.
        """
        response = self._request("GET", key)
        if response.status_code == 404:
            raise KeyError(key)
        if response.status_code != 200:
            raise _status_error(response)
        return verify(key, response.content, response.url)

    def close(self) -> None:
        """Close the session's connections."""
        self._session.close()


def _status_error(response: requests.Response) -> CacheError:
    request = response.request
    reason = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
    message = f"{request.method} {response.url}: HTTP {response.status_code}"
    return CacheError(message + (f" ({reason})" if reason else ""))


def _log_retry(method: str, url: str):
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s %s failed (attempt %d): %s; retrying", method, url, state.attempt_number, exc
        )

    return before_sleep
