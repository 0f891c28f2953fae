"""Bayesian hyper-parameter optimisation with idds-fat (function as a task).

This is the HPO loop of the function-as-a-task paper (Listing 1): a plain
Python loop drives a Bayesian optimiser, and each iteration evaluates a batch
of suggested points as ONE task with one job per point, in parallel:

    for i in range(n_iterations):
        points = <20 suggestions>
        results = objective(multi_jobs_kwargs_list=points)   # 1 task, 20 jobs
        <register every result with the optimiser>

The objective is real: the 3-fold cross-validated accuracy of a scikit-learn
gradient-boosting classifier on the breast-cancer data set that ships with
scikit-learn (nothing is downloaded). One evaluation takes about 0.5 s, plus
about 0.5 s to start Python and import scikit-learn in the job's process.

What it shows:

* ``@work(map_results=True)`` turns a function into a task; calling it with
  ``multi_jobs_kwargs_list`` runs one job per kwargs dict, blocks until all of
  them are back, and ``results.get_result(args=point)`` looks a result up by
  its kwargs (not by arrival order).
* ``workflow(...)`` runs the driving loop; ``source_dir`` is this examples
  directory, which is all the jobs need.
* Batch suggestion: asking bayes_opt for 20 points without telling it about
  the pending ones can return the same point many times. The ConstantLiar
  acquisition registers a pessimistic "lie" for every pending point, so the
  20 points of a batch are distinct.

Run it from the repository root with ``make demo``, or:

    python examples/hpo_bayes.py [--iterations 10] [--points 20] [--backend local] [--seed 1]

It takes a few minutes on 2 cores with the defaults (200 evaluations).
"""

import argparse
import time
import warnings
from pathlib import Path

from bayes_opt import BayesianOptimization, acquisition

from idds_fat import work, workflow

EXAMPLES_DIR = Path(__file__).resolve().parent

# The search space. A third element `int` makes bayes_opt suggest integers
# (bayes_opt 3.4 warns that such parameters are experimental; they work here).
warnings.filterwarnings("ignore", message="Non-float parameters are experimental")
PBOUNDS = {
    "n_estimators": (20, 150, int),
    "max_depth": (1, 5, int),
    "learning_rate": (0.01, 0.5),
    "subsample": (0.5, 1.0),
}


@work(map_results=True)
def objective(n_estimators, max_depth, learning_rate, subsample):
    """Mean 3-fold cross-validated accuracy of gradient boosting (deterministic)."""
    # Imported here: the function runs in a fresh Python process on the node.
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    X, y = load_breast_cancer(return_X_y=True)
    model = GradientBoostingClassifier(
        n_estimators=int(n_estimators),
        max_depth=int(max_depth),
        learning_rate=learning_rate,
        subsample=subsample,
        random_state=0,
    )
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    return float(cross_val_score(model, X, y, cv=folds).mean())


def suggest_batch(optimizer, liar, n_points):
    """Return n_points distinct points to evaluate in parallel."""
    # Each suggest() adds the point to the liar's pending list, so the next
    # suggestion goes elsewhere. The first batch is random (nothing to model).
    # bayes_opt 3.4 only drops a pending point once an identical one is
    # registered, which never happens for points with int parameters, so we
    # forget the pending points ourselves once the batch has been registered.
    liar.dummies.clear()
    points = []
    for _ in range(n_points):
        point = optimizer.suggest()  # ints for int parameters, numpy floats for the others
        point = {k: round(float(v), 4) if isinstance(v, float) else v for k, v in point.items()}
        points.append(point)
    return points


def optimize(n_iterations=10, n_points=20, seed=1):
    """The workflow: n_iterations rounds of n_points parallel evaluations."""
    liar = acquisition.ConstantLiar(acquisition.UpperConfidenceBound(kappa=2.576), strategy="min")
    optimizer = BayesianOptimization(
        f=None,  # we evaluate the points ourselves, as idds-fat jobs
        pbounds=PBOUNDS,
        acquisition_function=liar,
        random_state=seed,
        verbose=0,
        allow_duplicate_points=True,
    )
    start = time.monotonic()
    print(f"{'iter':>4} {'best so far':>12} {'iter best':>10} {'elapsed':>8}", flush=True)
    for i in range(n_iterations):
        points = suggest_batch(optimizer, liar, n_points)
        results = objective(multi_jobs_kwargs_list=points)  # one task, n_points jobs
        scores = [results.get_result(args=p) for p in points]
        for point, score in zip(points, scores, strict=True):
            optimizer.register(params=point, target=score)
        best_so_far = optimizer.max["target"]
        elapsed = time.monotonic() - start
        print(f"{i + 1:>4} {best_so_far:>12.4f} {max(scores):>10.4f} {elapsed:>7.1f}s", flush=True)
    best = optimizer.max
    return {"score": float(best["target"]), "params": best["params"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10, help="rounds (default 10)")
    parser.add_argument("--points", type=int, default=20, help="points per round (default 20)")
    parser.add_argument(
        "--backend", default=None, help="local, slurm or panda (default: configuration, local)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the optimiser (default 1)")
    args = parser.parse_args()

    run = workflow(backend=args.backend, source_dir=EXAMPLES_DIR)(optimize)
    best = run(args.iterations, args.points, args.seed)

    print(f"\nbest cross-validated accuracy: {best['score']:.4f}")
    for name, value in best["params"].items():
        print(f"  {name} = {value:.4g}" if isinstance(value, float) else f"  {name} = {value}")


if __name__ == "__main__":
    main()
