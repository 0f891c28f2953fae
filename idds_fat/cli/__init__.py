"""The ``idds-fat`` command line.

``main`` is the entry point; ``serve`` lives here, the other commands in their
own modules: ``status`` and ``logs`` (:mod:`idds_fat.cli.status`), ``results``
and ``cancel`` (:mod:`idds_fat.cli.reconnect`), ``config show``
(:mod:`idds_fat.cli.config_show`), ``smoke`` (:mod:`idds_fat.cli.smoke`),
``monitor`` (:mod:`idds_fat.cli.monitor`), ``wrapper``
(:mod:`idds_fat.cli.wrapper`) and ``token`` (:mod:`idds_fat.cli.token`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from idds_fat import __version__
from idds_fat.config import load_config
from idds_fat.errors import IddsFatError
from idds_fat.workdir import WorkDirPaths

TOKEN_ENV = "IDDS_FAT_TOKEN"


# -h as well as --help, on every command (click passes the group's context settings down).
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class _CommandGroup(click.Group):
    """The ``idds-fat`` group: each command's module is imported when the command is named.

    ``idds-fat status`` then loads the catalog and not the runtime, the service
    or requests: a second of imports on a busy machine, for a read of one file.
    ``--help`` lists every command, so it imports them all.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Return the names of every command, loaded or not."""
        return sorted({*super().list_commands(ctx), *_COMMAND_NAMES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Return the command named ``cmd_name``, importing its module; ``None`` if unknown."""
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in _COMMAND_NAMES:
            command = _load_command(cmd_name)
            self.add_command(command)
        return command


@click.group(cls=_CommandGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", "-V", prog_name="idds-fat")
def main() -> None:
    """idds-fat: run Python functions as distributed tasks."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8470, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the cache and the results live.  [default: WORK_DIR/service from the config]",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    default=None,
    help=(
        f"Bearer token clients must send. Set it in the environment ({TOKEN_ENV}) "
        "rather than on the command line, where other users can see it. "
        "Required, on loopback too: at least 22 characters, 10 of them different; "
        "`idds-fat token` makes one."
    ),
)
@click.option(
    "--public-host",
    "public_hosts",
    multiple=True,
    help="A name clients reach the service by (repeatable). Requests whose Host header "
    "is not a loopback name, such a name (or the host of service_url from the config), "
    "or, beyond loopback, this machine's name or an IP address get 421.",
)
@click.option(
    "--result-ttl-days",
    type=float,
    default=None,
    help="Days to keep results.  [default: result_ttl_days from the config, 7]",
)
@click.option(
    "--broker",
    envvar="IDDS_FAT_BROKER",
    show_envvar=True,
    default=None,
    help="Mirror results from these STOMP brokers (stomp://host:port[,host:port]). "
    "Credentials come from IDDS_FAT_BROKER_USER and IDDS_FAT_BROKER_PASSWORD.",
)
@click.option(
    "--mirror-queue",
    default=None,
    help="Destination to mirror.  [default: /queue/PREFIX.mirror.> for every workflow]",
)
def serve(
    host: str,
    port: int,
    data_dir: Path | None,
    token: str | None,
    result_ttl_days: float | None,
    broker: str | None,
    mirror_queue: str | None,
    public_hosts: tuple[str, ...],
) -> None:
    """Run the idds-fat service (cache, result store, monitoring page) until interrupted."""
    from idds_fat.monitor import monitor_routes
    from idds_fat.service.server import serve as run_service
    from idds_fat.workflow import Workflow

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(broker=broker)
        mirror = None
        if config.broker:
            mirror = {
                "brokers": config.brokers,
                "destination": mirror_queue or f"/queue/{config.broker_queue_prefix}.mirror.>",
                "user": config.broker_user,
                "password": config.broker_password,
            }
        logging.getLogger(__name__).info(
            "monitoring page at http://%s:%d/ for %s", host, port, config.work_dir
        )
        run_service(
            host=host,
            port=port,
            data_dir=data_dir or WorkDirPaths(config.work_dir).service,
            token=token or config.token,
            result_ttl_seconds=(
                result_ttl_days if result_ttl_days is not None else config.result_ttl_days
            )
            * 86400.0,
            mirror=mirror,
            routes=lambda guarded: monitor_routes(config.work_dir, guarded, Workflow.attach),
            public_hosts=(*public_hosts, config.service_url or ""),
        )
    except IddsFatError as exc:
        raise click.ClickException(str(exc)) from exc


_COMMAND_NAMES = (
    "status",
    "logs",
    "results",
    "cancel",
    "config",
    "smoke",
    "monitor",
    "wrapper",
    "token",
)


def _load_command(name: str) -> click.Command:
    # Import statements rather than a table for importlib, so the arrows stay
    # visible (tests/test_imports.py follows them).
    if name in ("status", "logs"):
        from idds_fat.cli import status as module
    elif name in ("results", "cancel"):
        from idds_fat.cli import reconnect as module
    elif name == "config":
        from idds_fat.cli import config_show as module
    elif name == "smoke":
        from idds_fat.cli import smoke as module
    elif name == "monitor":
        from idds_fat.cli import monitor as module
    elif name == "wrapper":
        from idds_fat.cli import wrapper as module
    else:
        from idds_fat.cli import token as module
    command = getattr(module, name)
    assert isinstance(command, click.Command), name
    return command
