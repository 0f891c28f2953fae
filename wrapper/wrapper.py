#!/usr/bin/env python3
"""The idds-fat job wrapper: runs one job of a task on any node.

Usage::

    python3 wrapper.py --spec LOCATION

``LOCATION`` is a path or URL of the job spec, a JSON document in the content
cache whose name is its sha256 (the wrapper checks it). The spec names every
other object by sha256: the code context archive, the call payload and the
job's own arguments. The wrapper fetches and verifies them, extracts the archive
into a fresh directory (no path traversal, no links, a size limit), runs the
function there, and posts a signed result envelope to the result store.

Secrets never travel on the command line: the workflow's HMAC key and the
service token come from the environment variable ``IDDS_FAT_JOB_SECRETS`` (a
JSON object) or from the file named by ``IDDS_FAT_JOB_SECRETS_FILE``, and are
removed from the environment before the user's function runs.

Delivery: STOMP 1.2 to the workflow's queue (and its mirror) with a broker
receipt awaited, when the spec names brokers; else, or when that fails, POST
to the REST result store; both retried with backoff. A result larger than the
spec's ``result_inline_bytes`` is put into the cache and the channels carry a
signed reference to it.

Exit status: 0 when the result (a value or the function's exception) was
delivered; 3 when it could not be delivered within the spec's publish timeout;
2 when the job could not even report its failure. A result is never silently
lost: a non-zero exit tells the backend the job ended without one.

This file is shipped to the node alone. It imports only the standard library,
and cloudpickle when it runs a job. It is also the single definition of the
envelope format, which the SDK loads from here.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import io
import json
import os
import pickle
import shutil
import socket
import stat
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

WRAPPER_VERSION = 1
ENVELOPE_MAGIC = b"IDDSFAT1"
_MAC_LEN = 32
_HEADER_LEN_BYTES = 4
SECRETS_ENV = "IDDS_FAT_JOB_SECRETS"
SECRETS_FILE_ENV = "IDDS_FAT_JOB_SECRETS_FILE"
EXIT_UNDELIVERED = 3
EXIT_UNREPORTED = 2


class WrapperError(Exception):
    """A failure of the wrapper itself, before or after the user's function."""


class IntegrityError(WrapperError):
    """Bytes did not match their sha256 or HMAC."""


class UnsafeArchiveError(IntegrityError):
    """An archive entry escapes the tree, is a link, or the archive expands too far."""


class DeliveryError(WrapperError):
    """The result could not be handed to the result store in time."""


# --- envelope: the signed container of every pickled object that travels -------------


def sha256_hex(data: bytes) -> str:
    """Return the hex sha256 of ``data``: the content key of the cache."""
    return hashlib.sha256(data).hexdigest()


def seal(header: dict, body: bytes, key: bytes) -> bytes:
    """Wrap ``body`` with a JSON ``header`` and an HMAC-SHA256 under ``key``.

    Layout: magic, header length (4 bytes, big-endian), header JSON (with the
    body's sha256 added), body, then the 32-byte MAC over everything before it.
    """
    header = dict(header, v=WRAPPER_VERSION, sha256=sha256_hex(body), size=len(body))
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    signed = ENVELOPE_MAGIC + len(head).to_bytes(_HEADER_LEN_BYTES, "big") + head + body
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def peek(data: bytes) -> tuple[dict, bytes]:
    """Split an envelope into header and body WITHOUT verifying it.

    For routing and indexing only (the service does this); never unpickle what
    this returns. Raises ValueError when ``data`` is not an envelope.
    """
    start = len(ENVELOPE_MAGIC) + _HEADER_LEN_BYTES
    if len(data) < start + _MAC_LEN or not data.startswith(ENVELOPE_MAGIC):
        raise ValueError("not an idds-fat envelope")
    head_len = int.from_bytes(data[len(ENVELOPE_MAGIC) : start], "big")
    if start + head_len + _MAC_LEN > len(data):
        raise ValueError("truncated idds-fat envelope")
    try:
        header = json.loads(data[start : start + head_len])
    except ValueError:
        raise ValueError("idds-fat envelope with an unreadable header") from None
    if not isinstance(header, dict):
        raise ValueError("idds-fat envelope with an unreadable header")
    return header, data[start + head_len : -_MAC_LEN]


def unseal(data: bytes, key: bytes) -> tuple[dict, bytes]:
    """Verify an envelope's HMAC and body sha256; return ``(header, body)``.

    Raises IntegrityError when the envelope is malformed, signed with another
    key, or its body does not match the sha256 in its header.
    """
    try:
        header, body = peek(data)
    except ValueError as exc:
        raise IntegrityError(str(exc)) from None
    expected = hmac.new(key, data[:-_MAC_LEN], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, data[-_MAC_LEN:]):
        raise IntegrityError("envelope signature does not verify (forged or wrong key)")
    if header.get("v") != WRAPPER_VERSION:
        raise IntegrityError(f"envelope version {header.get('v')!r} is not {WRAPPER_VERSION}")
    if header.get("sha256") != sha256_hex(body):
        raise IntegrityError("envelope body does not match its sha256")
    return header, body


# --- fetching from the content cache -------------------------------------------------


def _http(method: str, url: str, token: str | None, data: bytes | None, timeout: float) -> bytes:
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(exc, (urllib.error.URLError, OSError, TimeoutError))


def _with_retries(action, deadline: float, what: str):
    """Run ``action`` until it succeeds, a permanent error, or ``deadline`` passes."""
    delay = 0.05
    while True:
        try:
            return action()
        except Exception as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise WrapperError(f"{what}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def cache_object_location(cache: str, key: str) -> str:
    """Return where object ``key`` lives in ``cache`` (a directory, ``file://`` or HTTP URL)."""
    if cache.startswith(("http://", "https://")):
        return cache.rstrip("/") + "/" + key
    root = urllib.parse.unquote(cache[len("file://") :]) if cache.startswith("file://") else cache
    return str(Path(root) / key[:2] / key)


def public_url(location: str) -> str:
    """``location`` without its query string: a presigned URL's signature stays out of logs."""
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
            data = _with_retries(
                lambda: _http("GET", location, token, None, 60.0), deadline, "fetching " + shown
            )
        except WrapperError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, urllib.error.HTTPError)
                and cause.code == 403
                and shown != location
            ):
                raise WrapperError(
                    f"fetching {shown}: HTTP 403: the presigned URL was refused; it may have "
                    "expired (raise the store's url_lifetime for long-queued jobs)"
                ) from None
            raise
    else:
        path = location[len("file://") :] if location.startswith("file://") else location
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise WrapperError(f"fetching {location}: {exc}") from None
    if key is not None and sha256_hex(data) != key:
        raise IntegrityError(f"{shown}: content does not match its sha256 {key}")
    return data


# --- safe extraction of the code context ----------------------------------------------


def safe_extract(data: bytes, dest: Path, max_bytes: int, max_files: int = 200_000) -> int:
    """Extract zip ``data`` into directory ``dest``; return the bytes written.

    Refuses absolute names, ``..`` components, links and device entries, more
    than ``max_files`` entries, and more than ``max_bytes`` of content (counted
    while decompressing, so a lying header does not help a zip bomb).

    Raises UnsafeArchiveError, leaving only what was written before the refusal.
    """
    dest = Path(dest).resolve()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"not a zip archive: {exc}") from None
    entries = archive.infolist()
    if len(entries) > max_files:
        raise UnsafeArchiveError(f"archive has {len(entries)} entries, more than {max_files}")
    written = 0
    for info in entries:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise UnsafeArchiveError(f"archive entry {name!r} points outside the tree")
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"archive entry {name!r} is a link or special file")
        target = (dest / name).resolve()
        if target != dest and dest not in target.parents:
            raise UnsafeArchiveError(f"archive entry {name!r} points outside the tree")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, open(target, "xb") as sink:
            while True:
                chunk = source.read(1 << 20)
                if not chunk:
                    break
                written += len(chunk)
                if written > max_bytes:
                    raise UnsafeArchiveError(f"archive expands beyond {max_bytes} bytes")
                sink.write(chunk)
        os.chmod(target, 0o755 if mode & 0o111 else 0o644)
    return written


# --- running the job -------------------------------------------------------------------


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


def _error_body(exc: BaseException, tb_text: str) -> dict:
    """Describe ``exc`` for the caller; include its pickle only if it round-trips."""
    import cloudpickle

    pickled = None
    try:
        candidate = cloudpickle.dumps(exc)
        pickle.loads(candidate)
        pickled = candidate
    except Exception:
        pass
    return {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": tb_text,
        "pickled": pickled,
    }


def _run_function(spec: dict, secrets: dict, workdir: Path) -> tuple[str, object]:
    """Fetch, verify, extract and run; return ``(status, value_or_error_body)``."""
    import cloudpickle

    cache, token, key = spec["cache"], secrets["token"], secrets["key"]

    urls = spec.get("urls") or {}

    def get(key_: str) -> bytes:
        if key_ in urls:  # a presigned URL: it carries its own authorisation
            return fetch(urls[key_], key_, None)
        return fetch(cache_object_location(cache, key_), key_, token)

    try:
        archive = spec.get("archive")
        context_dir = workdir
        if archive:
            context_dir = Path(tempfile.mkdtemp(prefix="context-", dir=workdir))
            safe_extract(get(archive["key"]), context_dir, int(archive["max_bytes"]))
        _, payload = unseal(get(spec["payload"]["key"]), key)
        fn, args, kwargs = cloudpickle.loads(payload)
        job_kwargs = spec.get("kwargs")
        if job_kwargs:
            raw = (
                base64.b64decode(job_kwargs["inline"])
                if "inline" in job_kwargs
                else get(job_kwargs["key"])
            )
            _, body = unseal(raw, key)
            kwargs = {**kwargs, **cloudpickle.loads(body)}
    except Exception as exc:
        text = traceback.format_exc()
        print(f"idds-fat wrapper: job setup failed:\n{text}", file=sys.stderr)
        return "setup_error", _error_body(exc, text)

    sys.path.insert(0, str(context_dir))
    os.chdir(context_dir)
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: B036 - SystemExit in user code is a result too
        tb = exc.__traceback__
        # Drop the wrapper's own frame: the user wants to see their function.
        text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb else None))
        return "error", _error_body(exc, text)
    finally:
        os.chdir(workdir)
    return "ok", value


def run_job(spec: dict, secrets: dict, workdir: Path) -> bytes:
    """Run the job that ``spec`` describes; return its sealed result envelope."""
    import cloudpickle

    started = time.time()
    status, outcome = _run_function(spec, secrets, workdir)
    if status == "ok":
        try:
            body = cloudpickle.dumps(outcome)
        except Exception as exc:
            status = "error"
            failure = TypeError(f"the function's return value could not be pickled: {exc}")
            body = cloudpickle.dumps(_error_body(failure, traceback.format_exc()))
    else:
        body = cloudpickle.dumps(outcome)
    header = {
        "kind": "result",
        "workflow": spec["workflow"],
        "task": spec["task"],
        "job": spec["job"],
        "attempt": spec.get("attempt", 0),
        "status": status,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "finished": time.time(),
    }
    return seal(header, body, secrets["key"])


def put_object(cache: str, data: bytes, token: str | None, deadline: float) -> str:
    """Store ``data`` in ``cache`` under its sha256 (skipped if present); return the key."""
    key = sha256_hex(data)
    if cache.startswith(("http://", "https://")):
        url = cache_object_location(cache, key)
        _with_retries(lambda: _http("PUT", url, token, data, 60.0), deadline, "storing " + url)
        return key
    path = Path(cache_object_location(cache, key))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    return key


def by_reference(envelope: bytes, spec: dict, secrets: dict, deadline: float) -> bytes:
    """Put a large result envelope into the cache; return the small signed message naming it."""
    header, _ = peek(envelope)
    ref = {k: header[k] for k in ("workflow", "task", "job", "attempt", "status")}
    ref.update(kind="result-ref", ref_size=len(envelope), ref_sha256=sha256_hex(envelope))
    put_url = spec.get("result_put_url")
    if put_url:  # a presigned PUT for this job's result object (S3)
        shown = public_url(put_url)
        _with_retries(
            lambda: _http("PUT", put_url, None, envelope, 300.0), deadline, "storing " + shown
        )
        ref["ref_name"] = spec["result_object"]
    else:
        ref["ref"] = put_object(spec["cache"], envelope, secrets["token"], deadline)
    return seal(ref, b"", secrets["key"])


class StompEvents:
    """A stomp.py listener (duck-typed) recording connection state, receipts and errors.

    The caller's subscription (``idds_fat.results.stomp``) builds on it too.
    """

    def __init__(self) -> None:
        import threading

        self.changed = threading.Condition()
        self.connected = False
        self.closed = False
        self.error = ""
        self.receipts: set[str] = set()

    def _note(self, **changes) -> None:
        with self.changed:
            for name, value in changes.items():
                setattr(self, name, value)
            self.changed.notify_all()

    def on_connected(self, frame) -> None:
        self._note(connected=True)

    def on_disconnected(self) -> None:
        self._note(closed=True)

    def on_heartbeat_timeout(self) -> None:
        self._note(closed=True)

    def on_error(self, frame) -> None:
        body = frame.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        self._note(error=frame.headers.get("message") or str(body)[:200])

    def on_receipt(self, frame) -> None:
        with self.changed:
            self.receipts.add(frame.headers.get("receipt-id", ""))
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: predicate() or self.error or self.closed, timeout)
            if self.error:
                raise WrapperError(f"broker refused {what}: {self.error}")
            if not ok or not predicate():
                raise WrapperError(f"no {what} from the broker within {timeout:g} s")


def publish_stomp(message: bytes, stomp_spec: dict, secrets: dict) -> None:
    """Send ``message`` as a persistent STOMP 1.2 message to the workflow's queue and mirror.

    Returns only after the broker sent a receipt for both sends. Raises
    WrapperError (or a stomp.py exception) when it did not.
    """
    import stomp  # only jobs of workflows with a broker need stomp.py

    timeout = float(stomp_spec.get("timeout", 10.0))
    conn = stomp.Connection12(
        host_and_ports=[tuple(b) for b in stomp_spec["brokers"]],
        reconnect_attempts_max=1,
        reconnect_sleep_initial=0.0,  # one pass over the brokers; deliver() does the retrying
        reconnect_sleep_increase=0.0,
        reconnect_sleep_jitter=0.0,
        timeout=timeout,
        auto_decode=False,
    )
    events = StompEvents()
    conn.set_listener("idds-fat", events)
    try:
        conn.connect(secrets.get("broker_user"), secrets.get("broker_password"), wait=False)
        events.wait_for(lambda: events.connected, timeout, "connection")
        sends = [(stomp_spec["destination"], {})]
        if stomp_spec.get("mirror"):
            expires = int((time.time() + float(stomp_spec.get("mirror_ttl", 86400))) * 1000)
            sends.append((stomp_spec["mirror"], {"expires": str(expires)}))
        wanted = set()
        for destination, extra in sends:
            receipt = f"r-{os.getpid()}-{len(wanted)}-{time.monotonic_ns()}"
            wanted.add(receipt)
            headers = {"persistent": "true", "receipt": receipt, **extra}
            conn.send(destination, body=message, headers=headers)
        events.wait_for(lambda: wanted <= events.receipts, timeout, "receipt")
    finally:
        try:
            conn.disconnect()
        except Exception:
            pass


def deliver(envelope: bytes, spec: dict, secrets: dict) -> str:
    """Hand the result to a channel: STOMP first (when configured), then REST; return which.

    Large envelopes (over the spec's ``result_inline_bytes``) go into the cache
    and the channels carry a signed reference. Both channels are retried with
    backoff until the spec's ``publish_timeout``; raises DeliveryError when
    neither took the result.
    """
    deadline = time.monotonic() + float(spec["publish_timeout"])
    errors: list[str] = []
    message = envelope
    try:
        if len(envelope) > int(spec.get("result_inline_bytes") or len(envelope)):
            message = by_reference(envelope, spec, secrets, deadline)
    except WrapperError as exc:
        errors.append(f"cache: {exc}")
    channels = []
    if spec.get("stomp"):
        channels.append(("stomp", lambda: publish_stomp(message, spec["stomp"], secrets)))
    url, token = spec["result_url"], secrets["token"]
    channels.append(("rest", lambda: _http("POST", url, token, message, 30.0)))
    delay = 0.05
    while channels:
        for name, send in list(channels):
            try:
                send()
                return name
            except Exception as exc:
                errors.append(f"{name}: {exc}")
                print(f"idds-fat wrapper: {name} delivery failed: {exc}", file=sys.stderr)
                if name == "rest" and not _transient(exc):  # e.g. 401: retrying cannot help
                    channels.remove((name, send))
        if not channels or time.monotonic() + delay > deadline:
            raise DeliveryError("result not delivered; " + "; ".join(errors[-4:]))
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise DeliveryError("result not delivered; " + "; ".join(errors[-4:]))


def _load_spec(location: str, token: str | None) -> dict:
    name = public_url(location).rstrip("/").rsplit("/", 1)[-1]
    key = name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None
    presigned = public_url(location) != location
    return json.loads(fetch(location, key, None if presigned else token))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description="Run one idds-fat job.")
    parser.add_argument("--spec", required=True, help="path or URL of the job spec")
    options = parser.parse_args(argv)
    try:
        secrets = read_secrets()
        spec = _load_spec(options.spec, secrets["token"])
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    workdir = Path.cwd()
    envelope = run_job(spec, secrets, workdir)
    try:
        deliver(envelope, spec, secrets)
    except DeliveryError as exc:
        print(f"idds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNDELIVERED
    finally:
        for leftover in workdir.glob("context-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
