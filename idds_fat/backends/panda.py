"""The ``panda`` backend: each task becomes one PanDA (JEDI) task, each job one of its inputs.

The translation follows what iDDS builds for a function-as-a-task
(``BaseSubmitter.get_task_params``): a task with a pseudo input of one entry
per job, so JEDI makes one PanDA job per entry, and a constant job command in
which ``${IN/L}`` becomes that job's entry. Our entry names the job's spec URL
in the HTTP cache; the command fetches the wrapper from the cache and runs it.

Everything is spoken over PanDA's ``/api/v1`` (JSON) interface, as panda-client
1.6 does. The reference for every call is ``/work/shared/PANDA_API.md``; the
section of each is named where it is used.

Secrets (the workflow's HMAC key and service token) never go into the task
parameters: they are stored as a PanDA *user secret* under a random name
(``POST /api/v1/creds/set_user_secrets``), the task asks for them with
``useSecrets``, the pilot writes them into ``panda_secrets.json`` in the job's
directory, and the job command moves the one we named into the wrapper's
``IDDS_FAT_JOB_SECRETS``. The secret is deleted when the backend shuts down.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import secrets as _random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import tenacity

from idds_fat.backends.base import Backend, ExitCallback, JobExit, JobRequest, Resources
from idds_fat.errors import ConfigError, IddsFatError

if TYPE_CHECKING:
    from idds_fat.config import Config

logger = logging.getLogger(__name__)

#: panda-client's defaults for ``PANDA_URL_SSL`` and ``PANDACACHE_URL`` (PANDA_API.md §1).
DEFAULT_SERVER_URL = "https://pandaserver.cern.ch/server/panda"
DEFAULT_CACHE_URL = "https://pandacache.cern.ch/server/panda"
#: A payload runner that hands its arguments to bash; panda-server's own DOMA/LSST
#: test tasks use it with a shell command as the constant job parameter.
DEFAULT_TRANS_PATH = "https://atlpan.web.cern.ch/atlpan/bash-c"

#: Task states after which no job of the task runs again (PANDA_API.md §4).
#: ``exhausted`` counts: only the production role may retry it.
FINAL_TASK_STATES = frozenset({"done", "finished", "failed", "aborted", "broken", "exhausted"})

_MIB = 1024 * 1024
#: Cache upload limits of panda-client 1.6 (PANDA_API.md §5): ``sources.*`` names
#: get 768 MiB, any other name 10 MiB.
SOURCES_LIMIT_BYTES = 768 * _MIB
OTHER_LIMIT_BYTES = 10 * _MIB

_TRANSIENT_STATUSES = frozenset({408, 429})
# Characters that pass a shell (and JEDI's ${...} templating) unchanged, so the job
# command needs no quoting, whichever way the runner re-splits it.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9._~:/%+@=,-]+\Z")
_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_LOOPBACK_HOSTS = frozenset({"localhost", "::1", "0.0.0.0"})
# The pilot's file for user secrets in the job's directory (pilot3 ``hide_secrets``).
PANDA_SECRETS_FILE = "panda_secrets.json"

# Runs on the node as ``python3 - SECRET_NAME WRAPPER_URL ENTRY`` (the code comes in
# on stdin). Standard library only; exit status 2 is the wrapper's "could not start".
_BOOTSTRAP = r"""
import base64, hashlib, json, os, sys, time, urllib.error, urllib.request
name, wrapper_url, entry = sys.argv[1:4]
def fail(message):
    sys.stderr.write("idds-fat bootstrap: %s\n" % message)
    sys.exit(2)
entry = entry.strip("[]'\" ").split(",")[0]
spec = json.loads(base64.urlsafe_b64decode(entry + "=" * (-len(entry) % 4)))["spec"]
if name != "-":
    value = os.environ.pop(name, None)
    if value is None and os.path.exists("panda_secrets.json"):
        with open("panda_secrets.json") as handle:
            value = json.load(handle).get(name)
    if value is None:
        fail("PanDA user secret %s not found (was the task submitted with useSecrets?)" % name)
    os.environ["IDDS_FAT_JOB_SECRETS"] = value
token = json.loads(os.environ.get("IDDS_FAT_JOB_SECRETS") or "{}").get("token")
request = urllib.request.Request(wrapper_url)
if token:
    request.add_header("Authorization", "Bearer " + token)
for attempt in range(6):
    try:
        data = urllib.request.urlopen(request, timeout=120).read()
        break
    except Exception as exc:
        code = getattr(exc, "code", 500) if isinstance(exc, urllib.error.HTTPError) else 500
        if attempt == 5 or (code < 500 and code not in (408, 429)):
            fail("cannot fetch the wrapper %s: %s" % (wrapper_url, exc))
        time.sleep(2 ** attempt)
key = wrapper_url.rstrip("/").rsplit("/", 1)[-1]
if len(key) == 64 and hashlib.sha256(data).hexdigest() != key:
    fail("the wrapper fetched from %s does not match its sha256" % wrapper_url)
with open("idds_fat_wrapper.py", "wb") as handle:
    handle.write(data)
os.execv(sys.executable, [sys.executable, "idds_fat_wrapper.py", "--spec", spec])
"""
BOOTSTRAP_B64 = base64.b64encode(_BOOTSTRAP.encode()).decode()


# --- errors ----------------------------------------------------------------------------


class PandaError(IddsFatError):
    """PanDA refused a request or could not be reached.

    ``operation`` names the API call (``task/submit``), ``status`` the HTTP status
    (if any) and ``code`` PanDA's own return code (if any). Messages carry what
    PanDA said, never a token or a secret.
    """

    def __init__(
        self, message: str, operation: str = "", status: int | None = None, code: Any = None
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.code = code


class PandaAuthError(PandaError):
    """No usable credentials, or PanDA rejected them (HTTP 401/403)."""


class PandaRejectedError(PandaError):
    """PanDA answered but refused the request (``success: false``), e.g. a task."""


class PandaUnavailableError(PandaError):
    """The server could not be reached, or kept failing (5xx), after all retries."""


# --- authentication --------------------------------------------------------------------


@dataclass(frozen=True)
class PandaAuth:
    """How requests prove who the caller is, as panda-client does (PANDA_API.md §1).

    ``mode="oidc"``: an ID token sent as ``Authorization: Bearer`` with the VO in
    ``Origin``; the token is ``token`` or the (stripped) contents of ``token_file``,
    re-read on every request so an outside refresher can renew it.
    ``mode="x509"``: the proxy file ``proxy`` (certificate and key) as client
    certificate. The token never appears in ``repr``, logs or error messages.
    """

    mode: str
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    vo: str | None = None
    proxy: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("oidc", "x509"):
            raise ConfigError(f"PanDA auth mode must be 'oidc' or 'x509', not {self.mode!r}")
        if self.mode == "oidc" and not (self.token or self.token_file):
            raise PandaAuthError("OIDC auth needs an ID token or a token file")
        if self.mode == "oidc" and not self.vo:
            raise PandaAuthError("OIDC auth needs the VO (PANDA_AUTH_VO or OIDC_AUTH_VO)")
        if self.mode == "x509" and self.proxy is None:
            raise PandaAuthError("X.509 auth needs a proxy file")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PandaAuth:
        """Find credentials where panda-client looks for them.

        ``PANDA_AUTH=oidc`` selects a token: ``$PANDA_AUTH_ID_TOKEN``, the file
        named by ``$OIDC_AUTH_TOKEN_FILE``, ``$OIDC_AUTH_ID_TOKEN``, then the
        ``id_token`` cached in ``$PANDA_CONFIG_ROOT/.token`` (no refresh, no
        device flow: run a panda-client command to renew it), with the VO from
        ``$PANDA_AUTH_VO`` or ``$OIDC_AUTH_VO``. Anything else selects the X.509
        proxy ``$X509_USER_PROXY`` or ``/tmp/x509up_u<uid>``.

        Raises:
            PandaAuthError: no token, no VO, or no readable proxy.
        """
        env = os.environ if environ is None else environ
        if env.get("PANDA_AUTH") == "oidc":
            vo = env.get("PANDA_AUTH_VO") or env.get("OIDC_AUTH_VO")
            if env.get("PANDA_AUTH_ID_TOKEN"):
                return cls("oidc", token=env["PANDA_AUTH_ID_TOKEN"].strip(), vo=vo)
            if env.get("OIDC_AUTH_TOKEN_FILE"):
                return cls("oidc", token_file=Path(env["OIDC_AUTH_TOKEN_FILE"]), vo=vo)
            if env.get("OIDC_AUTH_ID_TOKEN"):
                return cls("oidc", token=env["OIDC_AUTH_ID_TOKEN"].strip(), vo=vo)
            cached = Path(env.get("PANDA_CONFIG_ROOT", ".")).expanduser() / ".token"
            try:
                token = json.loads(cached.read_text())["id_token"]
            except (OSError, ValueError, KeyError, TypeError):
                raise PandaAuthError(
                    "PANDA_AUTH=oidc but no ID token found: set PANDA_AUTH_ID_TOKEN, "
                    "OIDC_AUTH_TOKEN_FILE or OIDC_AUTH_ID_TOKEN, or log in with panda-client "
                    f"so that {cached} holds one"
                ) from None
            return cls("oidc", token=str(token).strip(), vo=vo)
        proxy = env.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"
        if not os.access(proxy, os.R_OK):
            raise PandaAuthError(
                f"no readable X.509 proxy at {proxy}: run voms-proxy-init, set "
                "X509_USER_PROXY, or use PANDA_AUTH=oidc with a token"
            )
        return cls("x509", proxy=Path(proxy))

    def bearer_token(self) -> str | None:
        """Return the ID token (re-reading ``token_file``), or None in X.509 mode.

        Raises:
            PandaAuthError: the token file cannot be read.
        """
        if self.mode != "oidc":
            return None
        if self.token_file is not None:
            try:
                # panda-client reads the file as-is; a trailing newline breaks the header.
                return self.token_file.read_text().strip()
            except OSError as exc:
                raise PandaAuthError(
                    f"cannot read the token file {self.token_file}: {exc.strerror}"
                ) from None
        return self.token

    def headers(self) -> dict[str, str]:
        """Return the auth headers of one request (none in X.509 mode)."""
        token = self.bearer_token()
        if token is None:
            return {}
        return {"Authorization": "Bearer " + token, "Origin": str(self.vo)}


# --- HTTP ------------------------------------------------------------------------------


def api_base(url: str) -> str:
    """Return the ``/api/v1`` base of a PanDA URL: its scheme and host, path dropped.

    ``https://h:25443/server/panda`` gives ``https://h:25443/api/v1`` (PANDA_API.md §6.1).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"not a PanDA server URL: {url!r}")
    return f"{parts.scheme}://{parts.netloc}/api/v1"


class _Transient(Exception):
    """A response worth retrying (5xx, 408, 429)."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _is_transient(exc: BaseException) -> bool:
    return isinstance(
        exc,
        (
            _Transient,
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
            response = self._session.request(
                method, url, headers=headers, timeout=self.timeout, **kwargs
            )
            if response.status_code >= 500 or response.status_code in _TRANSIENT_STATUSES:
                logger.debug("PanDA %s answered HTTP %s", operation, response.status_code)
                raise _Transient(response)
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
        except _Transient as exc:
            raise PandaUnavailableError(
                f"PanDA server {host} kept failing {operation} after {self.attempts} attempts: "
                f"HTTP {exc.response.status_code} {self._redact(_snippet(exc.response))}",
                operation,
                status=exc.response.status_code,
            ) from None
        except requests.RequestException as exc:
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
    if isinstance(exc, _Transient):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"


# --- the backend -----------------------------------------------------------------------


@dataclass
class _Task:
    """One PanDA task and our jobs in it."""

    panda_id: int
    name: str
    jobs: dict[str, JobRequest]
    status: str = "registered"
    ended: set[str] = dataclasses.field(default_factory=set)  # job ids already reported
    cancelled: set[str] = dataclasses.field(default_factory=set)
    kill_requested: bool = False
    unknown_polls: int = 0

    @property
    def open_jobs(self) -> list[JobRequest]:
        return [job for job_id, job in self.jobs.items() if job_id not in self.ended]


class PandaBackend(Backend):
    """Runs each task as one PanDA task, one PanDA job per job of the task.

    A submit of N jobs inserts one task whose pseudo input has N entries, each
    the URL of one job's spec, so JEDI makes N jobs; each job's command fetches
    the wrapper from ``wrapper_url`` and runs it on its spec. One poller thread
    asks PanDA for the status of every unfinished task (one call per task, not
    per job), backing off from ``poll_min`` to ``poll_max`` seconds while
    nothing changes. The documented calls give task-level states only, so jobs
    are reported when their task reaches a final state: ``done`` means every
    job succeeded (exit 0); ``finished``, ``failed``, ``broken`` and
    ``exhausted`` report each job without a result as failed, with the task's
    state and job statistics in the reason.

    Args:
        on_exit: called with ``(job, JobExit)`` when a job has ended.
        wrapper_url: HTTP(S) URL of the wrapper in the cache, ending in its sha256.
        job_secrets: the jobs' secrets (``IDDS_FAT_JOB_SECRETS`` JSON). Stored as
            the PanDA user secret ``secret_name`` and delivered by the pilot; never
            in task parameters. ``None``: the node must provide them itself.
        server_url, cache_url, auth: PanDA server, cache and credentials
            (defaults: ``PANDA_URL_SSL``, ``PANDACACHE_URL``, :meth:`PandaAuth.from_env`).
        client: a ready :class:`PandaClient` (then the three above are not used).
        queue, site, cloud: task parameters ``site`` (the PanDA queue), ``PandaSite``
            and ``cloud``, as iDDS maps them.
        container_image: task parameter ``container_name``.
        max_attempt: PanDA's attempts per job (``maxAttempt`` and ``maxFailure``).
        poll_min, poll_max: seconds between status polls (backing off between them).
        vo, prod_source_label, task_type, priority, user_name, working_group,
            architecture, processing_type: task parameters of the same meaning. Without
            the production role PanDA overrides ``userName``, ``taskType`` and
            ``taskPriority``.
        trans_path: payload runner that executes the job command with bash.
        python: the interpreter jobs run on the node.
        secret_name: name of the PanDA user secret (default: random per backend).

    Raises:
        ConfigError: a URL grid nodes cannot use, or a bad option.
        PandaAuthError: no credentials found.
    """

    name = "panda"
    supported_parameters = frozenset(
        {"cores", "memory_mb", "walltime", "queue", "site", "cloud", "container_options"}
    )

    def __init__(
        self,
        *,
        on_exit: ExitCallback,
        wrapper_url: str,
        job_secrets: Mapping[str, Any] | None = None,
        server_url: str | None = None,
        cache_url: str | None = None,
        auth: PandaAuth | None = None,
        client: PandaClient | None = None,
        queue: str | None = None,
        site: str | None = None,
        cloud: str | None = None,
        container_image: str | None = None,
        max_attempt: int = 5,
        poll_min: float = 30.0,
        poll_max: float = 600.0,
        vo: str = "wlcg",
        prod_source_label: str = "user",
        task_type: str = "anal",
        priority: int = 1000,
        user_name: str = "idds-fat",
        working_group: str | None = None,
        architecture: str = "",
        processing_type: str = "idds-fat",
        trans_path: str = DEFAULT_TRANS_PATH,
        python: str = "python3",
        secret_name: str | None = None,
    ) -> None:
        _check_node_url(wrapper_url, "wrapper_url")
        if not _SHELL_SAFE.match(python):
            raise ConfigError(f"python must be a plain command or path, not {python!r}")
        if not 1 <= max_attempt <= 50:
            raise ConfigError(f"max_attempt must be between 1 and 50, not {max_attempt}")
        if not 0 < poll_min <= poll_max:
            raise ConfigError(f"need 0 < poll_min <= poll_max, not {poll_min} and {poll_max}")
        self._secret_name = secret_name or f"IDDS_FAT_{_random.token_hex(8).upper()}"
        if not _SECRET_NAME.match(self._secret_name):
            raise ConfigError(f"secret_name must be an environment variable name: {secret_name!r}")
        self._on_exit = on_exit
        self._wrapper_url = wrapper_url
        # Serialised once; never logged, never part of a task parameter.
        self._secrets_json = json.dumps(dict(job_secrets)) if job_secrets is not None else None
        self._client = client or PandaClient(server_url, auth, cache_url=cache_url)
        self._placement = {"site": queue, "PandaSite": site, "cloud": cloud}
        self._container_image = container_image
        self._max_attempt = max_attempt
        self._poll_min = poll_min
        self._poll_max = poll_max
        self._task_fields = {
            "userName": user_name,
            "vo": vo,
            "prodSourceLabel": prod_source_label,
            "taskPriority": priority,
            "taskType": task_type,
            "processingType": processing_type,
            "architecture": architecture,
            "transUses": "",
            "transHome": None,
            "transPath": trans_path,
        }
        if working_group:
            self._task_fields["workingGroup"] = working_group
        self._python = python
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._tasks: dict[int, _Task] = {}
        self._secret_stored = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._closed = False

    @classmethod
    def create(cls, config: Config, setup: Any) -> PandaBackend:
        """Build the backend for a workflow: server and credentials from the environment.

        Uses ``setup.on_exit``, ``setup.wrapper_url``, ``setup.secrets`` and the
        ``queue``, ``site``, ``cloud`` and ``container_options["container_image"]``
        of ``setup.placement`` (a :class:`~idds_fat.backends.base.BackendSetup`);
        ``PANDA_URL_SSL``, ``PANDACACHE_URL`` and the auth variables as
        panda-client reads them.

        Raises:
            ConfigError: the workflow's cache is not an HTTP cache grid nodes can reach.
            PandaAuthError: no credentials found.
        """
        if not getattr(setup, "wrapper_url", None):
            raise ConfigError(
                "the panda backend needs an HTTP cache that grid nodes can reach: run "
                "`idds-fat serve` on a public host and set service_url and cache='service'"
            )
        placement = dict(getattr(setup, "placement", None) or {})
        container = placement.get("container_options") or {}
        return cls(
            on_exit=setup.on_exit,
            wrapper_url=setup.wrapper_url,
            job_secrets=setup.secrets,
            queue=placement.get("queue"),
            site=placement.get("site"),
            cloud=placement.get("cloud"),
            container_image=container.get("container_image"),
        )

    @property
    def client(self) -> PandaClient:
        """The HTTP client this backend uses (for :meth:`PandaClient.put_file` and the like)."""
        return self._client

    @property
    def secret_name(self) -> str:
        """Name of the PanDA user secret that carries the job secrets (not the secret)."""
        return self._secret_name

    def put_file(
        self, source: bytes | str | os.PathLike[str], name: str | None = None, reuse: bool = True
    ) -> str:
        """Put a file (e.g. the code context) into PanDA's cache; return its download URL.

        See :meth:`PandaClient.put_file`.
        """
        return self._client.put_file(source, name, reuse=reuse)

    def check(self, resources: Resources) -> None:
        """Raise ValueError for resources no PanDA task of this backend can ask for.

        GPUs are refused: no documented task parameter requests them (pick a GPU
        queue with ``queue=`` instead).
        """
        if resources.gpus:
            raise ValueError(
                "the panda backend cannot request GPUs per job; send the task to a GPU "
                "queue with queue=... and leave gpus unset"
            )
        if resources.cores is not None and resources.cores < 1:
            raise ValueError(f"cores must be at least 1, not {resources.cores}")
        if resources.memory_mb is not None and resources.memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, not {resources.memory_mb}")
        if resources.walltime is not None and resources.walltime <= 0:
            raise ValueError(f"walltime must be positive, not {resources.walltime}")

    def submit(self, jobs: Sequence[JobRequest]) -> None:
        """Insert one PanDA task per group of ``jobs`` (same workflow task and resources).

        When PanDA refuses, every job of this call not yet in a task is also
        reported through ``on_exit`` (with PanDA's message), so no job is left
        waiting for an end that cannot come.

        Raises:
            ValueError: a job's resources cannot be had, or its spec is not an HTTP URL.
            PandaError: PanDA refused the secret or the task, or could not be reached.
        """
        for job in jobs:
            self.check(job.resources)
            _check_node_url(job.spec_location, f"the spec of {job.name}")
        if self._closed:
            raise PandaError("this PanDA backend is shut down")
        groups: dict[tuple[str, Resources], list[JobRequest]] = {}
        for job in jobs:
            groups.setdefault((job.job_id.rsplit("/", 1)[0], job.resources), []).append(job)
        pending = list(groups.values())
        try:
            if pending:
                self._store_secret()
            while pending:
                group = pending[0]
                params = self.task_parameters(group)
                panda_id = self._client.submit_task(params)
                task = _Task(panda_id, params["taskName"], {job.job_id: job for job in group})
                with self._lock:
                    self._tasks[panda_id] = task
                pending.pop(0)
                logger.info(
                    "submitted PanDA task %d (%s) with %d job(s)", panda_id, task.name, len(group)
                )
        except PandaError as exc:
            reason = f"not submitted to PanDA: {exc}"
            self._report([(job, JobExit(None, reason)) for group in pending for job in group])
            raise
        finally:
            if self._tasks:
                self._start_poller()

    def task_parameters(self, jobs: Sequence[JobRequest]) -> dict[str, Any]:
        """Return the task parameter map for ``jobs`` (one PanDA task, one input each).

        Shaped like iDDS's for a function-as-a-task (PANDA_API.md §3). It names the
        secret but never holds it.
        """
        resources = jobs[0].resources
        cores = resources.cores or 1
        base = _slug(jobs[0].name.rsplit("/", 1)[0] if "/" in jobs[0].name else jobs[0].job_id)
        task_name = f"idds-fat.{base}.{_random.token_hex(4)}"[:128]
        params: dict[str, Any] = {"taskName": task_name, **self._task_fields}
        params.update({key: value for key, value in self._placement.items() if value})
        if self._container_image:
            params["container_name"] = self._container_image
        params["coreCount"] = cores
        if resources.memory_mb:
            params["ramCount"] = math.ceil(resources.memory_mb / cores)
            params["ramUnit"] = "MBPerCoreFixed"
        if resources.walltime:
            # JEDI reads maxWalltime in hours, as prun documents it (iDDS passes seconds).
            params["maxWalltime"] = math.ceil(resources.walltime / 3600)
        params["maxAttempt"] = self._max_attempt
        params["maxFailure"] = self._max_attempt
        params["skipScout"] = True  # scouting would hold all but a few jobs back
        if self._secrets_json is not None:
            params["useSecrets"] = True
        params["noInput"] = True
        params["nFiles"] = len(jobs)
        params["nFilesPerJob"] = 1
        params["pfnList"] = [pseudo_input(job) for job in jobs]
        params["jobParameters"] = [{"type": "constant", "value": self.job_command()}]
        dataset = f"panda.idds_fat.{task_name}"
        params["log"] = {
            "type": "template",
            "param_type": "log",
            "dataset": dataset + "/",
            "container": dataset + "/",
            "value": dataset + ".${SN}.log.tgz",
        }
        return params

    def job_command(self) -> str:
        """Return the job command: the bootstrap (on stdin) run with ``${IN/L}``.

        Every word is shell-safe, so it works whether the runner passes it to
        ``bash -c`` as one string or the pilot's shell splits it first.
        """
        name = self._secret_name if self._secrets_json is not None else "-"
        return (
            f"echo {BOOTSTRAP_B64} | base64 -d | {self._python} - {name} "
            f"{self._wrapper_url} ${{IN/L}}"
        )

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel jobs: kill a PanDA task once every open job of it is cancelled.

        PanDA kills whole tasks, and nothing maps our jobs to PanDA job IDs, so a
        subset of a task is reported cancelled at once but keeps running on the
        grid (its result is ignored); the task is killed when its last open job
        is cancelled. A kill PanDA refuses is logged, not raised.
        """
        wanted = set(job_ids)
        to_kill: list[_Task] = []
        reports: list[tuple[JobRequest, JobExit]] = []
        with self._lock:
            for task in self._tasks.values():
                hits = {j for j in task.jobs if j in wanted and j not in task.ended}
                if not hits:
                    continue
                task.cancelled |= hits
                if not task.kill_requested and all(j in task.cancelled for j in task.jobs):
                    task.kill_requested = True
                    to_kill.append(task)
                for job_id in sorted(hits):
                    task.ended.add(job_id)
                    reports.append((task.jobs[job_id], JobExit(None, "cancelled", cancelled=True)))
            self._changed.notify_all()
        for task in to_kill:
            try:
                self._client.kill_task(task.panda_id)
                logger.info("asked PanDA to kill task %d (%s)", task.panda_id, task.name)
            except PandaError as exc:
                logger.error(
                    "could not kill PanDA task %d (%s): %s; kill it by hand (pbook: kill(%d))",
                    task.panda_id,
                    task.name,
                    exc,
                    task.panda_id,
                )
        self._report(reports)

    def shutdown(self, cancel: bool = False) -> None:
        """Wait until PanDA ends every task (or cancel them all first), then clean up.

        Cleaning up deletes the PanDA user secret and closes the connections.
        """
        if cancel:
            with self._lock:
                open_ids = [j.job_id for t in self._tasks.values() for j in t.open_jobs]
            self.cancel(open_ids)
        self._wake.set()  # poll soon rather than after a long backoff
        with self._changed:
            while any(task.open_jobs for task in self._tasks.values()):
                self._changed.wait()
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._poller is not None:
            self._poller.join()
        if self._secret_stored:
            try:
                self._client.set_user_secret(self._secret_name, None)
            except PandaError as exc:
                logger.warning(
                    "could not delete the PanDA user secret %s: %s; delete it with pbook",
                    self._secret_name,
                    exc,
                )
        self._client.close()

    def poll(self) -> bool:
        """Ask PanDA once for the status of every unfinished task; report ended jobs.

        The poller thread calls this; it is public so a caller (or a test) can
        poll at once. Returns whether any task changed state. Errors are logged:
        the next poll tries again.
        """
        with self._poll_lock:  # one poll at a time owns the tasks' status fields
            return self._poll_tasks()

    def _poll_tasks(self) -> bool:
        with self._lock:
            tasks = [task for task in self._tasks.values() if task.open_jobs]
        changed = False
        for task in tasks:
            try:
                status = self._client.task_status(task.panda_id)
            except PandaError as exc:
                logger.warning("could not get the status of PanDA task %d: %s", task.panda_id, exc)
                continue
            if status is None:
                task.unknown_polls += 1
                if task.unknown_polls >= 3:
                    changed = True
                    self._end_task(task, None, f"PanDA no longer knows task {task.panda_id}")
                continue
            task.unknown_polls = 0
            if status != task.status:
                changed = True
                logger.info("PanDA task %d (%s) is %s", task.panda_id, task.name, status)
                task.status = status
            if status in FINAL_TASK_STATES:
                changed = True
                self._end_task(task, status, self._statistics(task))
        return changed

    # --- internals ---------------------------------------------------------------------

    def _store_secret(self) -> None:
        with self._lock:
            if self._secrets_json is None or self._secret_stored:
                return
            self._secret_stored = True
        try:
            self._client.set_user_secret(self._secret_name, self._secrets_json)
        except PandaError:
            with self._lock:
                self._secret_stored = False
            raise
        logger.info("stored the job secrets as PanDA user secret %s", self._secret_name)

    def _statistics(self, task: _Task) -> str:
        try:
            details = self._client.task_details(task.panda_id)
        except PandaError as exc:
            logger.warning("could not get the details of PanDA task %d: %s", task.panda_id, exc)
            return ""
        return str(details.get("statistics") or "")

    def _end_task(self, task: _Task, status: str | None, detail: str) -> None:
        exit_for = _exit_mapping(task, status, detail)
        with self._lock:
            reports = [(job, exit_for(job)) for job in task.open_jobs]
            task.ended.update(job.job_id for job, _ in reports)
            self._changed.notify_all()
        self._report(reports)

    def _report(self, reports: list[tuple[JobRequest, JobExit]]) -> None:
        for job, outcome in reports:
            try:
                self._on_exit(job, outcome)
            except Exception:  # a failing callback must not stop the poller
                logger.exception("on_exit failed for %s", job.name)

    def _start_poller(self) -> None:
        with self._lock:
            if self._poller is None:
                self._poller = threading.Thread(
                    target=self._poll_loop, name="idds-fat-panda-poller", daemon=True
                )
                self._poller.start()
        self._wake.set()

    def _poll_loop(self) -> None:
        interval = self._poll_min
        next_poll = time.monotonic() + interval
        while not self._stop.is_set():
            if self._wake.wait(max(0.0, next_poll - time.monotonic())):
                # New work or a shutdown: poll within poll_min, whatever the backoff was.
                self._wake.clear()
                interval = self._poll_min
                next_poll = min(next_poll, time.monotonic() + interval)
                continue
            try:
                changed = self.poll()
            except Exception:  # the poller must outlive any surprise
                logger.exception("PanDA status poll failed")
                changed = False
            interval = self._poll_min if changed else min(interval * 2, self._poll_max)
            next_poll = time.monotonic() + interval


def _exit_mapping(task: _Task, status: str | None, detail: str) -> Callable[[JobRequest], JobExit]:
    where = f"PanDA task {task.panda_id}"
    stats = f" (jobs: {detail})" if detail else ""
    if status is None:
        return lambda job: JobExit(None, detail)
    if status == "done":
        return lambda job: JobExit(0, f"{where} is done: all its jobs succeeded{stats}")
    if status == "aborted":
        if task.kill_requested:
            return lambda job: JobExit(None, "cancelled", cancelled=True)
        return lambda job: JobExit(None, f"{where} was aborted outside this workflow{stats}")
    reason = (
        f"{where} ended {status}{stats}; PanDA's job-level errors are on its monitor "
        f"page of task {task.panda_id}"
    )
    return lambda job: JobExit(None, reason)


def pseudo_input(job: JobRequest) -> str:
    """Return the pseudo-input entry of ``job``: url-safe base64 of ``{"spec": URL}``.

    url-safe, unpadded: no ``/`` (JEDI names pseudo files after the basename), no
    ``^`` (its event-count separator) and nothing a shell would touch.
    """
    raw = json.dumps({"spec": job.spec_location}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", ".", text).strip(".")[:80] or "task"


def _check_node_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be an HTTP(S) URL grid nodes can reach, not {url!r}")
    host = parts.hostname
    if host in _LOOPBACK_HOSTS or host.startswith("127."):
        raise ConfigError(
            f"{what} is on this machine's loopback ({host}); grid nodes cannot reach it"
        )
    if not _SHELL_SAFE.match(url):
        raise ConfigError(f"{what} has characters a job command cannot carry: {url!r}")
