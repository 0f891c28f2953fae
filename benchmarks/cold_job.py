"""A cold job's process alone, next to the ``import cloudpickle`` floor (issue 18, item 5).

``run_all.py cold-floor`` times whole round trips, the caller's side included.
This times only the process a cold ``local`` job runs, exactly as the backend
starts it (``wrapper_source.launch_command``, ``--spec`` and ``--reply-file``),
on the stored spec of one trivial call, next to ``python -c "import
cloudpickle"``: the runs interleaved, each process's wall time and CPU time
(user + system, from ``wait4``) as medians. CPU time moves less than wall time
when the machine is shared.

``--node NAME=DIR`` adds a wrapper built from another copy of ``idds_fat/node``
(a change's before and after, compared in the same run)::

    .venv/bin/python benchmarks/cold_job.py --runs 40 --node before=/tmp/node-before
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from idds_fat.node.spec import SECRETS_FILE_ENV
from idds_fat.wrapper_source import NODE_DIR, build_wrapper, launch_command


def trivial(x: int = 0) -> int:
    """Return ``x``: a job that does nothing."""
    return x


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Run ``argv``; return its wall and CPU seconds. Raises RuntimeError if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:2]}... exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(runs: int, nodes: dict[str, Path], root: Path) -> dict[str, dict[str, float]]:
    """Start a cold workflow in ``root``, run one call, then time its job's process ``runs``
    times per wrapper (and the floor), interleaved; return medians in ms per name."""
    import cloudpickle

    from idds_fat import Workflow, work

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    options = {"local_mode": "cold", "source_dir": False, "progress": False, "max_workers": 1}
    with Workflow("cold-job", work_dir=root / "work", backend="local", **options) as wf:
        if work(trivial)(7) != 7:
            raise RuntimeError("the trivial call did not return its argument")
        spec = wf.tracker.request("t0001/0").spec_location
        secrets = root / "secrets.json"
        secrets.write_text(json.dumps({"hmac_key": wf.parts.key.hex(), "token": wf.parts.token}))
        secrets.chmod(0o600)
        env = dict(os.environ, **{SECRETS_FILE_ENV: str(secrets)})
        jobdir = root / "job"
        jobdir.mkdir()
        commands = {"floor": [sys.executable, "-c", "import cloudpickle"]}
        for name, node_dir in nodes.items():
            data = build_wrapper(node_dir)
            where = root / name
            where.mkdir()
            path = where / f"wrapper_{hashlib.sha256(data).hexdigest()[:16]}.py"
            path.write_bytes(data)
            reply = ["--spec", spec, "--reply-file", str(jobdir / "result.reply")]
            commands[name] = [*launch_command(sys.executable, path), *reply]
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for argv in commands.values():
            timed(argv, env, jobdir)  # writes each wrapper's bytecode cache
        for _ in range(runs):
            for name, argv in commands.items():
                times[name].append(timed(argv, env, jobdir))
    return {
        name: {
            "wall_ms": statistics.median(w for w, _ in pairs) * 1e3,
            "cpu_ms": statistics.median(c for _, c in pairs) * 1e3,
        }
        for name, pairs in times.items()
    }


def report(figures: dict[str, dict[str, float]]) -> str:
    """Return the table: each process's medians and their ratio to the floor's."""
    floor = figures["floor"]
    lines = [f"{'process':30} {'wall ms':>8} {'x floor':>8} {'CPU ms':>8} {'x floor':>8}"]
    for name, row in figures.items():
        label = 'python -c "import cloudpickle"' if name == "floor" else f"cold job ({name})"
        lines.append(
            f"{label:30} {row['wall_ms']:8.1f} {row['wall_ms'] / floor['wall_ms']:8.3f} "
            f"{row['cpu_ms']:8.1f} {row['cpu_ms'] / floor['cpu_ms']:8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and the load average."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each process (30)")
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also time a wrapper built from this copy of idds_fat/node",
    )
    args = parser.parse_args(argv)
    nodes = {"this tree": NODE_DIR}
    for item in args.node:
        name, _, directory = item.partition("=")
        nodes[name] = Path(directory)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cold-job-") as root:
        figures = measure(args.runs, nodes, Path(root))
    print(report(figures))
    print(
        f"medians of {args.runs} interleaved runs; load average {load[0]:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
