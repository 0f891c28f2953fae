"""``idds-fat monitor``: where a workflow's monitoring page is, and the token it wants."""

from __future__ import annotations

import json
from pathlib import Path

import click
import requests

from idds_fat.cli.output import (
    echo_json,
    effective_work_dir,
    json_option,
    reports_errors,
    work_dir_option,
)
from idds_fat.errors import IddsFatError
from idds_fat.workdir import WorkDirPaths
from idds_fat.workflow import catalog

# Seconds to wait for the service to answer /healthz.
_PROBE_SECONDS = 2.0


@click.command()
@click.argument("workflow_id", metavar="[WORKFLOW]", required=False)
@click.option(
    "--show-token",
    is_flag=True,
    default=False,
    help="Also print the service token the page asks for (paste it into the page).",
)
@json_option
@work_dir_option
@reports_errors
def monitor(
    workflow_id: str | None, show_token: bool, as_json: bool, work_dir: Path | None
) -> None:
    """Print the address of WORKFLOW's monitoring page (default: the newest workflow).

    The page is served by the workflow's service: its own embedded service while
    its caller runs, or the `idds-fat serve` it was configured with. The token
    is printed only with --show-token; the page keeps it in the browser tab.
    """
    root = effective_work_dir(work_dir)
    if workflow_id is None:
        workflows = catalog.list_workflows(root)
        if not workflows:
            raise IddsFatError(f"no workflows in {WorkDirPaths(root).workflows}")
        full_id = workflows[0].id
    else:
        full_id = catalog.resolve_workflow_id(root, workflow_id)
    connection_file = WorkDirPaths(root).workflow(full_id).connection
    try:
        connection = json.loads(connection_file.read_text())
    except (OSError, ValueError) as exc:
        raise IddsFatError(f"cannot read {connection_file}: {exc}") from exc
    base = str(connection["service_url"]).rstrip("/")
    url = f"{base}/workflows/{full_id}"
    running = _answers(base)
    if as_json:
        shown = {"workflow": full_id, "url": url, "service_running": running}
        if show_token:
            shown["token"] = connection.get("token")
        echo_json(shown)
        return
    click.echo(url)
    if not running:
        click.echo(
            f"the service at {base} does not answer: a workflow's embedded service stops "
            "with its caller; `idds-fat serve` shows every workflow of this work dir",
            err=True,
        )
    if show_token:
        click.echo(f"token: {connection.get('token') or '(none: the service wants no token)'}")


def _answers(base: str) -> bool:
    try:
        return requests.get(base + "/healthz", timeout=_PROBE_SECONDS).ok
    except requests.RequestException:
        return False
