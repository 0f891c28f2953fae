"""Hyper-parameter search as a graph of jobs: each round's suggestions depend on the last.

The loop of ``hpo_bayes.py`` waits for every round before it asks for the next
one. Here the caller never waits: each suggestion is itself a job that takes
the futures of every earlier (point, score) pair as its argument, so round
n + 1 is submitted at once and starts as soon as round n is done. The whole
search (``--iterations`` rounds of ``--points`` suggestions and evaluations)
is submitted in one go, then the caller waits for the best point only:

    history = []                                     # (point, score) futures
    for i in range(iterations):
        points = [suggest.submit(history, ...) for _ in range(n)]   # wait for history
        scores = [objective.submit(p) for p in points]              # wait for their point
        history += zip(points, scores)

The objective is a cheap stand-in for a training run (a smooth bowl whose top
is at x = 1, y = -2) and the optimiser a shrinking random search around the
best point so far, so the example needs the standard library only. Both run
as jobs; the same code runs in-process outside a workflow (``--in-process``),
which is how the tests check that the graph computed exactly what plain
Python computes.

Run it from the repository root:

    python examples/hpo_graph.py [--iterations 5] [--points 8] [--backend local] [--seed 1]
"""

import argparse
import json
import random
from pathlib import Path

from idds_fat import work, workflow

EXAMPLES_DIR = Path(__file__).resolve().parent


@work
def objective(point):
    """Score one point (higher is better): stands in for training and validating a model."""
    return -((point["x"] - 1.0) ** 2) - (point["y"] + 2.0) ** 2


@work
def suggest(history, seed, width):
    """Return a point near the best of ``history``, a list of (point, score) pairs."""
    rng = random.Random(seed)
    centre = max(history, key=lambda pair: pair[1])[0] if history else {"x": 0.0, "y": 0.0}
    return {name: value + rng.gauss(0.0, width) for name, value in centre.items()}


def search(iterations, points, seed):
    """Submit every round at once; return the best (point, score) and each round's best."""
    history = []
    for i in range(iterations):
        width = 2.0 * 0.6**i  # look closer each round
        batch = [
            suggest.submit(list(history), seed * 10_000 + i * points + j, width)
            for j in range(points)
        ]
        scores = [objective.submit(p) for p in batch]
        history += zip(batch, scores, strict=True)
    pairs = [(p.result(), s.result()) for p, s in history]
    rounds = [max(s for _, s in pairs[i * points : (i + 1) * points]) for i in range(iterations)]
    point, score = max(pairs, key=lambda pair: pair[1])
    return {"point": point, "score": score, "round_best": rounds, "jobs": 2 * len(pairs)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--points", type=int, default=8, help="suggestions per round (default 8)")
    parser.add_argument("--backend", default=None, help="local (default), slurm or panda")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-process", action="store_true", help="run without a workflow")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args = parser.parse_args()

    run = (
        search
        if args.in_process
        else workflow(backend=args.backend, source_dir=EXAMPLES_DIR)(search)
    )
    outcome = run(args.iterations, args.points, args.seed)
    if args.json:
        print(json.dumps(outcome))
        return
    for i, best in enumerate(outcome["round_best"], 1):
        print(f"round {i}: best {best:.4f}")
    point = ", ".join(f"{k}={v:.3f}" for k, v in outcome["point"].items())
    print(f"best score {outcome['score']:.4f} at {point} ({outcome['jobs']} jobs)")


if __name__ == "__main__":
    main()
