"""Optional profiles of the idds-fat runs: py-spy samples of a child and its subprocesses.

With ``run_all.py --profile DIR`` each idds-fat process (the systems and the
scale sizes) runs under ``py-spy record --subprocesses --format raw``, so the
caller, its embedded service and its job processes are all sampled.
``DIR/NAME.raw`` holds the collapsed stacks (open them in speedscope, or
``flamegraph.pl``) and ``DIR/NAME.top.txt`` the frames that hold the most
samples. Sampling slows the processes: figures of a profiled run are not for
the tables.
"""

from __future__ import annotations

import collections
import re
import shutil
import sys
from pathlib import Path

RATE = 250
"""Samples per second."""

_LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy() -> str:
    """Return the py-spy executable (beside this interpreter, else on PATH).

    Raises:
        SystemExit: py-spy is not installed.
    """
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        sys.exit("--profile needs py-spy: pip install py-spy (it also needs ptrace permission)")
    return found


def profiled(command: list[str], raw: Path) -> list[str]:
    """Return ``command`` run under py-spy, writing collapsed stacks to ``raw``."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    return [py_spy(), "record", "--subprocesses", "--rate", str(RATE), "--format", "raw"] + [
        "--output",
        str(raw),
        "--",
        *command,
    ]


def top_frames(raw: Path, limit: int = 60) -> str:
    """Summarise collapsed stacks: the frames in the most samples (inclusive), per process."""
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    per_process: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # py-spy nests a subprocess's stack under its parent's "process ..." frame.
        start = max(i for i, frame in enumerate(frames) if frame.startswith("process "))
        process, frames = frames[start][:100], frames[start:]
        samples = int(count)
        total += samples
        per_process[process] += samples
        seen = set()
        for frame in frames[1:]:
            name = _LINE_NUMBER.sub(")", frame)  # fold the lines of one function together
            if name not in seen:
                seen.add(name)
                inclusive[(process, name)] += samples
    if not total:
        return f"{raw}: no samples"
    lines = [f"{raw}: {total} samples at {RATE}/s", "samples per process:"]
    lines += [f"  {n / total:6.1%}  {process}" for process, n in per_process.most_common()]
    lines.append(f"frames in the most samples (inclusive), top {limit}:")
    for (process, frame), n in inclusive.most_common(limit):
        lines.append(f"  {n / total:6.1%}  {frame[:110]}   [{process.split(':')[0]}]")
    return "\n".join(lines)
