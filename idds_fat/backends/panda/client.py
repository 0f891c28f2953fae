"""The HTTP client of PanDA's ``/api/v1`` interface: the calls the backend needs, with retries."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import tenacity

from idds_fat.backends.base import TransientError
from idds_fat.backends.panda.auth import PandaAuth
from idds_fat.backends.panda.errors import (
    PandaAuthError,
    PandaError,
    PandaRejectedError,
    PandaUnavailableError,
)
from idds_fat.errors import ConfigError

logger = logging.getLogger(__name__)

#: panda-client's defaults for ``PANDA_URL_SSL`` and ``PANDACACHE_URL`` (PANDA_API.md §1).
DEFAULT_SERVER_URL = "https://pandaserver.cern.ch/server/panda"
DEFAULT_CACHE_URL = "https://pandacache.cern.ch/server/panda"

_MIB = 1024 * 1024
#: Cache upload limits of panda-client 1.6 (PANDA_API.md §5): ``sources.*`` names
#: get 768 MiB, any other name 10 MiB.
SOURCES_LIMIT_BYTES = 768 * _MIB
OTHER_LIMIT_BYTES = 10 * _MIB

_TRANSIENT_STATUSES = frozenset({408, 429})
# Characters that pass a shell (and JEDI's ${...} templating) unchanged, so the job
# command needs no quoting, whichever way the runner re-splits it.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9._~:/%+@=,-]+\Z")


def api_base(url: str) -> str:
    """Return the ``/api/v1`` base of a PanDA URL: its scheme and host, path dropped.

    ``https://h:25443/server/panda`` gives ``https://h:25443/api/v1`` (PANDA_API.md §6.1).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"not a PanDA server URL: {url!r}")
    return f"{parts.scheme}://{parts.netloc}/api/v1"


def _tls_refusal(exc: BaseException) -> str | None:
    """OpenSSL's reason when a TLS handshake failed for good: the server sent an alert
    (it refused our certificate: ``unknown ca``, ``certificate required``, ``bad
    certificate``, ``certificate expired``) or we refused the server's certificate
    (``certificate verify failed``). None for anything else, a reset or EOF included,
    which may pass."""
    if not isinstance(exc, requests.exceptions.SSLError):
        return None
    text = str(exc)
    found = re.search(r"\[SSL: \w+\] ([^(]+)", text)
    reason = (found.group(1) if found else text).strip()
    return reason if "alert" in reason or "certificate verify failed" in reason else None


def _is_transient(exc: BaseException) -> bool:
    if _tls_refusal(exc) is not None:
        return False  # no retry mends a refused certificate
    return isinstance(
        exc,
        (
            TransientError,
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ),
    )


class PandaClient:
    """The PanDA server's ``/api/v1`` calls the backend needs, over one ``requests.Session``.

    Every call has a timeout and is tried ``attempts`` times in all when the
    server cannot be reached or answers 5xx/408/429, with exponential backoff
    from ``backoff`` seconds. Every request sends ``Accept: application/json``
    (without it the server answers a Python repr, PANDA_API.md §2).

    Args:
        server_url: ``PANDA_URL_SSL``-style URL; only scheme and host are used.
        auth: credentials (default: :meth:`PandaAuth.from_env`).
        cache_url: ``PANDACACHE_URL``-style URL; files put in the cache are read
            back from its host at ``/cache/<name>``.
        verify: TLS verification: True, False, or a CA file or directory (default:
            ``$X509_CERT_DIR`` or ``/etc/grid-security/certificates`` when it
            exists, else the system CAs; ``PANDA_VERIFY_HOST=off`` disables it).
    """

    def __init__(
        self,
        server_url: str | None = None,
        auth: PandaAuth | None = None,
        *,
        cache_url: str | None = None,
        timeout: float = 60.0,
        attempts: int = 5,
        backoff: float = 1.0,
        verify: bool | str | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.server_url = server_url or os.environ.get("PANDA_URL_SSL") or DEFAULT_SERVER_URL
        self.api = api_base(self.server_url)
        cache = cache_url or os.environ.get("PANDACACHE_URL") or DEFAULT_CACHE_URL
        parts = urlsplit(cache)
        self.cache_base = f"{parts.scheme}://{parts.netloc}"
        self.auth = auth if auth is not None else PandaAuth.from_env()
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._session = requests.Session()
        self._session.verify = _default_verify() if verify is None else verify
        if self.auth.mode == "x509":
            self._session.cert = str(self.auth.proxy)  # one file holds certificate and key

    def close(self) -> None:
        """Close the session's connections."""
        self._session.close()

    # The calls, each with its PANDA_API.md section.

    def submit_task(self, task_parameters: Mapping[str, Any]) -> int:
        """Submit a task (§2a ``POST task/submit``); return its jediTaskID.

        Raises:
            PandaRejectedError: PanDA refused the task (its message and code attached).
            PandaAuthError, PandaUnavailableError: see :meth:`call`.
        """
        name = task_parameters.get("taskName", "?")
        body = {"task_parameters": dict(task_parameters), "parent_tid": None}
        reply = self.call("POST", "task/submit", json=body)
        data = reply.get("data")
        # success also covers code 3 (a reactivated task); the ID is always in data.
        if not reply.get("success") or isinstance(data, bool) or not isinstance(data, int):
            raise PandaRejectedError(
                f"PanDA rejected task {name}: {reply.get('message') or 'no message'}"
                + (f" (code {data})" if data is not None else ""),
                "task/submit",
                code=data,
            )
        return data

    def task_status(self, task_id: int) -> str | None:
        """Return the task's status (§2b ``GET task/get_status``), None if PanDA does not know it.

        Raises:
            PandaRejectedError: any other refusal.
        """
        reply = self.call("GET", "task/get_status", params={"task_id": task_id})
        if reply.get("success"):
            return str(reply.get("data"))
        message = str(reply.get("message") or "")
        if "not found" in message.lower():
            return None
        raise PandaRejectedError(f"PanDA refused the status of task {task_id}: {message}")

    def task_details(self, task_id: int) -> dict[str, Any]:
        """Return the task's details (§2b ``GET task/get_details``, with its status).

        Raises:
            PandaRejectedError: the task is unknown or PanDA refused.
        """
        reply = self.call(
            "GET",
            "task/get_details",
            params={"task_id": task_id, "include_parameters": "false", "include_status": "true"},
        )
        if not reply.get("success") or not isinstance(reply.get("data"), dict):
            raise PandaRejectedError(
                f"PanDA refused the details of task {task_id}: {reply.get('message')}",
                "task/get_details",
            )
        return reply["data"]

    def kill_task(self, task_id: int) -> None:
        """Ask PanDA to kill the task (§2c ``POST task/kill``); it acts within minutes.

        Raises:
            PandaRejectedError: refused, e.g. the task already ended (code 4) or is unknown (2).
        """
        reply = self.call("POST", "task/kill", json={"task_id": task_id, "broadcast": False})
        if not reply.get("success"):
            raise PandaRejectedError(
                f"PanDA refused to kill task {task_id}: {reply.get('message')}"
                f" (code {reply.get('data')})",
                "task/kill",
                code=reply.get("data"),
            )

    def voms_attributes(self) -> dict[str, str]:
        """Return the VOMS attributes PanDA sees for the caller (``GET
        system/get_voms_attributes``, panda-server ``api/v1/system_api.py``; not in
        PANDA_API.md): ``GRST_CRED_*`` entries, none for a token without a role.

        The cheapest call that checks the credentials, without side effects: a token
        PanDA refuses (bad signature, expired, another audience, not in the VO) fails
        with 403, and a caller with neither certificate nor token gets no answer.
        (``system/get_user_attributes`` would name the caller, but looks the user up
        in Rucio first, up to three times a second apart.)

        Raises:
            PandaAuthError: PanDA refused the credentials, or found no caller.
            PandaUnavailableError: see :meth:`call`.
        """
        reply = self.call("GET", "system/get_voms_attributes")
        data = reply.get("data")
        if not reply.get("success") or not isinstance(data, dict):
            raise PandaAuthError(
                f"PanDA did not identify the caller: {reply.get('message') or 'no message'}",
                "system/get_voms_attributes",
            )
        return {str(key): str(value) for key, value in data.items()}

    def set_user_secret(self, key: str, value: str | None) -> None:
        """Store (or, with ``value=None``, delete) a PanDA user secret.

        ``POST creds/set_user_secrets`` (panda-server ``api/v1/credential_management_api.py``;
        not in PANDA_API.md). The value never appears in a log or message.

        Raises:
            PandaRejectedError: PanDA refused (its message attached).
        """
        body: dict[str, Any] = {"key": key}
        if value is not None:
            body["value"] = value
        reply = self.call("POST", "creds/set_user_secrets", json=body)
        if not reply.get("success"):
            action = "store" if value is not None else "delete"
            raise PandaRejectedError(
                f"PanDA refused to {action} the user secret {key}: {reply.get('message')}",
                "creds/set_user_secrets",
            )

    def put_file(
        self,
        source: bytes | str | os.PathLike[str],
        name: str | None = None,
        *,
        reuse: bool = True,
    ) -> str:
        """Put a file into PanDA's cache; return the URL jobs read it from.

        The upload is ``POST file_server/upload_cache_file`` on the server's host,
        multipart with one part ``file`` whose filename is ``name`` (§2e); it is
        read back from ``<cache host>/cache/<name>``. ``name`` defaults to
        ``sources.idds-fat-<sha256><suffix>``: content-addressed (a name that
        already exists holds the same bytes, so PanDA's ``cannot overwrite``
        means done) and in the 768 MiB ``sources.`` bucket (§5). A gzip file is
        first looked up by size and the CRC32 of its gzip trailer
        (``POST file_server/validate_cache_file``), the checksum the server
        records, when ``reuse``; for other formats that checksum means nothing.

        Raises:
            PandaError: the file is over the size limit of its name (nothing sent),
                or PanDA refused it.
            OSError: ``source`` is a path that cannot be read.
        """
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, suffix = bytes(source), ""
        else:
            path = Path(source)
            data = path.read_bytes()
            suffix = "".join(s for s in path.suffixes[-2:] if re.fullmatch(r"\.[A-Za-z0-9]+", s))
        digest = hashlib.sha256(data).hexdigest()
        addressed = name is None
        name = name or f"sources.idds-fat-{digest}{suffix}"
        if "/" in name or not _SHELL_SAFE.match(name):
            raise ValueError(f"not a usable cache file name: {name!r}")
        limit = SOURCES_LIMIT_BYTES if name.startswith("sources.") else OTHER_LIMIT_BYTES
        if len(data) > limit:
            raise PandaError(
                f"{name} is {len(data) / _MIB:.1f} MiB, over PanDA's {limit // _MIB} MiB cache "
                "limit for its name; nothing was sent",
                "file_server/upload_cache_file",
            )
        if reuse and data[:2] == b"\x1f\x8b" and len(data) >= 18:
            found = self._find_in_cache(len(data), int.from_bytes(data[-8:-4], "little"))
            if found:
                return found
        reply = self.call(
            "POST",
            "file_server/upload_cache_file",
            files={"file": (name, data, "application/octet-stream")},
        )
        message = str(reply.get("message") or "")
        if not reply.get("success"):
            if not (addressed and "cannot overwrite" in message):
                raise PandaRejectedError(
                    f"PanDA refused {name} for its cache: {message}",
                    "file_server/upload_cache_file",
                )
            logger.debug("%s is already in the PanDA cache", name)
        url = f"{self.cache_base}/cache/{name}"
        logger.info("put %s (%d bytes) into the PanDA cache", name, len(data))
        return url

    def _find_in_cache(self, size: int, checksum: int) -> str | None:
        reply = self.call(
            "POST",
            "file_server/validate_cache_file",
            json={"file_size": size, "checksum": checksum},
        )
        message = str(reply.get("message") or "")
        if reply.get("success") and message.startswith("FOUND:"):
            _, host, found = message.split(":", 2)
            logger.info("the PanDA cache already holds this file as %s", found)
            return f"{urlsplit(self.cache_base).scheme}://{host}/cache/{found}"
        return None

    def call(self, method: str, operation: str, **kwargs: Any) -> dict[str, Any]:
        """Send one ``/api/v1/<operation>`` request; return PanDA's JSON envelope.

        The envelope is ``{"success", "message", "data"}``; HTTP 200 does not
        mean success, so callers check ``success`` themselves.

        Raises:
            PandaAuthError: HTTP 401/403 (bad token, limited proxy, banned user, ...).
            PandaUnavailableError: unreachable, or 5xx, after all attempts.
            PandaError: any other HTTP error, or a reply that is not JSON.
        """
        url = f"{self.api}/{operation}"
        host = urlsplit(url).netloc

        def once() -> requests.Response:
            headers = {"Accept": "application/json", **self.auth.headers()}
            # verify per request: requests lets $REQUESTS_CA_BUNDLE (or $CURL_CA_BUNDLE)
            # override a Session's verify, which would drop X509_CERT_DIR.
            response = self._session.request(
                method,
                url,
                headers=headers,
                timeout=self.timeout,
                verify=self._session.verify,
                **kwargs,
            )
            if response.status_code >= 500 or response.status_code in _TRANSIENT_STATUSES:
                logger.debug("PanDA %s answered HTTP %s", operation, response.status_code)
                raise TransientError(f"HTTP {response.status_code}", response)
            return response

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.backoff, max=60.0),
            retry=tenacity.retry_if_exception(_is_transient),
            before_sleep=lambda state: logger.warning(
                "PanDA %s failed (attempt %d of %d), retrying: %s",
                operation,
                state.attempt_number,
                self.attempts,
                self._redact(_describe(state.outcome.exception())),
            ),
            reraise=True,
        )
        try:
            response = retrying(once)
        except TransientError as exc:
            raise PandaUnavailableError(
                f"PanDA server {host} kept failing {operation} after {self.attempts} attempts: "
                f"HTTP {exc.response.status_code} {self._redact(_snippet(exc.response))}",
                operation,
                status=exc.response.status_code,
            ) from None
        except requests.RequestException as exc:
            refusal = _tls_refusal(exc)
            if refusal is not None:
                raise PandaAuthError(
                    self._tls_message(host, operation, refusal), operation
                ) from None
            # `from None`: the requests exception holds the request, headers and all.
            raise PandaUnavailableError(
                f"PanDA server {host} unreachable for {operation} after {self.attempts} "
                f"attempts: {self._redact(_describe(exc))}",
                operation,
            ) from None
        if response.status_code in (401, 403):
            raise PandaAuthError(
                f"PanDA refused {operation} (HTTP {response.status_code}): "
                f"{self._redact(_snippet(response))}",
                operation,
                status=response.status_code,
            )
        if response.status_code != 200:
            raise PandaError(
                f"PanDA answered {operation} with HTTP {response.status_code}: "
                f"{self._redact(_snippet(response))}",
                operation,
                status=response.status_code,
            )
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise PandaError(
                f"PanDA answered {operation} with something else than its JSON envelope: "
                f"{self._redact(_snippet(response))}",
                operation,
                status=200,
            )
        return reply

    def _tls_message(self, host: str, operation: str, reason: str) -> str:
        if "certificate verify failed" in reason:
            trusted = self._session.verify
            where = (
                f"the CA certificates in {trusted}"
                if isinstance(trusted, str)
                else "the system CAs"
            )
            return (
                f"the certificate of PanDA server {host} did not verify against {where} "
                f"({reason}) for {operation}: set X509_CERT_DIR to the grid CA directory"
            )
        return (
            f"PanDA server {host} refused the TLS handshake for {operation} ({reason}): "
            f"it does not accept {self.auth.describe()}; check that the proxy is valid "
            "and signed by a CA the site trusts (voms-proxy-info)"
        )

    def _redact(self, text: str) -> str:
        try:
            token = self.auth.bearer_token()
        except PandaAuthError:
            token = None
        return text.replace(token, "***") if token else text


def _default_verify() -> bool | str:
    if os.environ.get("PANDA_VERIFY_HOST") == "off":
        return False
    ca_dir = os.environ.get("X509_CERT_DIR") or "/etc/grid-security/certificates"
    return ca_dir if os.path.isdir(ca_dir) else True


def _snippet(response: requests.Response, limit: int = 300) -> str:
    text = " ".join(response.text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, TransientError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
