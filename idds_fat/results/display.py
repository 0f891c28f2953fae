"""How results look to a person: a progress bar while waiting, HTML tables in Jupyter."""

from __future__ import annotations

import html
import reprlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

#: Longest text kept of a job's arguments (the state record, the monitoring page, HTML).
ARGUMENTS_CHARS = 200

# Short reprs of big containers and strings: an argument may be a million-row list.


class _ShortRepr(reprlib.Repr):
    """``reprlib``'s shortening, and a future among the arguments as the job it stands
    for (``<t0001/0>``): its own repr says "pending", stale once recorded."""

    def repr_bytes(self, value: bytes | bytearray, level: int) -> str:
        # reprlib would repr the whole object, then cut: 200 MB of argument, 800 MB of text.
        if len(value) <= self.maxstring:
            return repr(value)
        head = repr(bytes(value[: self.maxstring // 2]))
        return f"{head}... ({len(value):,} bytes)"

    def repr_bytearray(self, value: bytearray, level: int) -> str:
        return f"bytearray({self.repr_bytes(value, level)})"

    def repr_memoryview(self, value: memoryview, level: int) -> str:
        return f"<memoryview {value.nbytes:,} bytes>"

    def repr_AsyncResult(self, value: Any, level: int) -> str:  # noqa: N802 (reprlib's naming)
        return f"<{value.task_id}/{value.job}>"

    def repr_MapResult(self, value: Any, level: int) -> str:  # noqa: N802
        tasks = sorted({future.task_id for future in value.futures})
        return f"<{', '.join(tasks) or 'MapResult'}: {len(value.futures)} jobs>"


_short = _ShortRepr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 10


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def arguments_repr(
    args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, limit: int = ARGUMENTS_CHARS
) -> str:
    """Return a call's arguments as they would be written, ``1, 'a', x=2``, at most ``limit`` chars.

    For display only (nothing parses it back): containers and long strings are
    shortened, and an argument whose ``repr`` raises shows as ``<TypeName ...>``.
    """
    parts = [_safe_repr(a) for a in args]
    parts += [f"{k}={_safe_repr(v)}" for k, v in (kwargs or {}).items()]
    return _shorten(", ".join(parts), limit)


def job_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any], entries: Sequence[Mapping[str, Any] | None]
) -> list[str]:
    """Return ``arguments_repr(args, {**kwargs, **entry})`` for each job's ``entry``.

    The call's own arguments are written out once for the task, not once per job:
    a map of many jobs shares them.
    """
    shared = ", ".join(
        [_safe_repr(a) for a in args] + [f"{k}={_safe_repr(v)}" for k, v in kwargs.items()]
    )
    texts = []
    for entry in entries:
        if entry and not kwargs.keys().isdisjoint(entry):  # an entry's key takes its place
            texts.append(arguments_repr(args, {**kwargs, **entry}))
            continue
        own = ", ".join(f"{k}={_safe_repr(v)}" for k, v in (entry or {}).items())
        texts.append(_shorten(", ".join(t for t in (shared, own) if t), ARGUMENTS_CHARS))
    return texts


def _safe_repr(value: Any) -> str:
    try:
        return _short.repr(value)
    except Exception:  # a user's __repr__ may raise anything
        return f"<{type(value).__name__}>"


def outcome_text(future: Future, limit: int = 80) -> str:
    """Return what a finished job gave, for a table cell: ``repr`` of its value, or
    ``ExceptionType: message`` (first line) if it raised; ``""`` if pending or cancelled."""
    if not future.done() or future.cancelled():
        return ""
    exc = future.exception()
    if exc is not None:
        first = (str(exc).strip().splitlines() or [""])[0]
        return _shorten(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, limit)
    try:
        value = future.result()
    except Exception as fetch:  # a large value fetched on first use may fail to load
        return _shorten(f"{type(fetch).__name__}: {fetch}", limit)
    return _shorten(_safe_repr(value), limit)


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
    turns it off altogether. Use as a context manager around the wait. When the
    wait ends the bar stays, with its final counts: on a terminal as its last
    line, in Jupyter as a line of text in the cell's output (a saved notebook
    does not keep a widget's state).
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
            total=len(self._futures), desc=self._description, unit="job", disable=None, leave=True
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
                bar = self._bar
                # The postfix was set without a refresh; draw the last counts before leaving.
                bar.refresh()
                if hasattr(bar, "container"):
                    # A Jupyter widget: a saved notebook keeps only the text it showed
                    # when first displayed (0/N). Leave the final counts as a text line.
                    final = str(bar)
                    bar.leave = False
                    bar.close()
                    bar.write(final)
                else:
                    bar.close()
                self._bar = None


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    """Return a small HTML table (values escaped) for ``_repr_html_``."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
