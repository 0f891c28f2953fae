"""How the commands show things: aligned tables, JSON, times, and errors as one line."""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from idds_fat.config import load_config
from idds_fat.errors import IddsFatError

F = TypeVar("F", bound=Callable[..., Any])

#: Job states in the order a job goes through them; others follow alphabetically.
STATE_ORDER = ("waiting", "queued", "running", "done", "failed", "lost", "cancelled")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Return ``rows`` under ``headers`` as columns aligned with two spaces.

    Numbers are right-aligned, everything else left-aligned; ``None`` shows as ``-``.
    """
    raw = [list(row) for row in rows]
    cells = [["-" if v is None else str(v) for v in row] for row in raw]
    numeric = [
        bool(raw) and all(isinstance(r[i], int | float) for r in raw if r[i] is not None)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in cells])


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (paths and other objects as strings)."""
    click.echo(json.dumps(data, indent=2, default=str))


def local_time(timestamp: float | None) -> str | None:
    """Return an epoch time as ``YYYY-MM-DD HH:MM:SS`` in local time (``None`` stays)."""
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def ordered_states(states: Iterable[str]) -> list[str]:
    """Return job states in life-cycle order (:data:`STATE_ORDER`), unknown ones last."""
    states = set(states)
    known = [s for s in STATE_ORDER if s in states]
    return known + sorted(states - set(STATE_ORDER))


def state_counts(counts: Mapping[str, int]) -> str:
    """Return ``{"done": 3, "failed": 1}`` as ``done 3, failed 1`` (``-`` when empty)."""
    return ", ".join(f"{s} {counts[s]}" for s in ordered_states(counts)) or "-"


def json_option(fn: F) -> F:
    """Add ``--json`` (passed as ``as_json``) to a command."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
    )(fn)


def work_dir_option(fn: F) -> F:
    """Add ``--work-dir`` (passed as ``work_dir``, a Path or ``None``) to a command."""
    return click.option(
        "--work-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Work dir to look in.  [default: work_dir from the configuration]",
    )(fn)


def effective_work_dir(work_dir: Path | None) -> Path:
    """Return ``work_dir``, or the configured one when it is ``None``.

    Raises:
        ConfigError: the configuration is invalid.
    """
    return work_dir if work_dir is not None else load_config().work_dir


def reports_errors(fn: F) -> F:
    """Turn an :class:`IddsFatError` raised by a command into ``Error: message``, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except IddsFatError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
