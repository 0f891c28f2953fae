"""``idds-fat config show``: the effective settings, where each came from, secrets masked."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import click

from idds_fat.cli.output import echo_json, json_option, reports_errors, table
from idds_fat.config import ENV_PREFIX, SECRET_SETTINGS, Config, config_file_path, load_config
from idds_fat.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

MASK = "********"


def _file_settings(path: Path) -> set[str]:
    # Same reading rule as idds_fat.config: top level, or an [idds_fat] table.
    if not path.is_file():
        return set()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return set(data.get("idds_fat", data))


def setting_sources(path: Path | None = None) -> dict[str, str]:
    """Return where each setting's value comes from: ``default``, ``file`` or ``env``.

    ``path`` is the configuration file (default: :func:`config_file_path`). The
    environment wins over the file, as in :func:`~idds_fat.config.load_config`.

    Raises:
        ConfigError: the file is not valid TOML.
    """
    in_file = _file_settings(path or config_file_path())
    sources = {}
    for f in dataclasses.fields(Config):
        if os.environ.get(ENV_PREFIX + f.name.upper()):
            sources[f.name] = "env"
        elif f.name in in_file:
            sources[f.name] = "file"
        else:
            sources[f.name] = "default"
    return sources


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def masked_settings(config: Config) -> dict[str, Any]:
    """Return the settings of ``config`` as JSON-able values, secrets replaced by a mask.

    An unset secret stays ``None``, so one can still see whether it is set.
    """
    values = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in SECRET_SETTINGS and value is not None:
            value = MASK
        values[f.name] = _json_value(value)
    return values


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value) or "-"
    return str(value)


@click.group()
def config() -> None:
    """Inspect the configuration."""


@config.command()
@json_option
@reports_errors
def show(as_json: bool) -> None:
    """Print the effective configuration and where each value came from.

    Sources are default, file (the TOML file below) or env (IDDS_FAT_*).
    Secrets (token, broker_password) are masked.
    """
    path = config_file_path()
    values = masked_settings(load_config())
    sources = setting_sources(path)
    if as_json:
        echo_json(
            {
                "config_file": str(path),
                "config_file_exists": path.is_file(),
                "settings": {
                    name: {"value": value, "source": sources[name]}
                    for name, value in values.items()
                },
            }
        )
        return
    state = "" if path.is_file() else " (does not exist)"
    click.echo(f"config file: {path}{state}\n")
    rows = [(name, _text(value), sources[name]) for name, value in values.items()]
    click.echo(table(("SETTING", "VALUE", "SOURCE"), rows))
