"""Issue 18, item 3: big maps and many tasks on ``local``, and how responsive status stays.

    .venv/bin/python benchmarks/scale.py [--sizes 1000,10000,100000] [--tasks 1000]
        [--task-jobs 100] [--workers 2] [--probe-interval 0.25] [--status-interval 2]
        [--json-dir benchmarks/results] [--no-probes]

Runs, each in a fresh caller process (so its peak RSS is that run's alone),
on the ``local`` backend with warm workers, trivial jobs and ``source_dir=False``:

- one map of N jobs (one task) for each N of ``--sizes``;
- ``--tasks`` maps of ``--task-jobs`` jobs each, all submitted before any is
  waited on, then waited.

For each: wall time from the first submit to the last value (and the submit
part of it), jobs/s, the caller's CPU, its RSS before the run, its peak RSS
(``getrusage``) and the growth, and its RSS sampled every second (``psutil``)
to show the shape. Meanwhile this process probes what a user watching would
use: the monitoring page (``GET /workflows/{id}``) and its JSON
(``GET /api/workflows/{id}``, with the workflow's token), in turn every
``--probe-interval`` s over one kept connection as a browser would, and
``idds-fat status WORKFLOW`` and ``idds-fat status`` run as subprocesses every
``--status-interval`` s; it reports their p50/p95/max, and the same probes on
the idle workflow before the run as the floor. The probes take CPU from the
run they watch (a CLI start is about 0.3 s of CPU): ``--no-probes`` measures
without them.

The caller hands its service's address and token to this process over a pipe,
never on a command line.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from measures.report import current_rss_mb, machine, peak_rss_mb, quantile, table, write_json

BENCH_DIR = Path(__file__).resolve().parent
CLI = Path(sys.executable).with_name("idds-fat")
RSS_GOAL_MB = 600.0
"""Issue 18: the caller's memory under 600 MB at 100,000 jobs."""
IDLE_PROBES = 8
CHILD_TIMEOUT = 1800.0


# ---------------------------------------------------------------- the caller (child)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(kind: str, jobs: int, tasks: int, workers: int) -> None:
    """Be the caller: start a workflow, hand over its address, run when told, print figures."""
    import cloudpickle
    import peers.tasks
    from peers.tasks import trivial

    from idds_fat import Workflow, work

    cloudpickle.register_pickle_by_value(peers.tasks)
    fn = work(trivial)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work_dir = Path(tmp)
        with Workflow(
            "scale",
            work_dir=work_dir,
            backend="local",
            local_mode="warm",
            max_workers=workers,
            progress=False,
            source_dir=False,
        ) as wf:
            if fn.submit(0).result() != 0:
                raise AssertionError("the warm-up call returned a wrong value")
            gc.collect()
            baseline = current_rss_mb()
            hello = {
                "service_url": wf.service_url,
                "token": wf.parts.token,
                "workflow": wf.id,
                "work_dir": str(work_dir),
                "pid": os.getpid(),
            }
            print(json.dumps(hello), flush=True)
            sys.stdin.readline()  # the probes are up and have measured the idle floor
            cpu0 = _cpu_s()
            start = time.perf_counter()
            if kind == "map":
                results = [fn.map([{"x": x} for x in range(jobs)])]
            else:
                results = [fn.map([{"x": t * jobs + x} for x in range(jobs)]) for t in range(tasks)]
            submitted = time.perf_counter() - start
            for t, result in enumerate(results):
                base = t * jobs if kind == "tasks" else 0
                if result.results() != list(range(base, base + jobs)):
                    raise AssertionError(f"task {t} returned wrong values")
            wall = time.perf_counter() - start
            figures = {
                "kind": kind,
                "jobs": jobs * (tasks if kind == "tasks" else 1),
                "tasks": tasks if kind == "tasks" else 1,
                "workers": workers,
                "wall_s": wall,
                "submit_s": submitted,
                "caller_cpu_s": _cpu_s() - cpu0,
                "baseline_rss_mb": baseline,
                "peak_rss_mb": peak_rss_mb(),
                "rss_after_mb": current_rss_mb(),
            }
            del results
            print(json.dumps(figures), flush=True)
            sys.stdin.readline()  # the probes have stopped: the record may go


# ---------------------------------------------------------------- the probes (parent)


class Probes:
    """Watch a running workflow as a user would, from threads; keep each probe's time."""

    def __init__(self, hello: dict[str, Any], interval: float, status_interval: float) -> None:
        self.url = urllib.parse.urlsplit(hello["service_url"])
        self.token: str = hello["token"]
        self.workflow: str = hello["workflow"]
        self.work_dir: str = hello["work_dir"]
        self.interval = interval
        self.status_interval = status_interval
        self.times: dict[str, list[float]] = {
            "page": [],
            "api": [],
            "status WF": [],
            "status": [],
        }
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connection: http.client.HTTPConnection | None = None

    def _get(self, path: str, auth: bool) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        reused = self._connection is not None
        if self._connection is None:
            self._connection = http.client.HTTPConnection(
                self.url.hostname, self.url.port, timeout=60
            )
        try:
            self._connection.request("GET", path, headers=headers)
            response = self._connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self._connection.close()
            self._connection = None
            if not reused:
                raise
            # The server closed the kept connection while it sat idle (its keep-alive
            # timeout): open a new one, as a browser does.
            return self._get(path, auth)
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
        if auth:
            json.loads(body)

    def http_once(self, which: str) -> float:
        """GET the page (``page``) or the workflow's JSON (``api``); return the seconds."""
        quoted = urllib.parse.quote(self.workflow, safe="")
        path = f"/workflows/{quoted}" if which == "page" else f"/api/workflows/{quoted}"
        start = time.perf_counter()
        self._get(path, auth=which == "api")
        return time.perf_counter() - start

    def status_once(self, which: str) -> float:
        """Run ``idds-fat status [WORKFLOW]``; return the seconds it took."""
        argv = [str(CLI), "status", "--work-dir", self.work_dir]
        if which == "status WF":
            argv.insert(2, self.workflow)
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        took = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:3])}: exit {done.returncode}: {done.stderr}")
        return took

    def idle(self) -> dict[str, list[float]]:
        """Probe each way ``IDLE_PROBES`` times on the idle workflow; return the times."""
        floor: dict[str, list[float]] = {}
        for which in ("page", "api"):
            floor[which] = [self.http_once(which) for _ in range(IDLE_PROBES)]
        for which in ("status WF", "status"):
            floor[which] = [self.status_once(which) for _ in range(IDLE_PROBES // 2)]
        return floor

    def _loop(self, probe: Callable[[str], float], kinds: tuple[str, ...], every: float) -> None:
        turn = 0
        while not self._stop.is_set():
            which = kinds[turn % len(kinds)]
            turn += 1
            try:
                self.times[which].append(probe(which))
            except Exception as exc:  # noqa: BLE001 -- reported after the run
                self.failures.append(f"{which}: {exc!r}")
            self._stop.wait(every)

    def start(self) -> None:
        """Start the HTTP and CLI probe threads."""
        self._threads = [
            threading.Thread(
                target=self._loop, args=(self.http_once, ("page", "api"), self.interval)
            ),
            threading.Thread(
                target=self._loop,
                args=(self.status_once, ("status WF", "status"), self.status_interval),
            ),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the probes (a CLI run under way finishes first)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self._connection is not None:
            self._connection.close()


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": quantile(values, 0.5) * 1e3,
        "p95_ms": quantile(values, 0.95) * 1e3,
        "max_ms": max(values) * 1e3,
    }


def _sample_rss(pid: int, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    import psutil

    process = psutil.Process(pid)
    start = time.perf_counter()
    while not stop.wait(1.0):
        try:
            out.append((time.perf_counter() - start, process.memory_info().rss / 2**20))
        except psutil.Error:
            return


def run_one(
    kind: str, jobs: int, tasks: int, args: argparse.Namespace
) -> dict[str, Any]:  # pragma: no cover - a benchmark
    """Run one caller process and probe it; return its figures and the probes'."""
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_run",
        kind,
        str(jobs),
        str(tasks),
        str(args.workers),
    ]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the caller exited before starting (exit {child.wait()})")
        hello = json.loads(line)
        probes = Probes(hello, args.probe_interval, args.status_interval)
        floor = probes.idle() if not args.no_probes else {}
        rss: list[tuple[float, float]] = []
        sampling = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(hello["pid"], sampling, rss))
        sampler.start()
        if not args.no_probes:
            probes.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        probes.stop()
        sampling.set()
        sampler.join()
        child.stdin.write("close\n")
        child.stdin.flush()
        if not line:
            raise RuntimeError(f"the caller failed (exit {child.wait()})")
        figures: dict[str, Any] = json.loads(line)
        if child.wait(timeout=CHILD_TIMEOUT) != 0:
            raise RuntimeError(f"the caller exited {child.returncode}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    figures["jobs_per_s"] = figures["jobs"] / figures["wall_s"]
    figures["growth_mb"] = figures["peak_rss_mb"] - figures["baseline_rss_mb"]
    figures["rss_samples_mb"] = [(round(t, 1), round(m, 1)) for t, m in rss]
    figures["idle"] = {k: _summary(v) for k, v in floor.items()}
    figures["during"] = {k: _summary(v) for k, v in probes.times.items()}
    figures["probe_failures"] = probes.failures
    return figures


def report(runs: list[dict[str, Any]]) -> str:
    """Return the run table, the linearity line and the probe table."""
    label = {True: "{tasks} x {per}", False: "1 x {jobs}"}
    rows = []
    for r in runs:
        name = label[r["kind"] == "tasks"].format(
            tasks=r["tasks"], per=r["jobs"] // r["tasks"], jobs=r["jobs"]
        )
        rows.append(
            (
                name,
                r["wall_s"],
                r["submit_s"],
                r["jobs_per_s"],
                r["caller_cpu_s"] / r["jobs"] * 1e3,
                r["baseline_rss_mb"],
                r["peak_rss_mb"],
                r["growth_mb"],
                r["growth_mb"] * 1024 / r["jobs"],
            )
        )
    lines = [
        table(
            [
                "tasks x jobs",
                "wall s",
                "submit s",
                "jobs/s",
                "caller CPU ms/job",
                "base RSS MB",
                "peak RSS MB",
                "growth MB",
                "KB/job",
            ],
            rows,
        )
    ]
    maps = sorted((r for r in runs if r["kind"] == "map"), key=lambda r: r["jobs"])
    if len(maps) >= 2:
        small, big = maps[0], maps[-1]
        lines.append(
            f"{big['jobs']} vs {small['jobs']} jobs ({big['jobs'] / small['jobs']:.0f}x): "
            f"wall {big['wall_s'] / small['wall_s']:.1f}x, jobs/s "
            f"{big['jobs_per_s'] / small['jobs_per_s']:.2f}x (linear: 1.00x)"
        )
    for r in runs:
        if r["jobs"] >= 100_000:
            verdict = "met" if r["peak_rss_mb"] < RSS_GOAL_MB else "missed"
            lines.append(
                f"caller peak RSS at {r['jobs']} jobs: {r['peak_rss_mb']:.0f} MB "
                f"(goal < {RSS_GOAL_MB:.0f} MB: {verdict})"
            )
    probe_rows = []
    for r in runs:
        name = f"{r['tasks']}x{r['jobs'] // r['tasks']}"
        for which, during in r["during"].items():
            idle = r["idle"].get(which, {"n": 0})
            if not during.get("n"):
                continue
            probe_rows.append(
                (
                    f"{name} {which}",
                    idle.get("p50_ms"),
                    during["n"],
                    during["p50_ms"],
                    during["p95_ms"],
                    during["max_ms"],
                )
            )
        for failure in r["probe_failures"][:3]:
            lines.append(f"  !! {name}: probe failed: {failure}")
    if probe_rows:
        lines.append("")
        lines.append("Response times (ms): idle p50 before the run, then during it")
        lines.append(
            table(["run probe", "idle p50", "n", "p50", "p95", "max"], probe_rows, first_width=22)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a benchmark
    """Parse the arguments; run the caller (``_run``) or the whole benchmark."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_run":
        kind, jobs, tasks, workers = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        _child(kind, jobs, tasks, workers)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="map sizes ('' for none)")
    parser.add_argument(
        "--tasks", type=int, default=1000, help="maps of the many-task run (0: none)"
    )
    parser.add_argument("--task-jobs", type=int, default=100, help="jobs of each of those maps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--probe-interval", type=float, default=0.25)
    parser.add_argument("--status-interval", type=float, default=2.0)
    parser.add_argument("--no-probes", action="store_true")
    parser.add_argument("--json-dir", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    plan = [("map", int(n), 1) for n in args.sizes.split(",") if n.strip()]
    if args.tasks:
        plan.append(("tasks", args.task_jobs, args.tasks))
    about = machine()
    print(f"load average at start: {about['load_average']}", flush=True)
    runs = []
    for kind, jobs, tasks in plan:
        print(f"  {kind}: {tasks} x {jobs} jobs ...", file=sys.stderr, flush=True)
        runs.append(run_one(kind, jobs, tasks, args))
        print(report(runs[-1:]), flush=True)
    print()
    print(report(runs))
    print(f"load average at end: {[round(x, 2) for x in os.getloadavg()]}")
    path = write_json(args.json_dir, "scale_issue18", {"at_start": about, "runs": runs})
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
