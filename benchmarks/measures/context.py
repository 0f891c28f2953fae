"""Measure 5: zip + hash of a 50 MB code context, and the bytes a second submission uploads.

A deterministic tree (``files`` files of base64 text from a seeded generator,
``total_mb`` MB in all, in 50 directories) is made in a temporary directory.
Then:

* ``build_context_archive`` on it, ``runs`` times: the zip + sha256 time;
* two workflows, one after the other, with ``source_dir`` = the tree and the
  same ``work_dir`` (so the same directory cache), each running one trivial
  call. Every object the cache really writes is counted by wrapping
  ``DirectoryStore._write`` (``put`` skips a key that exists, so a skipped put
  writes nothing). The second workflow must upload 0 bytes of context.
  "start" is entering the workflow (it packs the tree again: the hash is of the
  zip), "1st call" the one trivial call (its job unpacks the context), "total"
  includes leaving the workflow.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import peers.tasks
from peers import warm_available
from peers.tasks import trivial

from measures.report import table

DIRECTORIES = 50


def make_tree(root: Path, files: int, total_bytes: int, seed: int = 7) -> int:
    """Write ``files`` files of ``total_bytes // files`` bytes under ``root``; return the total."""
    rng = random.Random(seed)
    size = total_bytes // files
    for i in range(files):
        directory = root / f"pkg{i % DIRECTORIES:02d}"
        directory.mkdir(exist_ok=True)
        text = base64.encodebytes(rng.randbytes(size * 3 // 4 + 3))[:size]
        (directory / f"module_{i:05d}.py").write_bytes(text)
    return size * files


@contextlib.contextmanager
def counted_writes() -> Iterator[list[tuple[str, int]]]:
    """Record ``(key, bytes)`` of every object a ``DirectoryStore`` writes while inside."""
    from idds_fat.cache.directory import DirectoryStore

    writes: list[tuple[str, int]] = []
    original = DirectoryStore._write

    def counting(self: DirectoryStore, key: str, data: bytes) -> None:
        writes.append((key, len(data)))
        original(self, key, data)

    DirectoryStore._write = counting  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        DirectoryStore._write = original  # type: ignore[method-assign]


def _submission(work_dir: Path, tree: Path, workers: int) -> dict[str, Any]:
    """Open a workflow on ``tree``, run one trivial call, close; return times and writes."""
    from idds_fat import Workflow, work

    # The jobs run in the extracted context, where this package is not importable.
    cloudpickle.register_pickle_by_value(peers.tasks)

    options: dict[str, Any] = {"max_workers": workers, "progress": False}
    if warm_available():
        options["local_mode"] = "warm"
    with counted_writes() as writes:
        start = time.perf_counter()
        wf = Workflow("bench-context", work_dir=work_dir, source_dir=tree, **options)
        with wf:
            started = time.perf_counter()
            work(trivial)(1)
            called = time.perf_counter()
        total = time.perf_counter() - start
    archive = wf.parts.archive
    archive_key = archive.sha256 if archive is not None else ""
    return {
        "start_s": started - start,
        "call_s": called - started,
        "total_s": total,
        "archive_sha256": archive_key,
        "archive_bytes_written": sum(n for key, n in writes if key == archive_key),
        "other_bytes_written": sum(n for key, n in writes if key != archive_key),
        "objects_written": len(writes),
    }


def measure_context(files: int, total_mb: float, runs: int, workers: int) -> dict[str, Any]:
    """Make the tree, time its archive, and submit it twice; return the figures."""
    from idds_fat.context import build_context_archive

    with tempfile.TemporaryDirectory(prefix="bench-context-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        content = make_tree(tree, files, int(total_mb * 1e6))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            archive = build_context_archive(tree, max_bytes=max(content * 2, 100 * 2**20))
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        hashlib.sha256(archive.data).hexdigest()
        hash_s = time.perf_counter() - start
        work_dir = Path(tmp) / "work"
        first = _submission(work_dir, tree, workers)
        second = _submission(work_dir, tree, workers)
    zip_s = statistics.median(times)
    return {
        "files": archive.files,
        "content_bytes": archive.content_bytes,
        "zip_bytes": len(archive.data),
        "runs": runs,
        "zip_and_hash_s": zip_s,
        "zip_and_hash_all_s": times,
        "hash_only_s": hash_s,
        "mb_per_s": archive.content_bytes / 1e6 / zip_s,
        "first": first,
        "second": second,
    }


def context_report(figures: dict[str, Any]) -> str:
    """Return the context table and the verdict on the second upload."""
    first, second = figures["first"], figures["second"]
    lines = [
        f"Context: {figures['files']} files, {figures['content_bytes'] / 1e6:.1f} MB "
        f"(zip {figures['zip_bytes'] / 1e6:.1f} MB); zip + sha256 median of {figures['runs']}: "
        f"{figures['zip_and_hash_s']:.2f} s ({figures['mb_per_s']:.0f} MB/s; "
        f"sha256 of the zip alone {figures['hash_only_s'] * 1e3:.0f} ms)",
        table(
            ["submission", "start s", "1st call s", "total s", "context B up", "other B up"],
            [
                (
                    "first",
                    first["start_s"],
                    first["call_s"],
                    first["total_s"],
                    first["archive_bytes_written"],
                    first["other_bytes_written"],
                ),
                (
                    "second (same tree)",
                    second["start_s"],
                    second["call_s"],
                    second["total_s"],
                    second["archive_bytes_written"],
                    second["other_bytes_written"],
                ),
            ],
            first_width=20,
        ),
    ]
    same = first["archive_sha256"] == second["archive_sha256"]
    verdict = "met" if second["archive_bytes_written"] == 0 and same else "missed"
    lines.append(
        f"second submission: same sha256: {same}; context bytes uploaded: "
        f"{second['archive_bytes_written']} (target 0: {verdict})"
    )
    return "\n".join(lines)
