"""Issue 7's benchmarks, side by side with the peers, in one run: tables, ratios and JSON.

    .venv/bin/python benchmarks/run_all.py [all | MEASURE ...]
        [--quick] [--systems idds-warm,idds-cold,ppe,dask,parsl] [--calls 200] [--jobs 1000]
        [--scale-sizes 2500,5000,10000] [--json-dir benchmarks/results]

MEASURE is one or more of round-trip, throughput, cold-floor, scale, context;
``all`` (the default) runs them all, in this order:

1. round trip of one trivial call, p50/p99 over ``--calls`` sequential calls;
2. throughput of a ``--jobs``-job map of a trivial function and of a 10 ms sleep
   (1 and 2 share one process per system: idds-fat warm and cold,
   ``ProcessPoolExecutor``, Dask ``LocalCluster``, Parsl HTEX);
3. the cold job floor: idds-fat cold per job / ``python -c "import cloudpickle"``;
4. scale: caller RSS growth and wall time of maps of ``--scale-sizes`` jobs;
5. context: zip + hash of a 50 MB tree of 5,000 files, and the bytes a second
   submission of the unchanged tree uploads.

The peers come with the ``bench`` extra (``pip install -e '.[bench]'``, or
``make bench``). ``--quick`` shrinks every size for a smoke run of under a minute.
A full run takes about 5 minutes with warm workers (20 if the scale maps run cold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from measures import cold_floor, context, scale, systems
from measures.report import write_json
from peers import PEER_MODULES, SYSTEM_KEYS, missing_peers, warm_available

MEASURES = ("round-trip", "throughput", "cold-floor", "scale", "context")
FULL = {
    "calls": 200,
    "warmup": 10,
    "jobs": 1000,
    "scale_sizes": "2500,5000,10000",
    "context_files": 5000,
    "context_mb": 50.0,
    "context_runs": 3,
    "floor_runs": 20,
}
QUICK = {
    "calls": 20,
    "warmup": 3,
    "jobs": 40,
    "scale_sizes": "50,100,200",
    "context_files": 200,
    "context_mb": 2.0,
    "context_runs": 1,
    "floor_runs": 5,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "measures", nargs="*", default="all", choices=("all", *MEASURES), metavar="MEASURE"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEM_KEYS),
        help=f"comma-separated, from {','.join(SYSTEM_KEYS)}",
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out the peers whose package is missing instead of stopping",
    )
    parser.add_argument("--workers", type=int, default=2, help="jobs at once, every system")
    parser.add_argument("--calls", type=int, help="round trips measured (200)")
    parser.add_argument("--warmup", type=int, help="round trips not counted (10)")
    parser.add_argument("--jobs", type=int, help="jobs of each throughput map (1000)")
    parser.add_argument("--scale-sizes", help="comma-separated map sizes (2500,5000,10000)")
    parser.add_argument("--context-files", type=int, help="files in the context tree (5000)")
    parser.add_argument("--context-mb", type=float, help="MB in the context tree (50)")
    parser.add_argument("--context-runs", type=int, help="archive builds timed (3)")
    parser.add_argument("--floor-runs", type=int, help="interpreter starts timed (20)")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run idds-fat's processes under py-spy, stacks and summaries in DIR "
        "(slows them: not for the tables)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument(
        "--json-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where NAME.json files go (benchmarks/results)",
    )
    return parser


def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_all.py _system|_scale")
    parser.add_argument("command", choices=("_system", "_scale"))
    parser.add_argument("target")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--parts", default=",".join(systems.PARTS))
    parser.add_argument("--mode", default="warm")
    return parser


def _child(argv: list[str]) -> None:
    """Run one system's measurement or one scale size; print its JSON as the last line."""
    args = _child_parser().parse_args(argv)
    if args.command == "_system":
        result: dict[str, Any] = systems.measure_system(
            args.target,
            args.workers,
            args.calls,
            args.warmup,
            args.jobs,
            tuple(args.parts.split(",")),
        )
    else:
        result = scale.measure_scale(int(args.target), args.workers, args.mode)
    print(json.dumps(result), flush=True)


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    return {
        name: getattr(args, name) if getattr(args, name) is not None else default
        for name, default in base.items()
    }


def _system_keys(args: argparse.Namespace) -> list[str]:
    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SYSTEM_KEYS]
    if unknown:
        sys.exit(f"unknown systems {unknown}; known: {', '.join(SYSTEM_KEYS)}")
    missing = missing_peers(keys)
    if missing:
        packages = ", ".join(PEER_MODULES[k] for k in missing)
        if not args.skip_missing:
            sys.exit(
                f"the bench extra is missing ({packages} not installed): run "
                "`pip install -e '.[bench]'` (or `make bench`), or leave those peers out "
                "with --skip-missing"
            )
        print(f"skipping {', '.join(missing)}: {packages} not installed", file=sys.stderr)
        keys = [k for k in keys if k not in missing]
    if "idds-warm" in keys and not warm_available():
        print("warm: not available (this idds-fat has no local_mode setting); idds-fat runs cold")
        keys.remove("idds-warm")
    return keys


def main(argv: list[str] | None = None) -> None:
    """Run the measures asked for; print each table and write its JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_system", "_scale"):
        _child(argv)
        return
    args = _parser().parse_args(argv)
    sizes = _sizes(args)
    asked = [args.measures] if isinstance(args.measures, str) else args.measures
    wanted = MEASURES if "all" in asked else tuple(m for m in MEASURES if m in asked)
    outputs: list[Path] = []

    def measure(keys: list[str], parts: tuple[str, ...]) -> list[dict[str, Any]]:
        return systems.run_systems(
            keys,
            args.workers,
            sizes["calls"],
            sizes["warmup"],
            sizes["jobs"],
            parts,
            args.timeout,
            args.profile,
        )

    parts = tuple(p for p in systems.PARTS if p in wanted)
    # Only the side-by-side measures need the peers (and so the bench extra).
    system_results = measure(_system_keys(args), parts) if parts else []
    if "round-trip" in wanted:
        print(systems.round_trip_report(system_results), end="\n\n")
        outputs.append(write_json(args.json_dir, "round_trip", {"systems": system_results}))
    if "throughput" in wanted:
        print(systems.throughput_report(system_results), end="\n\n")
        outputs.append(write_json(args.json_dir, "throughput", {"systems": system_results}))
    if "cold-floor" in wanted:
        cold = next(
            (
                r
                for r in system_results
                if r["key"] == "idds-cold" and "round_trip" in r and "throughput" in r
            ),
            None,
        )
        if cold is None:  # the floor needs both figures of idds-fat cold
            cold = measure(["idds-cold"], systems.PARTS)[0]
        figures = cold_floor.cold_floor(cold_floor.measure_floors(sizes["floor_runs"]), cold)
        print(cold_floor.cold_floor_report(figures), end="\n\n")
        outputs.append(write_json(args.json_dir, "cold_floor", figures))
    if "scale" in wanted:
        scale_sizes = [int(s) for s in str(sizes["scale_sizes"]).split(",") if s.strip()]
        figures = scale.run_scale(scale_sizes, args.workers, args.timeout, args.profile)
        print(scale.scale_report(figures), end="\n\n")
        outputs.append(write_json(args.json_dir, "scale", figures))
    if "context" in wanted:
        figures = context.measure_context(
            sizes["context_files"], sizes["context_mb"], sizes["context_runs"], args.workers
        )
        print(context.context_report(figures), end="\n\n")
        outputs.append(write_json(args.json_dir, "context", figures))
    print("JSON: " + ", ".join(str(p) for p in outputs))


if __name__ == "__main__":
    main()
