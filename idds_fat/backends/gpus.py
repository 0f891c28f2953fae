"""GPU devices on this machine, for backends that hand them out."""

from __future__ import annotations

import re
import shutil
import subprocess


def detect_gpus() -> tuple[str, ...]:
    """Return the GPU indices ``nvidia-smi -L`` lists (empty when there is none)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE))
