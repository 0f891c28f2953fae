"""A plain (non-editable) install carries what it needs inside the package."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from idds_fat.wrapper_source import wrapper_bytes

REPO = Path(__file__).resolve().parents[1]


def test_wheel_builds_the_same_wrapper_as_the_source_tree(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("idds_fat-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for source in sorted((REPO / "idds_fat/node").glob("*.py")):
            assert f"idds_fat/node/{source.name}" in names
        archive.extractall(tmp_path / "site")
    # Jobs get the wrapper built from the installed sources: the same bytes, so the same key.
    built = subprocess.run(
        [
            sys.executable,
            "-c",
            "import hashlib, idds_fat.wrapper_source as w; "
            "print(w.NODE_DIR); print(hashlib.sha256(w.wrapper_bytes()).hexdigest())",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    node_dir, key = built.stdout.split()
    assert node_dir == str(tmp_path / "site/idds_fat/node")
    assert key == hashlib.sha256(wrapper_bytes()).hexdigest()


def test_wheel_carries_the_monitoring_page_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("idds_fat-*.whl")
    static = REPO / "idds_fat/monitor/static"
    with zipfile.ZipFile(wheel) as archive:
        for name in ("monitor.js", "monitor.css"):
            packed = archive.read(f"idds_fat/monitor/static/{name}")
            assert packed == (static / name).read_bytes()
