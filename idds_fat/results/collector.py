"""The caller's end of the result channel: receive, verify, dedupe, dispatch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from idds_fat.errors import IntegrityError, ServiceError
from idds_fat.results.rest import RestResultSource
from idds_fat.serialize import open_envelope

logger = logging.getLogger(__name__)

#: Receives a verified result header and body; returns False if nobody waited for it.
Dispatch = Callable[[dict[str, Any], bytes], bool]


class ResultCollector:
    """A background thread that long-polls the result store for one workflow.

    Every envelope is HMAC-verified with the workflow's key before anything in
    it is used; forged or corrupted ones are dropped and counted in
    ``rejected``. A result is handed to ``dispatch`` once per (task, job,
    attempt); repeats are counted in ``duplicates``. ``drain()`` fetches what is
    already stored without waiting, for a caller that must know now (a job just
    exited).
    """

    def __init__(
        self, source: RestResultSource, workflow_id: str, key: bytes, dispatch: Dispatch
    ) -> None:
        self._source = source
        self._workflow_id = workflow_id
        self._key = key
        self._dispatch = dispatch
        self._cursor = 0
        self._seen: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0
        self.duplicates = 0
        self.rejected = 0
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
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self) -> None:
        """Fetch and dispatch whatever the store holds now, without waiting.

        Raises:
            ServiceError: the store could not be reached.
        """
        self._fetch(wait=0.0)

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
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

    def _fetch(self, wait: float) -> None:
        cursor, envelopes = self._source.fetch(self._cursor, wait)
        with self._lock:
            for data in envelopes:
                self._accept(data)
            self._cursor = max(self._cursor, cursor)

    def _accept(self, data: bytes) -> None:
        try:
            header, body = open_envelope(data, self._key)
        except IntegrityError as exc:
            self.rejected += 1
            logger.warning("rejected a result for workflow %s: %s", self._workflow_id, exc)
            return
        if header.get("kind") != "result" or header.get("workflow") != self._workflow_id:
            self.rejected += 1
            logger.warning("rejected a signed message that is not a result of this workflow")
            return
        ident = (str(header.get("task")), int(header.get("job", -1)), int(header.get("attempt", 0)))
        if ident in self._seen:
            self.duplicates += 1
            return
        self._seen.add(ident)
        self.received += 1
        if not self._dispatch(header, body):
            self.duplicates += 1
