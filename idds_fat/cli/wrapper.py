"""``idds-fat wrapper``: write the one file jobs run, for a site that stages it itself."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import click


@click.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write the wrapper to this file.  [default: standard output]",
)
def wrapper(output: Path | None) -> None:
    """Write the job wrapper built from this installation's idds_fat.node package.

    Jobs get the same bytes from the cache (named by their sha256, printed on
    standard error); run it as ``python3 FILE --spec LOCATION``.
    """
    from idds_fat.wrapper_source import wrapper_bytes

    data = wrapper_bytes()
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        output.write_bytes(data)
    click.echo(f"sha256 {hashlib.sha256(data).hexdigest()}", err=True)
