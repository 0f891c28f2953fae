"""A workflow's work dir: its name, and the files in it only the user may read."""

from __future__ import annotations

import os
import re
from pathlib import Path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:40] or "workflow"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file only the user can read (created so from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
