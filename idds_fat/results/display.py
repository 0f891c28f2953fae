"""How results look to a person: a progress bar while waiting, HTML tables in Jupyter."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any


def outcome_counts(futures: Iterable[Future]) -> dict[str, int]:
    """Count futures as ``done``, ``failed`` (raised or lost), ``cancelled`` and ``pending``."""
    counts = {"done": 0, "failed": 0, "cancelled": 0, "pending": 0}
    for future in futures:
        if not future.done():
            counts["pending"] += 1
        elif future.cancelled():
            counts["cancelled"] += 1
        elif future.exception() is not None:
            counts["failed"] += 1
        else:
            counts["done"] += 1
    return counts


class WaitProgress:
    """A tqdm.auto progress bar over ``futures`` (a widget in Jupyter, text in a terminal).

    Shows done / failed / running counts; ``running`` is asked of ``running_count``.
    tqdm hides it when stderr is not a TTY (outside Jupyter); ``enabled=False``
    turns it off altogether. Use as a context manager around the wait.
    """

    def __init__(
        self,
        futures: Sequence[Future],
        description: str,
        running_count: Callable[[], int] | None = None,
        enabled: bool = True,
    ) -> None:
        self._futures = list(futures)
        self._description = description
        self._running = running_count
        self._enabled = enabled and len(self._futures) > 1
        self._bar: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> WaitProgress:
        if not self._enabled:
            return self
        from tqdm.auto import tqdm  # imported only when a bar can show

        self._bar = tqdm(
            total=len(self._futures), desc=self._description, unit="job", disable=None, leave=False
        )
        for future in self._futures:
            future.add_done_callback(self._advance)
        return self

    def _advance(self, _: Future) -> None:
        with self._lock:
            if self._bar is None:
                return
            counts = outcome_counts(self._futures)
            running = self._running() if self._running else None
            postfix = {"done": counts["done"], "failed": counts["failed"] + counts["cancelled"]}
            if running is not None:
                postfix["running"] = running
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    """Return a small HTML table (values escaped) for ``_repr_html_``."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
