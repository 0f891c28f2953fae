"""Delivering a job's result: STOMP first (when the spec names brokers), then REST.

A result larger than the spec's ``result_inline_bytes`` goes into the cache,
and the channels carry a signed reference to it. A local caller may take the
result straight from the job instead (a reply file, a warm worker's pipe).
"""

from __future__ import annotations

import os
import sys
import time

from .envelope import peek, seal, sha256_hex
from .errors import DeliveryError, WrapperError
from .fetch import cache_object_location, http_request, public_url, transient, with_retries
from .spec import JobSpec


def put_object(cache: str, data: bytes, token: str | None, deadline: float) -> str:
    """Store ``data`` in ``cache`` under its sha256 (skipped if present); return the key."""
    import tempfile

    key = sha256_hex(data)
    if cache.startswith(("http://", "https://")):
        url = cache_object_location(cache, key)
        with_retries(
            lambda: http_request("PUT", url, token, data, 60.0), deadline, "storing " + url
        )
        return key
    from pathlib import Path  # only for a directory cache; a cold job's reply needs none

    path = Path(cache_object_location(cache, key))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    return key


def by_reference(envelope: bytes, spec: JobSpec, secrets: dict, deadline: float) -> bytes:
    """Put a large result envelope into the cache; return the small signed message naming it."""
    header, _ = peek(envelope)
    ref = {k: header[k] for k in ("workflow", "task", "job", "attempt", "status")}
    ref.update(kind="result-ref", ref_size=len(envelope), ref_sha256=sha256_hex(envelope))
    put_url = spec.result_put_url
    if put_url:  # a presigned PUT for this job's result object (S3)
        shown = public_url(put_url)
        with_retries(
            lambda: http_request("PUT", put_url, None, envelope, 300.0),
            deadline,
            "storing " + shown,
        )
        ref["ref_name"] = spec.result_object
    else:
        ref["ref"] = put_object(spec.cache, envelope, secrets["token"], deadline)
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


#: How many results this process handed to each channel ("stomp", "rest"): a warm
#: worker's tally over its jobs, for diagnostics and for tests that must know which
#: channel took a result (the caller cannot tell: the service mirrors what STOMP takes).
delivered_over: dict[str, int] = {"stomp": 0, "rest": 0}


# Broker connections kept open between results, by (brokers, user), once a process that
# delivers many results asked for it (keep_stomp_connections); None: one per result.
_kept_connections: dict[tuple, tuple] | None = None


def keep_stomp_connections() -> None:
    """Keep each broker connection open for the next result (a warm worker, a pack:
    one connection for all their jobs) until ``close_stomp_connections``."""
    global _kept_connections
    if _kept_connections is None:
        _kept_connections = {}


def close_stomp_connections() -> None:
    """Disconnect the kept broker connections; from now on one connection per result."""
    global _kept_connections
    kept, _kept_connections = _kept_connections or {}, None
    for conn, _ in kept.values():
        _disconnect(conn)


def _disconnect(conn) -> None:
    try:
        conn.disconnect()
    except Exception:  # gone already: nothing to close
        pass


def _stomp_connection(stomp_spec: dict, secrets: dict, timeout: float) -> tuple:
    """Return a connected ``(connection, events)``: the one kept for these brokers and
    user while it is sound, else a new one (kept, when connections are kept)."""
    import stomp  # only jobs of workflows with a broker need stomp.py

    brokers = [tuple(b) for b in stomp_spec["brokers"]]
    key = (tuple(brokers), secrets.get("broker_user"))
    if _kept_connections is not None and key in _kept_connections:
        conn, events = _kept_connections[key]
        if not (events.closed or events.error) and conn.is_connected():
            return conn, events
        del _kept_connections[key]  # the broker went away or refused something: start again
        _disconnect(conn)
    conn = stomp.Connection12(
        host_and_ports=brokers,
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
    except BaseException:
        _disconnect(conn)
        raise
    if _kept_connections is not None:
        _kept_connections[key] = (conn, events)
    return conn, events


def publish_stomp(message: bytes, stomp_spec: dict, secrets: dict) -> None:
    """Send ``message`` as a persistent STOMP 1.2 message to the workflow's queue and mirror.

    Returns only after the broker sent a receipt for both sends. Raises
    WrapperError (or a stomp.py exception) when it did not. The connection is
    closed after, unless connections are kept (``keep_stomp_connections``);
    one that failed is closed either way.
    """
    timeout = float(stomp_spec.get("timeout", 10.0))
    conn, events = _stomp_connection(stomp_spec, secrets, timeout)
    kept = _kept_connections is not None
    try:
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
        with events.changed:
            events.receipts -= wanted  # a kept connection's set would grow with every result
    except BaseException:
        if kept:
            _kept_connections.pop(
                (tuple(tuple(b) for b in stomp_spec["brokers"]), secrets.get("broker_user")), None
            )
        _disconnect(conn)
        raise
    if not kept:
        _disconnect(conn)


def deliver(envelope: bytes, spec: JobSpec, secrets: dict) -> str:
    """Hand the result to a channel: STOMP first (when configured), then REST; return which.

    Large envelopes (over the spec's ``result_inline_bytes``) go into the cache
    and the channels carry a signed reference. Both channels are retried with
    backoff until the spec's ``publish_timeout``; raises DeliveryError when
    neither took the result.
    """
    deadline = time.monotonic() + float(spec.publish_timeout)
    errors: list[str] = []
    message = envelope
    try:
        if len(envelope) > int(spec.result_inline_bytes or len(envelope)):
            message = by_reference(envelope, spec, secrets, deadline)
    except WrapperError as exc:
        errors.append(f"cache: {exc}")
    channels = []
    stomp_spec = spec.stomp
    if stomp_spec:
        channels.append(("stomp", lambda: publish_stomp(message, stomp_spec, secrets)))
    url, token = spec.result_url, secrets["token"]
    channels.append(("rest", lambda: http_request("POST", url, token, message, 30.0)))
    delay = 0.05
    while channels:
        for name, send in list(channels):
            try:
                send()
                delivered_over[name] += 1
                return name
            except Exception as exc:
                errors.append(f"{name}: {exc}")
                print(f"idds-fat wrapper: {name} delivery failed: {exc}", file=sys.stderr)
                if name == "rest" and not transient(exc):  # e.g. 401: retrying cannot help
                    channels.remove((name, send))
        if not channels or time.monotonic() + delay > deadline:
            raise DeliveryError("result not delivered; " + "; ".join(errors[-4:]))
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise DeliveryError("result not delivered; " + "; ".join(errors[-4:]))


def reply_message(envelope: bytes, spec: JobSpec, secrets: dict) -> bytes:
    """The message that hands a result straight to the caller: the envelope, or a
    reference to it in the cache when it is larger than ``result_inline_bytes``.

    Raises WrapperError when a large result cannot be put into the cache.
    """
    if len(envelope) <= int(spec.result_inline_bytes or len(envelope)):
        return envelope
    deadline = time.monotonic() + float(spec.publish_timeout)
    return by_reference(envelope, spec, secrets, deadline)


# The caller that started this process (the parent it had when the wrapper was loaded).
_STARTED_BY = os.getppid()


def reply_in_file(envelope: bytes, spec: JobSpec, secrets: dict, reply_file: str) -> bool:
    """Leave the result for the caller in ``reply_file``; False if the caller is gone.

    The caller that started this job is its parent; once it has died the job
    has been handed to another parent, and the result goes the usual way.
    Whatever is left in the file, an attach that finds the job ended reads it.
    """
    if os.getppid() != _STARTED_BY:
        return False
    message = reply_message(envelope, spec, secrets)
    tmp = f"{reply_file}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(message)
    os.replace(tmp, reply_file)
    return True
