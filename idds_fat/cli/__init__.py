"""The ``idds-fat`` command line.

``main`` is the entry point; ``serve`` lives here, the other commands in their
own modules: ``status`` and ``logs`` (:mod:`idds_fat.cli.status`), ``results``
and ``cancel`` (:mod:`idds_fat.cli.reconnect`), ``config show``
(:mod:`idds_fat.cli.config_show`), ``smoke`` (:mod:`idds_fat.cli.smoke`),
``monitor`` (:mod:`idds_fat.cli.monitor`) and ``wrapper``
(:mod:`idds_fat.cli.wrapper`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from idds_fat.config import load_config
from idds_fat.errors import IddsFatError
from idds_fat.workdir import WorkDirPaths

TOKEN_ENV = "IDDS_FAT_TOKEN"


@click.group()
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
        "Required unless listening on a loopback address."
    ),
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
        )
    except IddsFatError as exc:
        raise click.ClickException(str(exc)) from exc


def _add_commands() -> None:
    # Imported here, after main exists, so each module stays a plain list of commands.
    from idds_fat.cli.config_show import config
    from idds_fat.cli.monitor import monitor
    from idds_fat.cli.reconnect import cancel, results
    from idds_fat.cli.smoke import smoke
    from idds_fat.cli.status import logs, status
    from idds_fat.cli.wrapper import wrapper

    for command in (status, logs, results, cancel, config, smoke, monitor, wrapper):
        main.add_command(command)


_add_commands()
