"""Shared fixtures: every test gets its own work dir and no user configuration."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Point idds-fat at a fresh work dir and away from the user's config file."""
    for name in list(__import__("os").environ):
        if name.startswith("IDDS_FAT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IDDS_FAT_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("IDDS_FAT_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"
