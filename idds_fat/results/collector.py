"""The caller's end of the result channel: receive, verify, dedupe, dispatch."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from idds_fat.cache.base import content_key
from idds_fat.errors import IntegrityError, ServiceError
from idds_fat.results.futures import LazyValue
from idds_fat.results.rest import RestResultSource
from idds_fat.serialize import open_envelope

logger = logging.getLogger(__name__)

#: Receives a verified result header and its body (a LazyValue of the body for a
#: large result by reference); returns False if nobody waited for it.
Dispatch = Callable[[dict[str, Any], Any], bool]


class ResultCollector:
    """Receives one workflow's results from every channel, exactly once each.

    Messages come from a STOMP subscription (``accept``, called by its thread)
    and from a background thread that long-polls the REST store whenever STOMP
    is not up (``stomp_state``). Every message is HMAC-verified with the
    workflow's key before anything in it is used; forged or corrupted ones are
    dropped and counted in ``rejected``. A reference to a large result is
    resolved through ``fetch_ref`` (given the reference's verified header) and
    verified the same way, when the value is first used. A result is handed
    to ``dispatch`` once per (task, job, attempt); repeats are counted in
    ``duplicates``. ``drain()`` reads the REST store without waiting, for a
    caller that must know now (a job just exited). ``holder`` names this
    collector to the result store: the copies kept for it (results it got
    over a warm worker's pipe, ``EmbeddedService.keep_result``) are left out of
    its reads, never read back; any other reader (``attach``) gets them.
    """

    def __init__(
        self,
        source: RestResultSource,
        workflow_id: str,
        key: bytes,
        dispatch: Dispatch,
        fetch_ref: Callable[[dict[str, Any]], bytes] | None = None,
    ) -> None:
        self._source = source
        self._workflow_id = workflow_id
        self._key = key
        self._dispatch = dispatch
        self._fetch_ref = fetch_ref
        self._stomp_up = False
        self._wake = threading.Event()
        self._cursor = 0
        self._seen: set[tuple[str, int, int]] = set()
        self.holder = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0
        self.duplicates = 0
        self.rejected = 0
        self.by_channel: dict[str, int] = {"stomp": 0, "rest": 0, "local": 0}
        self.wait_seconds = 20.0

    def start(self) -> None:
        """Start the polling thread."""
        self._thread = threading.Thread(
            target=self._run, name=f"idds-fat-results-{self._workflow_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop and wait up to ``timeout`` seconds for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self) -> None:
        """Fetch and dispatch everything the store holds now, without waiting.

        Raises:
            ServiceError: the store could not be reached.
        """
        while self._fetch(wait=0.0):
            pass

    def stomp_state(self, up: bool) -> None:
        """Tell the collector whether STOMP delivers; REST polling pauses while it does."""
        self._stomp_up = up
        if not up:
            self._wake.set()

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            if self._stomp_up:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._fetch(self.wait_seconds)
                delay = 0.1
            except ServiceError as exc:
                if self._stop.is_set():
                    break
                logger.warning("%s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # never let the collector die silently
                logger.exception("result collector failed; retrying")
                self._stop.wait(1.0)

    def _fetch(self, wait: float) -> bool:
        """Fetch one page after the cursor; return whether it moved the cursor on
        (a page may hold only copies kept for this collector, passed over)."""
        before = self._cursor
        cursor, envelopes = self._source.fetch(before, wait, holder=self.holder)
        for data in envelopes:
            self.accept(data, "rest")
        with self._lock:
            self._cursor = max(self._cursor, cursor)
        return bool(envelopes) or cursor > before

    def _resolve(self, ref_header: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Fetch and verify the large result a verified reference names. Raises IntegrityError."""
        where = ref_header.get("ref") or ref_header.get("ref_name")
        try:
            inner = self._fetch_ref(ref_header)  # type: ignore[misc]
        except Exception as exc:
            raise IntegrityError(f"large result {where} unreadable: {exc}") from exc
        if ref_header.get("ref_sha256") not in (None, content_key(inner)):
            raise IntegrityError(f"large result {where} does not match its sha256")
        header, body = open_envelope(inner, self._key)
        if any(header.get(k) != ref_header.get(k) for k in ("workflow", "task", "job", "attempt")):
            raise IntegrityError("a result reference names another job's result")
        return header, body

    def _reject(self, reason: object) -> None:
        with self._lock:
            self.rejected += 1
        logger.warning("rejected a result for workflow %s: %s", self._workflow_id, reason)

    def accept(self, data: bytes, channel: str = "stomp") -> None:
        """Verify one message from ``channel`` and dispatch it unless seen before.

        Thread-safe; never raises for a bad message (it is counted in ``rejected``).
        ``by_channel`` counts the new results each channel brought first.
        """
        try:
            header, body = open_envelope(data, self._key)
        except IntegrityError as exc:
            self._reject(exc)
            return
        kind = header.get("kind")
        if kind not in ("result", "result-ref") or header.get("workflow") != self._workflow_id:
            self._reject("a signed message that is not a result of this workflow")
            return
        ident = (str(header.get("task")), int(header.get("job", -1)), int(header.get("attempt", 0)))
        with self._lock:
            seen = ident in self._seen
            if seen:
                self.duplicates += 1
        if seen:
            return
        body: bytes | LazyValue
        if kind == "result-ref":
            if self._fetch_ref is None:
                self._reject("a result by reference, and no cache to fetch it from")
                return
            if header.get("status") == "ok":
                # Fetched when the user first asks for the value, not before.
                ref_header = header
                body = LazyValue(lambda: self._resolve(ref_header)[1], reference=ref_header)
            else:
                try:
                    header, body = self._resolve(header)
                except IntegrityError as exc:
                    self._reject(exc)
                    return
        with self._lock:
            if ident in self._seen:
                self.duplicates += 1
                return
            self._seen.add(ident)
            self.received += 1
            self.by_channel[channel] = self.by_channel.get(channel, 0) + 1
        if not self._dispatch(header, body):
            with self._lock:
                self.duplicates += 1
