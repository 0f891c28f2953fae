"""The broker mirror: a copy of every STOMP result in the REST store."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from idds_fat.node.envelope import peek
from idds_fat.results.stomp import StompResultSubscriber
from idds_fat.service.result_store import ResultStore

logger = logging.getLogger(__name__)


class BrokerMirror:
    """Subscribes to a mirror destination and stores every message in a ResultStore.

    Jobs send each result to their workflow's queue and to its mirror queue; the
    service keeps what the mirror receives, so a caller that missed broker
    messages (it was away, or the broker went down after delivering to the
    mirror) catches up from REST. Messages are stored as they came: the store
    indexes them by their (unverified) header; callers verify.
    ``destination`` may be a wildcard (``/queue/idds-fat.mirror.>``).
    """

    def __init__(
        self,
        store: ResultStore,
        brokers: Sequence[tuple[str, int]],
        destination: str,
        user: str | None = None,
        password: str | None = None,
        on_stored: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._on_stored = on_stored
        self.stored = 0
        self.dropped = 0
        self._subscriber = StompResultSubscriber(
            brokers,
            destination,
            on_message=self._keep,
            on_state=lambda up: logger.info("broker mirror %s", "up" if up else "down"),
            user=user,
            password=password,
        )

    @property
    def up(self) -> bool:
        """Whether the mirror is subscribed right now."""
        return self._subscriber.up

    def start(self) -> None:
        """Start mirroring in the background (retrying while the broker is away)."""
        self._subscriber.start()

    def stop(self) -> None:
        """Stop mirroring."""
        self._subscriber.stop()

    def _keep(self, data: bytes) -> None:
        try:
            workflow = str(peek(data)[0]["workflow"])
            self._store.add(workflow, data)
        except (ValueError, KeyError) as exc:
            self.dropped += 1
            logger.warning("broker mirror dropped a message that is not a result: %s", exc)
            return
        self.stored += 1
        if self._on_stored is not None:
            self._on_stored(workflow)
