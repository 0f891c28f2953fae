"""Shared reporting: quantiles, the machine's description, tables, ratios and JSON files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def quantile(values: Sequence[float], q: float) -> float:
    """Return the ``q`` quantile of ``values`` (nearest rank, no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def machine() -> dict[str, Any]:
    """Describe the machine and interpreter the figures come from."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def current_rss_mb() -> float:
    """Return this process's resident set size now, in MiB (Linux ``/proc``)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Return this process's peak resident set size so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], first_width: int = 16) -> str:
    """Return a plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(first_width, len(headers[0]))] + [max(10, len(h)) for h in headers[1:]]

    def cell(value: Any, width: int, left: bool) -> str:
        if value is None:
            text = "-"
        elif isinstance(value, float):
            text = f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        else:
            text = str(value)
        return text.ljust(width) if left else text.rjust(width)

    def line(values: Sequence[Any]) -> str:
        cells = zip(values, widths, strict=True)
        return "  ".join(cell(v, w, i == 0) for i, (v, w) in enumerate(cells))

    lines = [line(headers)]
    lines.append("-" * len(lines[0]))
    lines.extend(line(row) for row in rows)
    return "\n".join(lines)


def ratio_line(ours: str, peer: str, parts: Sequence[tuple[str, float | None]], note: str) -> str:
    """Return ``"idds-fat warm / PPE = 1.8x (p50), 2.0x (p99); lower is better"``."""
    shown = [f"{_times(value)} ({what})" for what, value in parts if value is not None]
    if not shown:
        return f"{ours} / {peer}: no figures"
    return f"{ours} / {peer} = {', '.join(shown)}; {note}"


def _times(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def safe_ratio(a: float | None, b: float | None) -> float | None:
    """Return ``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def write_json(json_dir: Path, name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` and the machine's description to ``json_dir/NAME.json``; return its path."""
    json_dir.mkdir(parents=True, exist_ok=True)
    path = json_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, sort_keys=True) + "\n")
    return path
