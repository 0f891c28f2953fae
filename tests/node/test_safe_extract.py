"""The wrapper's archive extraction refuses everything that could escape or explode."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest

from idds_fat.node.errors import UnsafeArchiveError
from idds_fat.node.extract import safe_extract


def _zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


def test_plain_archive_extracts_with_modes(tmp_path):
    data = _zip(
        [
            ("pkg/mod.py", b"x = 1\n", stat.S_IFREG | 0o644),
            ("run.sh", b"#!/bin/sh\n", stat.S_IFREG | 0o755),
        ]
    )
    assert safe_extract(data, tmp_path, 10_000) == 16
    assert (tmp_path / "pkg" / "mod.py").read_bytes() == b"x = 1\n"
    assert (tmp_path / "run.sh").stat().st_mode & 0o111


@pytest.mark.parametrize(
    "name", ["../evil.py", "pkg/../../evil.py", "/etc/evil.py", "C:/evil.py", "..\\evil.py"]
)
def test_path_traversal_is_refused(tmp_path, name):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="outside the tree"):
        safe_extract(_zip([(name, b"boom", stat.S_IFREG | 0o644)]), dest, 10_000)
    assert not (tmp_path / "evil.py").exists()


def test_symlink_entry_is_refused(tmp_path):
    data = _zip([("link", b"/etc/passwd", stat.S_IFLNK | 0o777)])
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(data, tmp_path, 10_000)
    assert not (tmp_path / "link").exists()


def test_existing_symlink_in_destination_cannot_redirect_writes(tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafeArchiveError, match="outside the tree"):
        safe_extract(_zip([("sub/evil.py", b"x", stat.S_IFREG | 0o644)]), dest, 10_000)
    assert not (outside / "evil.py").exists()


def test_zip_bomb_is_stopped_at_the_size_limit(tmp_path):
    data = _zip([("zeros", b"\0" * 5_000_000, stat.S_IFREG | 0o644)])
    assert len(data) < 10_000
    with pytest.raises(UnsafeArchiveError, match="expands beyond"):
        safe_extract(data, tmp_path, 1_000_000)


def test_too_many_entries_are_refused(tmp_path):
    data = _zip([(f"f{i}", b"", stat.S_IFREG | 0o644) for i in range(20)])
    with pytest.raises(UnsafeArchiveError, match="entries"):
        safe_extract(data, tmp_path, 10_000, max_files=10)


def test_not_a_zip_is_refused(tmp_path):
    with pytest.raises(UnsafeArchiveError, match="not a zip"):
        safe_extract(b"definitely not a zip", tmp_path, 10_000)


def test_a_refused_zip_leaves_nothing_it_wrote(tmp_path):
    # Issue 17, item 8: the part written before the refusal stayed on disk.
    data = _zip(
        [
            ("pkg/first.py", b"x" * 5000, stat.S_IFREG | 0o644),
            ("pkg/second.py", b"y" * 5000, stat.S_IFREG | 0o644),
        ]
    )
    with pytest.raises(UnsafeArchiveError, match="expands beyond"):
        safe_extract(data, tmp_path, 7000)
    assert list(tmp_path.iterdir()) == []


def test_a_warm_worker_keeps_no_failed_extraction(tmp_path):
    # Five jobs whose code context is refused leave no bytes in the worker's files
    # (they stayed until the worker exited: 250 MB for five jobs).
    from idds_fat.node.run import WarmState

    data = _zip([(f"m{i}.py", b"z" * 100_000, stat.S_IFREG | 0o644) for i in range(5)])
    warm = WarmState(tmp_path)
    for job in range(5):
        with pytest.raises(UnsafeArchiveError):
            warm.context({"key": f"k{job}", "max_bytes": 250_000}, lambda key: data)
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) == 0
