"""What a job is given: its spec (``JobSpec``, from the cache) and its secrets (environment)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .envelope import WRAPPER_VERSION
from .errors import WrapperError

SECRETS_ENV = "IDDS_FAT_JOB_SECRETS"
SECRETS_FILE_ENV = "IDDS_FAT_JOB_SECRETS_FILE"

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


def read_secrets() -> dict:
    """Take the job's secrets out of the environment (or the file it names)."""
    raw = os.environ.pop(SECRETS_ENV, None)
    path = os.environ.pop(SECRETS_FILE_ENV, None)
    if raw is None and path:
        raw = Path(path).read_text()
    if raw is None:
        raise WrapperError(f"no job secrets: set {SECRETS_ENV} or {SECRETS_FILE_ENV}")
    secrets = json.loads(raw)
    return {
        "key": bytes.fromhex(secrets["hmac_key"]),
        "token": secrets.get("token"),
        "broker_user": secrets.get("broker_user"),
        "broker_password": secrets.get("broker_password"),
    }
