"""Configuration precedence: defaults < TOML file < IDDS_FAT_* environment < arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from idds_fat import Config, ConfigError, Workflow, load_config


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


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (
            'backend = ["local"]',
            "backend = ['local'] from {file}: expected one of local, slurm, panda",
        ),
        ("max_workers = true", "max_workers = True from {file}: expected a whole number"),
        ("max_workers = 0", "max_workers = 0 from {file}: expected a number of at least 1"),
        ("publish_timeout = -5", "publish_timeout = -5 from {file}: expected a number above 0"),
        ('progress = "maybe"', "progress = 'maybe' from {file}: expected true or false"),
        ("progress = 1", "progress = 1 from {file}: expected true or false"),
        ("local_mode = 3", "local_mode = 3 from {file}: expected one of warm, cold"),
        ('container_runtime = "lxc"', "container_runtime = 'lxc' from {file}: expected one of"),
        ('service_url = "host:8000"', "service_url = 'host:8000' from {file}: expected a URL"),
        ("slurm_options = [1.5]", "slurm_options = [1.5] from {file}: expected a list of strings"),
    ],
)
def test_a_bad_setting_in_the_file_names_itself_its_value_and_the_file(
    line, says, tmp_path, monkeypatch
):
    config_file = tmp_path / "idds-fat.toml"
    config_file.write_text(line + "\n")
    monkeypatch.setenv("IDDS_FAT_CONFIG", str(config_file))
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert str(caught.value).startswith(says.format(file=config_file))


def test_a_bad_setting_from_the_environment_or_an_argument_names_its_source(monkeypatch):
    monkeypatch.setenv("IDDS_FAT_PUBLISH_TIMEOUT", "-1")
    with pytest.raises(
        ConfigError, match=r"publish_timeout = '-1' from \$IDDS_FAT_PUBLISH_TIMEOUT"
    ):
        load_config()
    monkeypatch.delenv("IDDS_FAT_PUBLISH_TIMEOUT")
    with pytest.raises(ConfigError, match="max_workers = True from the arguments"):
        load_config(max_workers=True)
    with pytest.raises(ConfigError, match="local_direct_results = 'sometimes' from the arguments"):
        Workflow(local_direct_results="sometimes")
    with pytest.raises(ConfigError, match=r"result_grace_seconds = -1 from Config\(\)"):
        Config(result_grace_seconds=-1)
    with pytest.raises(ConfigError, match="slurm_poll_min = 9.0 is above slurm_poll_max = 3.0"):
        load_config(slurm_poll_min=9, slurm_poll_max=3)


def test_secrets_are_masked_in_setting_errors(monkeypatch):
    monkeypatch.setenv("IDDS_FAT_BROKER_PASSWORD", "hunter2")
    config = load_config()  # text is a fine password
    assert config.broker_password == "hunter2"
    with pytest.raises(ConfigError) as caught:
        load_config(token=["s3cret-token"])
    assert "s3cret" not in str(caught.value) and "token = ********" in str(caught.value)


def test_settings_given_as_text_or_numbers_of_the_other_kind_are_converted():
    config = load_config(max_workers="4", progress="off", publish_timeout=5, gpu_devices=[0, 1])
    assert config.max_workers == 4 and config.progress is False
    assert config.publish_timeout == 5.0 and isinstance(config.publish_timeout, float)
    assert config.gpu_devices == ("0", "1")
    assert load_config(container_runtime="/usr/bin/podman").container_runtime == "/usr/bin/podman"
    assert load_config(result_inline_bytes=0, max_resubmits=0).max_resubmits == 0


def test_a_work_dir_or_cache_directory_that_is_a_file_is_refused_by_name(tmp_path):
    a_file = tmp_path / "plain.txt"
    a_file.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"work_dir = .*: {a_file} is a file, not a directory"):
        load_config(work_dir=a_file)
    with pytest.raises(ConfigError, match=f"work_dir = .*: {a_file} is a file"):
        load_config(work_dir=a_file / "below")
    with pytest.raises(ConfigError, match=f"cache = .*: {a_file} is a file"):
        load_config(cache=str(a_file))
    assert load_config(work_dir=tmp_path / "new" / "deeper").work_dir == tmp_path / "new" / "deeper"


def test_backend_choices_are_the_backends_this_installation_has():
    from idds_fat.backends import BACKENDS
    from idds_fat.config import BACKEND_NAMES

    assert set(BACKEND_NAMES) == set(BACKENDS)
