"""What a job is given: its spec (``JobSpec``, from the cache) and its secrets (a pipe or a file).

Secrets never sit in a job process's environment block (``/proc/PID/environ``,
which removing a variable later does not change): the process that starts a
wrapper hands them over on an inherited pipe (``IDDS_FAT_JOB_SECRETS_FD``
names its descriptor) or in a 0600 file (``IDDS_FAT_JOB_SECRETS_FILE`` names
it); either variable holds no secret. ``IDDS_FAT_JOB_SECRETS`` (the JSON
itself) is still read, for sites that set it, and then the wrapper starts
itself again with the secrets on a pipe (``main``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .envelope import WRAPPER_VERSION
from .errors import WrapperError

SECRETS_ENV = "IDDS_FAT_JOB_SECRETS"  # the JSON itself: a site's hook, moved to a pipe at start
SECRETS_FILE_ENV = "IDDS_FAT_JOB_SECRETS_FILE"  # the path of a 0600 file holding the JSON
SECRETS_FD_ENV = "IDDS_FAT_JOB_SECRETS_FD"  # the number of an inherited pipe holding the JSON

# Keys written only when set (a job on S3 gets presigned URLs); the others are always written.
_WRITTEN_WHEN_SET = ("urls", "result_object", "result_put_url")


@dataclasses.dataclass(repr=False)  # a generated repr would show presigned URLs
class JobSpec:
    """One job's spec: a JSON document in the cache, named by its sha256.

    The fields are its JSON keys (docs/contracts.md, "Job spec"). Every other
    object it names is named by its sha256, so the chain of hashes that starts
    at the job's command line covers them all. Secrets are never in a spec.
    """

    workflow: str
    task: str
    job: int
    cache: str  # a directory, a file:// or an HTTP URL
    payload: dict[str, Any]  # {"key": sha256 of the call envelope}
    result_url: str  # the REST result store of the workflow
    publish_timeout: float  # seconds a job keeps trying to deliver its result
    version: int = WRAPPER_VERSION
    attempt: int = 0
    name: str = ""
    archive: dict[str, Any] | None = None  # the code context: {"key", "max_bytes"}
    kwargs: dict[str, Any] | None = None  # {"inline": base64 envelope} or {"key": sha256}
    stomp: dict[str, Any] | None = None  # brokers, destination, mirror, mirror_ttl, timeout
    result_inline_bytes: int | None = None  # a larger result travels by reference
    environment: dict[str, Any] | None = None  # {"kind": "current" | "venv" | "conda" | ...}
    init_env: str | None = None  # a shell prefix, as iDDS runs it
    urls: dict[str, str] | None = None  # on S3: a presigned GET per cache key
    result_object: str | None = None  # on S3: the name a large result is stored under,
    result_put_url: str | None = None  # and a presigned PUT for it

    def __repr__(self) -> str:
        return f"JobSpec({self.workflow}/{self.task}/{self.job} attempt {self.attempt})"

    def to_json(self) -> bytes:
        """Return the spec as JSON with sorted keys: the bytes the cache keys by their sha256."""
        doc = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in _WRITTEN_WHEN_SET:
            if doc[name] is None:
                del doc[name]
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> JobSpec:
        """Read a spec written by ``to_json``; keys this version does not know are ignored.

        Raises WrapperError when ``data`` is not a JSON object, lacks a
        required key, or is a spec of another version than this wrapper's.
        """
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise WrapperError(f"the job spec is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise WrapperError("the job spec is not a JSON object")
        if doc.get("version") != WRAPPER_VERSION:
            raise WrapperError(
                f"the job spec has version {doc.get('version')!r}; this wrapper reads "
                f"version {WRAPPER_VERSION} (caller and job run different idds-fat versions)"
            )
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in doc]
        if missing:
            raise WrapperError(f"the job spec lacks {', '.join(missing)}")
        return cls(**{f.name: doc[f.name] for f in fields if f.name in doc})


def secrets_json(secrets: dict) -> bytes:
    """Return the JSON a wrapper reads its secrets from (``secrets`` as ``read_secrets`` gives)."""
    return json.dumps(
        {
            "hmac_key": secrets["key"].hex(),
            "token": secrets.get("token"),
            "broker_user": secrets.get("broker_user"),
            "broker_password": secrets.get("broker_password"),
        }
    ).encode()


def secrets_pipe(raw: bytes) -> int:
    """Return the read end of a new pipe that holds ``raw`` and is closed for writing.

    The descriptor is inheritable by an ``exec`` (give it to ``subprocess`` with
    ``pass_fds``), and the caller closes its own copy once the child started.
    Raises WrapperError when ``raw`` exceeds ``select.PIPE_BUF`` bytes: only that
    much is sure to fit in a pipe nobody reads yet.
    """
    import select  # the caller's and a worker's side only: a job never loads it

    if len(raw) > select.PIPE_BUF:
        raise WrapperError(f"the job secrets are {len(raw)} bytes, over {select.PIPE_BUF}")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, raw)
    finally:
        os.close(write_end)
    os.set_inheritable(read_end, True)
    return read_end


def _read_pipe(fd: int) -> str:
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        if fd == 0:  # stdin (a container's): what the job reads there must be empty
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        else:
            os.close(fd)
    return b"".join(chunks).decode()


def read_secrets() -> dict:
    """Take the job's secrets from the pipe, the file or the variable the environment names.

    The three variables (``SECRETS_FD_ENV``, ``SECRETS_FILE_ENV``,
    ``SECRETS_ENV``, tried in this order) are removed from ``os.environ``, so
    processes the job starts do not inherit them; a pipe is read to its end and
    closed (stdin is left reading ``/dev/null``). Raises WrapperError when none
    is set, OSError when the pipe or file cannot be read, ValueError when the
    JSON is not valid.
    """
    fd = os.environ.pop(SECRETS_FD_ENV, None)
    path = os.environ.pop(SECRETS_FILE_ENV, None)
    raw = os.environ.pop(SECRETS_ENV, None)
    if fd:
        raw = _read_pipe(int(fd))
    elif path:
        with open(path) as handle:
            raw = handle.read()
    if raw is None:
        raise WrapperError(
            f"no job secrets: set {SECRETS_FD_ENV}, {SECRETS_FILE_ENV} or {SECRETS_ENV}"
        )
    secrets = json.loads(raw)
    return {
        "key": bytes.fromhex(secrets["hmac_key"]),
        "token": secrets.get("token"),
        "broker_user": secrets.get("broker_user"),
        "broker_password": secrets.get("broker_password"),
    }
