"""Measure 3: the cold job floor, idds-fat cold per job next to ``import cloudpickle``.

Any cold job starts an interpreter and unpickles a function, so
``python -c "import cloudpickle"`` (the interpreter local jobs run, median of
``runs``) is the floor. Two per-job figures of idds-fat cold are put next to it:

* **round trip**: p50 of one trivial call, submit to value in the caller, one
  job at a time (caller side included);
* **slot time per job**: wall time of the 1,000-job trivial map x workers /
  jobs, i.e. how long a job holds a worker slot when the pipeline is full.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from measures.report import safe_ratio, table

TARGET = 1.2
"""Issue 18 (issue 7 had 1.5x): cold per-job overhead at most 1.2x the cloudpickle floor."""


def command_times(code: str, runs: int) -> list[float]:
    """Return the wall times of ``runs`` runs of ``python -c CODE`` (this interpreter)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return times


def measure_floors(runs: int) -> dict[str, float]:
    """Return the medians (ms) of ``python -c pass`` and ``python -c "import cloudpickle"``."""
    return {
        "python_pass_ms": statistics.median(command_times("pass", runs)) * 1e3,
        "import_cloudpickle_ms": statistics.median(command_times("import cloudpickle", runs)) * 1e3,
        "runs": runs,
    }


def cold_floor(floors: dict[str, float], cold: dict[str, Any]) -> dict[str, Any]:
    """Combine the floors with the idds-fat cold figures of a system run; return the ratios."""
    floor = floors["import_cloudpickle_ms"]
    round_trip = cold.get("round_trip", {}).get("p50_ms")
    slot = cold.get("throughput", {}).get("trivial", {}).get("slot_ms_per_job")
    return {
        **floors,
        "cold_round_trip_p50_ms": round_trip,
        "cold_slot_ms_per_job": slot,
        "round_trip_over_floor": safe_ratio(round_trip, floor),
        "slot_over_floor": safe_ratio(slot, floor),
        "target": TARGET,
    }


def cold_floor_report(figures: dict[str, Any]) -> str:
    """Return the cold-floor table and the target's verdict."""
    floor = figures["import_cloudpickle_ms"]
    rows = [
        ("python -c pass", figures["python_pass_ms"], safe_ratio(figures["python_pass_ms"], floor)),
        ('python -c "import cloudpickle"', floor, 1.0),
        (
            "idds-fat cold round trip p50",
            figures["cold_round_trip_p50_ms"],
            figures["round_trip_over_floor"],
        ),
        (
            "idds-fat cold slot time per job",
            figures["cold_slot_ms_per_job"],
            figures["slot_over_floor"],
        ),
    ]
    lines = [
        f"Cold job floor: medians of {figures['runs']} interpreter runs; slot time per job = "
        "trivial map wall x workers / jobs",
        table(["measure", "ms", "x floor"], rows, first_width=34),
    ]
    for name, key in (("round trip", "round_trip_over_floor"), ("slot time", "slot_over_floor")):
        value = figures[key]
        if value is not None:
            verdict = "met" if value <= TARGET else "missed"
            lines.append(
                f"idds-fat cold {name} / cloudpickle floor = {value:.2f}x "
                f"(target <= {TARGET}x: {verdict})"
            )
    return "\n".join(lines)
