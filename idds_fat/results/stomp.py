"""The caller's STOMP subscription to its workflow's result queue (stomp.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from idds_fat.node.deliver import StompEvents

logger = logging.getLogger(__name__)


class _Listener(StompEvents):
    """The wrapper's STOMP event listener, plus message handling for one connection."""

    def __init__(self, subscriber: StompResultSubscriber, conn: object) -> None:
        super().__init__()
        self._subscriber = subscriber
        self.conn = conn

    def on_heartbeat_timeout(self) -> None:
        logger.warning("STOMP heart-beat timed out; the broker connection is dead")
        super().on_heartbeat_timeout()

    def on_message(self, frame) -> None:
        body = frame.body if isinstance(frame.body, bytes) else frame.body.encode()
        try:
            self._subscriber.on_message(body)
        except Exception:  # a bad message must not kill the receiver thread
            logger.exception("handling a STOMP result failed")
        # Acknowledge after handling: a caller that dies mid-way gets it again.
        try:
            self.conn.ack(frame.headers["ack"])
        except Exception as exc:
            logger.debug("could not ack a STOMP message: %s", exc)


class StompResultSubscriber:
    """Keeps a subscription to ``destination`` alive across broker failures.

    A background thread connects to the first reachable broker of
    ``brokers`` (failover), subscribes with client-individual acks and
    heart-beats, hands every message body to ``on_message``, and reports the
    channel's state to ``on_state(True/False)``. When the connection drops it
    reports ``False`` at once and retries every ``retry_seconds``.

    Attributes:
        last_error: why the last attempt to connect failed (a refused login says
            so, with the broker's own words), or None once connected.
    """

    def __init__(
        self,
        brokers: Sequence[tuple[str, int]],
        destination: str,
        on_message: Callable[[bytes], None],
        on_state: Callable[[bool], None],
        user: str | None = None,
        password: str | None = None,
        heartbeat_ms: int = 2000,
        retry_seconds: float = 1.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.brokers = list(brokers)
        self.destination = destination
        self.on_message = on_message
        self._on_state = on_state
        self._user, self._password = user, password
        self._heartbeat_ms = heartbeat_ms
        self._retry_seconds = retry_seconds
        self._connect_timeout = connect_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: _Listener | None = None
        self.up = False
        self.last_error: str | None = None

    def start(self) -> None:
        """Start connecting in the background."""
        self._thread = threading.Thread(
            target=self._run, name=f"idds-fat-stomp-{self.destination}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect and stop retrying."""
        self._stop.set()
        listener = self._listener
        if listener is not None:
            listener._note(closed=True)
        if self._thread is not None:
            self._thread.join(timeout)

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            logger.info("STOMP subscription to %s %s", self.destination, "up" if up else "down")
            self._on_state(up)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                # Said once per new reason: a wrong password would otherwise be
                # a line a second, or (as before) only "no result came over stomp".
                if reason != self.last_error:
                    where = ", ".join(f"{h}:{p}" for h, p in self.brokers)
                    logger.warning("STOMP subscription via %s failed: %s", where, reason)
                self.last_error = reason
            self._set_up(False)
            self._stop.wait(self._retry_seconds)

    def _session(self) -> None:
        import stomp  # only workflows with a broker load stomp.py

        conn = stomp.Connection12(
            host_and_ports=self.brokers,
            heartbeats=(self._heartbeat_ms, self._heartbeat_ms),
            reconnect_attempts_max=1,
            timeout=self._connect_timeout,
            auto_decode=False,
        )
        listener = _Listener(self, conn)
        self._listener = listener
        conn.set_listener("idds-fat", listener)
        try:
            conn.connect(self._user, self._password, wait=False)
            with listener.changed:
                listener.changed.wait_for(
                    lambda: listener.connected or listener.closed or listener.error,
                    self._connect_timeout,
                )
            if listener.error and not listener.connected:
                who = f"user {self._user!r}" if self._user else "an anonymous user"
                raise ConnectionError(f"the broker refused the login of {who}: {listener.error}")
            if not listener.connected or listener.closed:
                raise ConnectionError(listener.error or "no CONNECTED frame")
            self.last_error = None
            conn.subscribe(
                self.destination,
                id="idds-fat-results",
                ack="client-individual",
                headers={"activemq.prefetchSize": "1000"},
            )
            self._set_up(True)
            with listener.changed:
                listener.changed.wait_for(lambda: listener.closed or self._stop.is_set())
        finally:
            try:
                conn.disconnect()
            except Exception:
                pass
