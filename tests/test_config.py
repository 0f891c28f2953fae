"""Configuration precedence: defaults < TOML file < IDDS_FAT_* environment < arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from idds_fat import ConfigError, load_config


def test_defaults_apply_without_file_or_environment(monkeypatch):
    monkeypatch.delenv("IDDS_FAT_WORK_DIR")
    config = load_config()
    assert config.backend == "local" and config.max_workers >= 1
    assert config.max_argument_bytes == 100 * 1024 * 1024
    assert config.work_dir.name == "idds-fat"


def test_file_then_environment_then_arguments_win(tmp_path, monkeypatch):
    config_file = tmp_path / "config.toml"
    config_file.write_text('[idds_fat]\nmax_workers = 3\non_exit = "cancel"\ngpu_devices = ["0"]\n')
    monkeypatch.setenv("IDDS_FAT_CONFIG", str(config_file))
    assert load_config().max_workers == 3
    assert load_config().gpu_devices == ("0",)
    monkeypatch.setenv("IDDS_FAT_MAX_WORKERS", "5")
    monkeypatch.setenv("IDDS_FAT_GPU_DEVICES", "1,2")
    config = load_config()
    assert (config.max_workers, config.on_exit, config.gpu_devices) == (5, "cancel", ("1", "2"))
    assert load_config(max_workers=7, on_exit=None).max_workers == 7
    assert isinstance(load_config().work_dir, Path)


def test_bad_settings_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown settings"):
        load_config(colour="blue")
    with pytest.raises(ConfigError, match="on_exit"):
        load_config(on_exit="later")
    monkeypatch.setenv("IDDS_FAT_MAX_WORKERS", "many")
    with pytest.raises(ConfigError, match="max_workers"):
        load_config()
    monkeypatch.delenv("IDDS_FAT_MAX_WORKERS")
    bad = tmp_path / "bad.toml"
    bad.write_text("speed = 3\n")
    monkeypatch.setenv("IDDS_FAT_CONFIG", str(bad))
    with pytest.raises(ConfigError, match="unknown settings"):
        load_config()
