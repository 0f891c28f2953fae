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


_RELATIVE = {"work_dir": "wd", "env_cache_dir": "envs", "cache": "store", "python": "bin/py"}


@pytest.mark.parametrize("source", ["file", "env", "argument"])
def test_relative_path_settings_are_absolute_from_the_directory_they_were_read_in(
    source, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IDDS_FAT_WORK_DIR")  # set by the autouse fixture; it would win
    if source == "file":
        lines = [f'{name} = "{value}"' for name, value in _RELATIVE.items()]
        (tmp_path / "c.toml").write_text("\n".join(lines) + "\n")
        monkeypatch.setenv("IDDS_FAT_CONFIG", "c.toml")
        config = load_config()
    elif source == "env":
        for name, value in _RELATIVE.items():
            monkeypatch.setenv(f"IDDS_FAT_{name.upper()}", value)
        config = load_config()
    else:
        config = load_config(**_RELATIVE)
    monkeypatch.chdir(tmp_path.parent)  # read once: moving on changes nothing
    assert config.work_dir == tmp_path / "wd"
    assert config.env_cache_dir == tmp_path / "envs"
    assert config.cache == str(tmp_path / "store")
    assert config.python == str(tmp_path / "bin" / "py")
    assert config.replace(max_workers=2).work_dir == tmp_path / "wd"


def test_cache_urls_and_interpreter_names_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cache in ("service", "http://127.0.0.1:8000/cache", "s3://bucket/prefix", "file:///x"):
        assert load_config(cache=cache).cache == cache
    assert load_config(python="python3").python == "python3"  # looked up on PATH
    home = Path("~").expanduser()
    assert load_config(work_dir="~/wd", cache="~/store").work_dir == home / "wd"
    assert load_config(cache="~/store").cache == str(home / "store")
