"""A plain (non-editable) install carries the wrapper inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_wrapper_and_finds_it(tmp_path):
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
        assert "idds_fat/_wrapper/wrapper.py" in names
        assert (
            archive.read("idds_fat/_wrapper/wrapper.py")
            == (REPO / "wrapper/wrapper.py").read_bytes()
        )
        archive.extractall(tmp_path / "site")
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from idds_fat.wrapper_source import wrapper_path; print(wrapper_path())",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert found.stdout.strip() == str(tmp_path / "site/idds_fat/_wrapper/wrapper.py")


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
