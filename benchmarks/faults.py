"""Faults, for real: results expected, received, lost, doubled, and time to recover.

Runs, on this machine, with real processes and servers, each of:

* **broker**: a map of ``--broker-jobs`` over STOMP (a private ActiveMQ,
  ``idds_fat.testing.ActiveMQBroker``); the broker is SIGKILLed after a tenth
  of the results and stays down, so REST takes over. Recover: from the kill
  to the first result that came over REST.
* **service**: a map of ``--service-jobs`` through a real ``idds-fat serve``
  (``service_url``, a token from ``idds-fat token``; jobs ``--service-mode``
  warm or cold); the service is SIGKILLed after a tenth of the results and
  started again on the same port and data dir ``--service-down`` seconds
  later. The jobs retry their REST delivery meanwhile (``publish_timeout`` is
  set above the outage). Recover: from the restarted service answering to
  the next result.
* **caller**: a caller process (default warm mode, results straight back) is
  SIGKILLed after a tenth of the results of its ``--caller-jobs`` map; a new
  process calls ``Workflow.attach``. Recover: from the kill to ``attach``
  returning (the results already stored are settled then).
* **scale**: a map of ``--scale-jobs`` trivial jobs on local warm workers, no
  fault: wall time from the map to the last result, and the caller's peak RSS.

For each: *expected* jobs; *received*, the futures settled with the right
value; *lost*, the others (failed, lost or unfinished at the deadline);
*doubled*, a job's value taken by the caller more than once (results the
collector accepted beyond one per job, i.e. from a second attempt, plus any
future whose done-callbacks ran twice); *copies*, extra copies of a result the
collector dropped as duplicates (expected when two channels carry one);
*reruns*, job runs beyond one per job (each run appends to a file); *to end*,
from the fault to the last result. Each scenario runs in a fresh process of
this script, ``--runs`` times, and the table ends with the spread.

    .venv/bin/python benchmarks/faults.py [--runs 3] [--only broker,service,caller,scale] \\
        [--broker-jobs 400] [--service-jobs 200] [--service-down 40] \\
        [--caller-jobs 200] [--scale-jobs 10000] [--json FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from idds_fat import Workflow  # noqa: E402
from idds_fat.results import AsyncResult  # noqa: E402
from idds_fat.testing import ActiveMQBroker, wait_until  # noqa: E402
from idds_fat.testing.processes import free_port  # noqa: E402

SCENARIOS = ("broker", "service", "caller", "scale")
BROKER_USER, BROKER_PASSWORD = "idds", "faults-benchmark"
DEADLINE = 600.0  # seconds a scenario's map may take before its unfinished jobs count as lost
CLI = [sys.executable, "-c", "from idds_fat.cli import main; main()"]
COLUMNS = ("expected", "received", "lost", "doubled", "copies", "reruns", "rejected")


def plus_one(x: int, runs_file: str, pause: float) -> int:
    """The job: note the run (one line per run, appended atomically), wait ``pause``, answer."""
    with open(runs_file, "a") as handle:
        handle.write(f"{x} {os.getpid()}\n")
    if pause:
        time.sleep(pause)
    return x + 1


def _settings(work_dir: Path) -> dict[str, Any]:
    return {"work_dir": str(work_dir), "source_dir": False, "progress": False}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Tally:
    """Counts what one caller received for ``n`` jobs whose right values are ``x + 1``."""

    def __init__(self, n: int, runs_file: Path) -> None:
        self.n = n
        self.runs_file = runs_file
        self.callbacks: Counter[int] = Counter()
        self.lock = threading.Lock()

    def watch(self, futures: Iterable[AsyncResult]) -> None:
        """Count each future's done-callbacks: more than one is a future settled twice."""
        for future in futures:

            def counted(_: AsyncResult, job: int = future.kwargs["x"]) -> None:
                with self.lock:
                    self.callbacks[job] += 1

            future.add_done_callback(counted)

    def figures(self, futures: list[AsyncResult], stats: dict[str, int]) -> dict[str, Any]:
        """The row: expected, received, lost, doubled, copies, reruns, rejected, errors."""
        received, errors = 0, Counter()
        for future in futures:
            if not future.done():
                errors["unfinished at the deadline"] += 1
            elif future.cancelled():
                errors["cancelled"] += 1
            elif future.exception() is not None:
                exc = future.exception()
                errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            elif future.result() != future.kwargs["x"] + 1:
                errors["a wrong value"] += 1
            else:
                received += 1
        lines = self.runs_file.read_text().splitlines() if self.runs_file.exists() else []
        runs = Counter(line.split()[0] for line in lines)
        # Which process ran each job twice: a warm worker again, or a new one.
        rerun = {
            x: [ln.split()[1] for ln in lines if ln.split()[0] == x] for x in runs if runs[x] > 1
        }
        settled_twice = sum(count - 1 for count in self.callbacks.values() if count > 1)
        return {
            "expected": self.n,
            "received": received,
            "lost": self.n - received,
            "doubled": max(0, stats["received"] - self.n) + settled_twice,
            "copies": stats["duplicates"],
            "reruns": sum(runs.values()) - len(runs),
            "rerun_pids": rerun,
            "rejected": stats["rejected"],
            "channels": {k: stats.get(k, 0) for k in ("stomp", "rest", "local")},
            "errors": dict(errors),
        }


def _collect(futures: list[AsyncResult]) -> Iterator[AsyncResult]:
    """``as_completed`` that stops at DEADLINE instead of raising."""
    try:
        yield from concurrent.futures.as_completed(futures, DEADLINE)
    except concurrent.futures.TimeoutError:  # the builtin's alias from Python 3.11 on
        return


def _jobs(n: int, runs_file: Path, pause: float) -> list[dict[str, Any]]:
    return [{"x": i, "runs_file": str(runs_file), "pause": pause} for i in range(n)]


# --- the scenarios, each in its own process ------------------------------------------


def run_broker(n: int, pause: float, tmp: Path) -> dict[str, Any]:
    """SIGKILL the broker after a tenth of the results; REST takes over."""
    broker = ActiveMQBroker(tmp / "activemq", users={BROKER_USER: BROKER_PASSWORD})
    broker.start()
    tally = Tally(n, tmp / "runs")
    try:
        with Workflow(
            "faults-broker",
            broker=broker.url,
            broker_user=BROKER_USER,
            broker_password=BROKER_PASSWORD,
            broker_timeout=2.0,
            result_grace_seconds=2.0,
            publish_timeout=60.0,
            **_settings(tmp / "work"),
        ) as wf:
            wait_until(lambda: wf.parts.subscriber.up, what="the STOMP subscription")
            started = time.monotonic()
            futures = wf.map_kwargs(plus_one, _jobs(n, tally.runs_file, pause)).futures
            tally.watch(futures)
            arrived, killed, rest_at_kill, recover, last = 0, None, 0, None, started
            for _ in _collect(futures):
                arrived += 1
                last = time.monotonic()
                if killed is None and arrived == max(1, n // 10):
                    rest_at_kill = wf.stats["rest"]
                    killed = time.monotonic()
                    broker.stop(kill=True)
                elif killed is not None and recover is None and wf.stats["rest"] > rest_at_kill:
                    recover = last - killed
            row = tally.figures(futures, wf.stats)
    finally:
        broker.stop(kill=True)
    return {
        **row,
        "recover_s": recover,
        "to_end_s": last - (killed or started),
        "wall_s": last - started,
    }


class Served:
    """A real ``idds-fat serve`` on loopback that can be killed and started again on
    the same port and data dir; its log is ``serve.log``."""

    def __init__(self, token: str, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "IDDS_FAT_TOKEN": token, "IDDS_FAT_WORK_DIR": str(tmp / "work")}
        self.argv = [*CLI, "serve", "--port", str(self.port), "--data-dir", str(tmp / "service")]
        self.log_path = tmp / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait until ``/healthz`` answers."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log)
        proc = self.proc

        def answers() -> bool:
            assert proc.poll() is None, self.log_path.read_text()[-2000:]
            try:
                return requests.get(self.url + "/healthz", timeout=2).ok
            except requests.RequestException:
                return False

        wait_until(answers, "idds-fat serve to answer", timeout=60)

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """Stop it cleanly (SIGTERM)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def run_service(n: int, pause: float, down: float, mode: str, tmp: Path) -> dict[str, Any]:
    """SIGKILL ``idds-fat serve`` after a tenth of the results; start it again ``down`` s later."""
    token = subprocess.run([*CLI, "token"], capture_output=True, text=True, check=True)
    service = Served(token.stdout.strip(), tmp)
    service.start()
    tally = Tally(n, tmp / "runs")
    restarted: list[float] = []

    def outage() -> None:
        service.kill()
        # The outage itself, not a wait for a condition: the service stays down this long.
        time.sleep(down)
        service.start()
        restarted.append(time.monotonic())

    try:
        with Workflow(
            "faults-service",
            service_url=service.url,
            token=token.stdout.strip(),
            local_mode=mode,
            publish_timeout=down + 120.0,
            **_settings(tmp / "work"),
        ) as wf:
            started = time.monotonic()
            futures = wf.map_kwargs(plus_one, _jobs(n, tally.runs_file, pause)).futures
            tally.watch(futures)
            arrived, killed, during, recover, last = 0, None, 0, None, started
            outage_thread = threading.Thread(target=outage, daemon=True)
            for _ in _collect(futures):
                arrived += 1
                last = time.monotonic()
                if killed is None and arrived == max(1, n // 10):
                    killed = last
                    outage_thread.start()
                elif killed is not None and not restarted:
                    during += 1
                elif restarted and recover is None:
                    recover = last - restarted[0]
            if killed is not None:
                outage_thread.join()
            row = tally.figures(futures, wf.stats)
    finally:
        service.stop()
    return {
        **row,
        "recover_s": recover,
        "to_end_s": last - (restarted[0] if restarted else started),
        "wall_s": last - started,
        "received_while_down": during,
    }


def doomed_caller(n: int, pause: float, tmp: Path) -> None:
    """The caller the caller scenario kills: prints its id, then a line per result."""
    with Workflow("faults-caller", **_settings(tmp / "work")) as wf:
        print("ID", wf.id, flush=True)
        futures = wf.map_kwargs(plus_one, _jobs(n, tmp / "runs", pause)).futures
        for _ in _collect(futures):
            print("GOT", flush=True)


def run_caller(n: int, pause: float, tmp: Path) -> dict[str, Any]:
    """SIGKILL a caller after a tenth of its results; ``Workflow.attach`` collects them all."""
    argv = [sys.executable, __file__, "--doomed-caller", f"--caller-jobs={n}", f"--pause={pause}"]
    argv.append(f"--tmp={tmp}")
    with open(tmp / "caller.err", "wb") as err:
        caller = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        first = caller.stdout.readline()
        assert first.startswith("ID "), (tmp / "caller.err").read_text()[-2000:]
        got = 0
        while got < max(1, n // 10):
            line = caller.stdout.readline()
            assert line, (tmp / "caller.err").read_text()[-2000:]
            got += line.startswith("GOT")
        caller.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        caller.wait(30)
    tally = Tally(n, tmp / "runs")
    with Workflow.attach(first.split()[1], work_dir=tmp / "work") as wf:
        recover = time.monotonic() - killed
        futures = [f for task in wf.tasks.values() for f in task.futures]
        tally.watch(futures)
        last = time.monotonic()
        for _ in _collect(futures):
            last = time.monotonic()
        row = tally.figures(futures, wf.stats)
    return {**row, "received_before_kill": got, "recover_s": recover, "to_end_s": last - killed}


def run_scale(n: int, tmp: Path) -> dict[str, Any]:
    """A map of ``n`` trivial jobs on local warm workers, no fault."""
    tally = Tally(n, tmp / "runs")
    with Workflow("faults-scale", **_settings(tmp / "work")) as wf:
        started = time.monotonic()
        futures = wf.map_kwargs(plus_one, _jobs(n, tally.runs_file, 0.0)).futures
        tally.watch(futures)
        for _ in _collect(futures):
            pass
        wall = time.monotonic() - started
        row = tally.figures(futures, wf.stats)
        closing = time.monotonic()
    return {**row, "wall_s": wall, "close_s": time.monotonic() - closing}


# --- the driver: each scenario in a fresh process, the table -------------------------


def _scenario_argv(name: str, args: argparse.Namespace) -> list[str]:
    keep = ("broker_jobs", "service_jobs", "service_down", "service_mode", "caller_jobs")
    argv = [sys.executable, __file__, f"--scenario={name}", f"--pause={args.pause}"]
    argv += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (*keep, "scale_jobs")]
    return argv


def _run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    done = subprocess.run(_scenario_argv(name, args), capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(
            f"scenario {name} failed (status {done.returncode}):\n{done.stderr[-4000:]}"
        )
    row = json.loads(lines[-1][len("RESULT ") :])
    row["process_s"] = time.monotonic() - began
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _spread(values: list[Any]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return _fmt(low) if low == high else f"{_fmt(low)}-{_fmt(high)}"


def print_table(rows: dict[str, list[dict[str, Any]]]) -> None:
    """Print one line per run of each scenario, then each scenario's spread."""
    extra = ("recover_s", "to_end_s", "wall_s", "rss_mb")
    header = ("scenario", "run", *COLUMNS, "recover s", "to end s", "wall s", "peak RSS MB")
    widths = (9, 6, 8, 8, 5, 7, 6, 6, 8, 9, 8, 7, 11)
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for name, runs in rows.items():
        for i, row in enumerate([*runs, None]):
            if row is None:
                cells = [_spread([r.get(k) for r in runs]) for k in (*COLUMNS, *extra)]
                label = "spread"
            else:
                cells = [_fmt(row.get(k)) for k in (*COLUMNS, *extra)]
                label = str(i + 1)
            values = (name, label, *cells)
            print("  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True)))
        for i, row in enumerate(runs):
            keys = ("channels", "received_while_down", "received_before_kill", "close_s")
            keys += ("process_s",)
            notes = {k: row[k] for k in keys if k in row}
            for key in ("errors", "rerun_pids"):
                if row.get(key):
                    notes[key] = row[key]
            print(f"  run {i + 1}: {json.dumps(notes)}")


def main(argv: list[str] | None = None) -> None:
    """Run the scenarios ``--runs`` times and print the table (or run one scenario)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--broker-jobs", type=int, default=400)
    parser.add_argument("--service-jobs", type=int, default=200)
    parser.add_argument("--service-down", type=float, default=40.0, help="seconds down")
    parser.add_argument("--service-mode", choices=("warm", "cold"), default="warm")
    parser.add_argument("--caller-jobs", type=int, default=200)
    parser.add_argument("--scale-jobs", type=int, default=10_000)
    parser.add_argument("--pause", type=float, default=0.01, help="seconds each fault job takes")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--doomed-caller", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.doomed_caller:
        doomed_caller(args.caller_jobs, args.pause, args.tmp)
        return
    if args.scenario:
        with tempfile.TemporaryDirectory(prefix=f"faults-{args.scenario}-") as tmp_dir:
            tmp = Path(tmp_dir)
            if args.scenario == "broker":
                row = run_broker(args.broker_jobs, args.pause, tmp)
            elif args.scenario == "service":
                row = run_service(
                    args.service_jobs, args.pause, args.service_down, args.service_mode, tmp
                )
            elif args.scenario == "caller":
                row = run_caller(args.caller_jobs, args.pause, tmp)
            else:
                row = run_scale(args.scale_jobs, tmp)
        row["rss_mb"] = _peak_rss_mb()
        print("RESULT", json.dumps(row), flush=True)
        return

    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    print(
        f"faults on {platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"broker {args.broker_jobs} jobs, service {args.service_jobs} jobs "
        f"({args.service_mode}, down {args.service_down:g} s), caller {args.caller_jobs} jobs, "
        f"scale {args.scale_jobs} jobs; {args.runs} runs"
    )
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for _ in range(args.runs):
        for name in chosen:
            rows[name].append(_run_one(name, args))
    print_table(rows)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
