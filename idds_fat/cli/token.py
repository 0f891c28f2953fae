"""``idds-fat token``: make a service token strong enough for ``idds-fat serve``."""

from __future__ import annotations

import click

from idds_fat.service.exposure import generate_token


@click.command()
def token() -> None:
    """Print a new random service token (32 random bytes, url-safe base64).

    Use it as IDDS_FAT_TOKEN for `idds-fat serve` and its clients:
    export IDDS_FAT_TOKEN=$(idds-fat token). It is printed to stdout only,
    never logged.
    """
    click.echo(generate_token())
