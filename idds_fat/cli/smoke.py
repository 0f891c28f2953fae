"""``idds-fat smoke``: run a tiny workflow end to end through the configured backend.

A map of a few trivial jobs must come back in input order, and a job that raises
on purpose must re-raise as its own exception type. With a broker configured it
runs twice: over STOMP (some result must arrive that way) and REST only (with
the broker switched off). Either way it ends with one line: ``smoke ok: ...``
or ``smoke failed: <reason>``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import click
import cloudpickle

from idds_fat.cli import smoke_jobs
from idds_fat.config import Config, load_config
from idds_fat.errors import IddsFatError, JobLostError
from idds_fat.workflow import Workflow

#: Jobs of the map; one more job fails on purpose.
MAP_JOBS = 4
_TOKEN = "raised on purpose by idds-fat smoke"


class SmokeFailure(IddsFatError):
    """The smoke test found something wrong; the message is one line saying what."""


@dataclass(frozen=True)
class SmokeRun:
    """One run of the smoke workflow over one result channel (``stomp`` or ``rest``)."""

    channel: str
    workflow_id: str
    jobs: int
    seconds: float
    stats: dict[str, int] = field(hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (``seconds`` rounded to milliseconds)."""
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class SmokeReport:
    """A passed smoke test: the backend, its runs and how long it all took."""

    backend: str
    runs: tuple[SmokeRun, ...]
    seconds: float

    @property
    def jobs(self) -> int:
        """The number of jobs run, over all runs."""
        return sum(run.jobs for run in self.runs)

    def line(self) -> str:
        """Return the one-line summary, ``smoke ok: backend ..., channels ..., N jobs, S s``."""
        channels = "+".join(run.channel for run in self.runs)
        return (
            f"smoke ok: backend {self.backend}, channels {channels}, "
            f"{self.jobs} jobs, {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (``ok`` is true)."""
        return {
            "ok": True,
            "backend": self.backend,
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "runs": [run.to_dict() for run in self.runs],
        }


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _job_failure(name: str, exc: BaseException, workflow_id: str) -> SmokeFailure:
    reason = f"job {name} of workflow {workflow_id} failed: {_first_line(exc)}"
    if isinstance(exc, JobLostError) and exc.stderr_path:
        reason += f" (stderr: {exc.stderr_path})"
    failure = SmokeFailure(reason)
    failure.__cause__ = exc
    return failure


def _check_results(wf: Workflow, squares: list, boom: concurrent.futures.Future) -> None:
    for position, future in enumerate(squares):
        exc = future.exception()
        if exc is not None:
            raise _job_failure(f"square[{position}]", exc, wf.id)
    values = [future.result() for future in squares]
    expected = [i * i for i in range(len(squares))]
    if values != expected:
        raise SmokeFailure(f"the map returned {values}, expected {expected} in input order")
    exc = boom.exception()
    if exc is None:
        raise SmokeFailure("the job that raises on purpose returned a value")
    if type(exc) is not smoke_jobs.SmokeCheckError or str(exc) != _TOKEN:
        raise _job_failure("fail_on_purpose[0]", exc, wf.id)


def _run_once(config: Config, channel: str, deadline: float) -> SmokeRun:
    started = time.monotonic()
    with Workflow(name="smoke", config=config) as wf:
        squares = wf.map_kwargs(smoke_jobs.square, [{"x": i} for i in range(MAP_JOBS)]).futures
        boom = wf.submit(smoke_jobs.fail_on_purpose, _TOKEN)
        everything = [*squares, boom]
        remaining = max(0.0, deadline - time.monotonic())
        _, pending = concurrent.futures.wait(everything, remaining)
        if pending:
            # Raising inside the workflow cancels what is still running.
            raise SmokeFailure(
                f"{len(pending)} of {len(everything)} jobs of workflow {wf.id} unfinished "
                f"when the time ran out (backend {config.backend}, channel {channel})"
            )
        _check_results(wf, squares, boom)
    stats = wf.stats
    if stats.get(channel, 0) == 0:
        subscriber = wf.parts.subscriber
        why = ""
        if channel == "stomp" and subscriber is not None and subscriber.last_error:
            why = f"; the caller's STOMP subscription failed: {subscriber.last_error}"
        raise SmokeFailure(
            f"no result of workflow {wf.id} arrived over {channel} "
            f"(results by channel: stomp {stats.get('stomp', 0)}, rest {stats.get('rest', 0)})"
            + why
        )
    return SmokeRun(channel, wf.id, len(everything), time.monotonic() - started, stats)


def run_smoke(timeout: float, config: Config | None = None) -> SmokeReport:
    """Run the smoke workflow(s) with ``config`` (default: the configuration as is).

    ``timeout`` bounds the waiting for results over all runs.

    Returns:
        the report of a passed test.

    Raises:
        SmokeFailure: a check failed (values, order, exception type, channel, time).
        IddsFatError: the workflow could not start (configuration, service, backend).
    """
    config = config or load_config()
    # The smoke jobs travel by value, so nodes without idds-fat can run them too.
    cloudpickle.register_pickle_by_value(smoke_jobs)
    started = time.monotonic()
    deadline = started + timeout
    runs = []
    # The smoke test checks the channels a remote job uses: local warm workers
    # must not hand results back over their pipe instead.
    config = dataclasses.replace(config, local_direct_results=False)
    if config.broker:
        runs.append(_run_once(config, "stomp", deadline))
        # load_config ignores None overrides: replace() is how the broker goes away.
        runs.append(_run_once(dataclasses.replace(config, broker=None), "rest", deadline))
    else:
        runs.append(_run_once(config, "rest", deadline))
    return SmokeReport(config.backend, tuple(runs), time.monotonic() - started)


@click.command()
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds to wait for all results (over all runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="On failure, also print the traceback.")
@click.pass_context
def smoke(ctx: click.Context, timeout: float, as_json: bool, verbose: bool) -> None:
    """Run a tiny workflow through the configured backend and result channels.

    Exits 0 with one line "smoke ok: ..." or 1 with one line "smoke failed: ...".
    Meant for CI: see docs/cli.md.
    """
    try:
        report = run_smoke(timeout)
    except Exception as exc:  # noqa: BLE001 - a smoke test reports, it never shows a traceback
        reason = str(exc) if isinstance(exc, SmokeFailure) else _first_line(exc)
        reason = " ".join(reason.split("\n"))
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        if as_json:
            click.echo(json.dumps({"ok": False, "reason": reason}))
        else:
            click.echo(f"smoke failed: {reason}", err=True)
        ctx.exit(1)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.line())
