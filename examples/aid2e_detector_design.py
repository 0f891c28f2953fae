"""AI-assisted detector design (AID2E) with idds-fat: asynchronous multi-objective search.

This is the AID2E loop of the function-as-a-task paper (section 3.2): an
optimiser proposes detector parameters, each design is evaluated by a detector
simulation running as a job, the objectives go back to the optimiser, and the
search ends with a Pareto front: the designs that no other design beats on
every objective at once.

Unlike the loop in the paper (and ``hpo_bayes.py``), which waits for a whole
batch before asking for the next one, this loop is asynchronous. It keeps
``--workers`` designs in flight, and as soon as ONE job finishes it tells the
optimiser (optuna's NSGA-II, through its ask/tell interface) that result and
asks for a new design to fill the free slot. Slow designs no longer hold back
fast ones, and no core idles at the end of a batch. idds-fat results are
``concurrent.futures.Future`` objects, so the loop is the standard library's
``wait(..., return_when=FIRST_COMPLETED)``. A design whose job raises is told
to the optimiser as failed, and the search goes on.

The detector is a toy barrel silicon tracker in a 1.7 T solenoid, covering
|eta| < 1, with its first layer at 3.6 cm (just outside the beam pipe). The
optimiser chooses four parameters:

* ``n_layers`` (3 to 8) and ``r_outer`` (20 to 80 cm, the lever arm);
* ``spacing``: the layers sit at ``r_in + (r_outer - r_in) * t**spacing`` for
  ``t`` evenly spaced in [0, 1], so below 1 they crowd outwards;
* ``thickness``: the material of one layer in radiation lengths (0.05 to 1 %).

The simulation (``evaluate``, one job per design) is a vectorised numpy Monte
Carlo with a fixed seed, so a design's score is deterministic and every design
sees the same tracks. Charged pions of p = 1, 2, 5 and 10 GeV at random angles
follow exact circles in the bending plane from layer to layer. At each layer
they scatter by the Highland angle for the layer's thickness along the track,
and their hit is smeared by 15 um in r-phi. A least-squares circle fit of the
hits, weighted with their covariance (smearing plus scattering), gives the
reconstructed pT. Without smearing or material the fit returns pT to 1e-8, and
the hit term matches Gluckstern's formula. The two objectives, both minimised:

* ``resolution``: sigma(pT)/pT in %, the mean over the four momenta;
* ``cost`` (arbitrary units): 0.2 per layer, plus sqrt(0.3 % / thickness) per
  m^2 of silicon, because lighter sensors and supports cost more.

How the simulation responds (``evaluate`` called directly, starting from 5
layers out to 50 cm, spacing 1 and 0.3 % X0, which gives 0.83 % at a cost of 8.3):

* lever arm: 30 / 50 / 80 cm give 1.92 / 0.83 / 0.43 %, at a cost of 3.7 / 8.3 / 19.3;
* material: 0.1 / 0.3 / 1 % X0 per layer give 0.61 / 0.83 / 1.33 %. Low
  momenta suffer most: at 1 GeV 0.36 -> 1.21 %, at 10 GeV only 1.08 -> 1.59 %;
* layers: 3 -> 8 layers always cost more (5.4 -> 12.8) and improve the
  resolution where the hit precision limits it (at 10 GeV on 0.05 % layers,
  1.19 -> 0.96 %). Each layer also adds material, though: at 0.3 % X0 and
  1 GeV the resolution gets worse, 0.55 -> 0.79 %. That is real tracker physics,
  and it is why most Pareto-optimal designs have few, thin layers.

One evaluation takes 0.2 to 0.7 s on one core (0.4 s median), plus about
0.1 s to start the job.

Run it from the repository root:

    python examples/aid2e_detector_design.py [--trials 60] [--workers 4] [--backend local]
                                             [--seed 1] [--plot aid2e_pareto.png]

With the defaults it takes about 20 s on 2 cores. It prints one line per
finished design, then the Pareto-optimal designs, and saves the Pareto plot.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time
from pathlib import Path
from typing import Any

import optuna

from idds_fat import work, workflow

EXAMPLES_DIR = Path(__file__).resolve().parent

# The search space, in the units the simulation takes (metres, fractions of X0).
N_LAYERS = (3, 8)
R_OUTER = (0.20, 0.80)
SPACING = (0.5, 2.0)
THICKNESS = (0.0005, 0.01)

# What the optimiser minimises, in this order.
OBJECTIVES = ("resolution", "cost")


# The detector that does not change: a solenoid field, a barrel covering
# |eta| < 1, a first layer just outside the beam pipe, 15 um hits.
B_FIELD = 1.7  # tesla
R_INNER = 0.036  # metres
ETA_MAX = 1.0
HIT_SIGMA = 15e-6  # metres, in r-phi
PION_MASS = 0.1396  # GeV
MOMENTA = (1.0, 2.0, 5.0, 10.0)  # GeV
SEED = 20240521  # of the simulation: every design sees the same tracks


def _propagate(radii, phi, turn, radius, kink_sigma, rng):
    """Follow tracks from the origin through the layers; return the smeared hits.

    Exact circles in the bending plane: a scattering kink at each layer, then
    on to where the new circle crosses the next layer. Returns two arrays of
    shape (layers, tracks): the measured x and y.
    """
    import numpy as np

    n = phi.size
    x, y = np.zeros(n), np.zeros(n)
    hits_x, hits_y = np.empty((len(radii), n)), np.empty((len(radii), n))
    for layer, r in enumerate(radii):
        cx = x - turn * radius * np.sin(phi)  # centre of the current circle
        cy = y + turn * radius * np.cos(phi)
        # The circle crosses the cylinder of radius r at two points, a +- h
        # along and across the line to the centre; the track reaches first the
        # one a shorter turn away.
        d = np.hypot(cx, cy)
        a = (r**2 - radius**2 + d**2) / (2 * d)
        # (Every track gets there: pT >= 0.65 GeV curls with a radius above 1.2 m.)
        h = np.sqrt(np.maximum(r**2 - a**2, 0.0))
        ux, uy = cx / d, cy / d
        start = np.arctan2(y - cy, x - cx)
        points = [(a * ux - s * h * uy, a * uy + s * h * ux) for s in (1.0, -1.0)]
        turns = [
            np.mod(turn * (np.arctan2(py - cy, px - cx) - start), 2 * np.pi) for px, py in points
        ]
        first = turns[0] <= turns[1]
        x = np.where(first, points[0][0], points[1][0])
        y = np.where(first, points[0][1], points[1][1])
        # The direction of motion there, deflected by the scattering in the layer.
        phi = np.arctan2(turn * (x - cx), -turn * (y - cy))
        phi = phi + kink_sigma * rng.standard_normal(n)
        smear = HIT_SIGMA * rng.standard_normal(n) / r  # the r-phi error, as an angle
        hits_x[layer] = x - smear * y
        hits_y[layer] = y + smear * x
    return hits_x, hits_y


def _fit_radius(hits_x, hits_y, radii, kink_sigma):
    """Least-squares circle fit of every track's hits; return the fitted radii.

    x^2 + y^2 + D x + E y + F = 0 is linear in (D, E, F), and its residual is
    2R times the hit's distance from the circle, so a linear fit will do. It is
    generalised least squares with the hits' covariance: the smearing, plus the
    scattering, which moves hit i by (r_i - r_k) * kink_k for every layer k
    before it, so the hits of a track are correlated (as in a Kalman filter).
    """
    import numpy as np

    # V = HIT_SIGMA^2 I + kink_sigma^2 G, where only kink_sigma depends on the
    # track: one eigen-decomposition of G whitens every track at once.
    lever = np.maximum(radii[:, None] - radii[None, :], 0.0)  # lever[i, k] = r_i - r_k, k < i
    eigenvalues, eigenvectors = np.linalg.eigh(lever @ lever.T)
    weight = 1.0 / (HIT_SIGMA**2 + np.outer(eigenvalues, kink_sigma**2))  # (modes, tracks)
    u = hits_x - hits_x.mean(axis=0)  # centred, for a well-conditioned solve
    v = hits_y - hits_y.mean(axis=0)
    columns = np.stack([u, v, np.ones_like(u), -(u**2 + v**2)])  # (4, layers, tracks)
    modes = np.einsum("lm,clt->cmt", eigenvectors, columns)  # (4, modes, tracks)
    moments = np.einsum("amt,bmt,mt->tab", modes, modes, weight)  # (tracks, 4, 4)
    d, e, f = np.linalg.solve(moments[:, :3, :3], moments[:, :3, 3:])[..., 0].T
    return np.sqrt(d**2 / 4 + e**2 / 4 - f)


@work
def evaluate(
    n_layers: int,
    r_outer: float,
    spacing: float,
    thickness: float,
    tracks_per_momentum: int = 80_000,
) -> dict[str, Any]:
    """Simulate one tracker design and return its objectives.

    Returns a dict with ``resolution`` (sigma(pT)/pT in %, the mean over the
    momenta), ``cost`` (arbitrary units), ``material`` (total x/X0 in % at
    normal incidence) and ``resolution_by_p`` ({p in GeV: sigma(pT)/pT in %}).

    Raises:
        ValueError: parameters that make no detector.
    """
    # Imported here: the function runs in a fresh Python process on the node.
    import numpy as np

    n_layers = int(n_layers)
    if n_layers < 3 or not R_INNER < r_outer <= 2.0 or not 0 < thickness < 0.1 or spacing <= 0:
        raise ValueError(
            f"no such tracker: {n_layers} layers, r_outer {r_outer:.3g} m, spacing {spacing:.3g}, "
            f"thickness {thickness:.3g} X0 (a circle needs 3 layers; r_outer in ({R_INNER}, 2] m)"
        )
    radii = R_INNER + (r_outer - R_INNER) * np.linspace(0.0, 1.0, n_layers) ** spacing

    # Charged pions of each momentum, at random angles within the acceptance.
    rng = np.random.default_rng(SEED)
    n = tracks_per_momentum * len(MOMENTA)
    p = np.repeat(MOMENTA, tracks_per_momentum)
    sin_theta = 1.0 / np.cosh(rng.uniform(-ETA_MAX, ETA_MAX, n))
    pt = p * sin_theta
    radius = pt / (0.3 * B_FIELD)  # metres, in the bending plane
    turn = rng.choice([-1.0, 1.0], n)  # the charge: +1 turns anticlockwise
    phi = rng.uniform(-np.pi, np.pi, n)
    # Highland, for the layer's thickness along the track; only its projection
    # on the bending plane changes the azimuth (by delta / sin theta).
    beta = p / np.hypot(p, PION_MASS)
    path = thickness / sin_theta
    theta0 = 0.0136 / (beta * p) * np.sqrt(path) * (1 + 0.038 * np.log(path / beta**2))
    kink_sigma = theta0 / sin_theta

    hits_x, hits_y = _propagate(radii, phi, turn, radius, kink_sigma, rng)
    fitted_pt = 0.3 * B_FIELD * _fit_radius(hits_x, hits_y, radii, kink_sigma)
    residual = (fitted_pt - pt) / pt
    by_p = {m: 100 * float(residual[p == m].std()) for m in MOMENTA}

    # Silicon area: each layer is a cylinder 2 r sinh(eta_max) long to cover
    # the acceptance, so area grows as r^2. Lighter layers cost more per m^2.
    area = 2 * np.pi * radii * (2 * radii * np.sinh(ETA_MAX))
    cost = 0.2 * n_layers + float(area.sum()) * np.sqrt(0.003 / thickness)
    return {
        "resolution": float(np.mean(list(by_p.values()))),
        "cost": float(cost),
        "material": 100 * float(thickness) * n_layers,
        "resolution_by_p": by_p,
    }


def _ask(study: optuna.Study) -> tuple[optuna.trial.Trial, dict[str, Any]]:
    """Ask the optimiser for one design; return the trial and its parameters."""
    trial = study.ask()
    design = {
        "n_layers": trial.suggest_int("n_layers", *N_LAYERS),
        "r_outer": trial.suggest_float("r_outer", *R_OUTER),
        "spacing": trial.suggest_float("spacing", *SPACING),
        "thickness": trial.suggest_float("thickness", *THICKNESS, log=True),
    }
    return trial, design


def _describe(design: dict[str, Any]) -> str:
    return (
        f"{design['n_layers']} layers to {100 * design['r_outer']:.0f} cm, "
        f"spacing {design['spacing']:.2f}, {100 * design['thickness']:.2f}% X0"
    )


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto-optimal trials, one per distinct design, cheapest first."""
    # NSGA-II's children sometimes copy a parent: show each design once.
    first = {}
    for trial in study.best_trials:
        first.setdefault(tuple(sorted(trial.params.items())), trial)
    return sorted(first.values(), key=lambda t: t.values[1])


def optimize(n_trials: int = 60, n_workers: int = 4, seed: int = 1) -> optuna.Study:
    """The workflow: evaluate n_trials designs, n_workers at a time, asynchronously.

    Returns the optuna study, whose ``best_trials`` are the Pareto-optimal designs.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A small population: 60 trials then make several generations, not one.
    sampler = optuna.samplers.NSGAIISampler(population_size=12, seed=seed)
    study = optuna.create_study(directions=["minimize"] * len(OBJECTIVES), sampler=sampler)
    start = time.monotonic()
    in_flight: dict[concurrent.futures.Future, tuple] = {}  # future -> (trial, design)
    seen: dict[tuple, tuple[int, dict[str, Any]]] = {}  # design -> (trial number, result)
    told = 0

    def tell(trial: optuna.trial.Trial, design: dict[str, Any], result, note: str = "") -> None:
        nonlocal told
        if isinstance(result, BaseException):
            # One broken design does not stop the search.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            outcome = f"FAILED: {type(result).__name__}: {result}"
        else:
            trial.set_user_attr("result", result)
            study.tell(trial, [result[name] for name in OBJECTIVES])
            seen.setdefault(tuple(sorted(design.items())), (trial.number, result))
            outcome = f"{result['resolution']:.2f}%, cost {result['cost']:.1f}{note}"
        told += 1
        front = pareto_front(study)
        best = f"{min(t.values[0] for t in front):.2f}%" if front else "-"
        print(
            f"{told:>5} {len(front):>5} {best:>8} {time.monotonic() - start:>7.1f}s   "
            f"#{trial.number} {_describe(design)} -> {outcome}",
            flush=True,
        )

    print(f"{'done':>5} {'front':>5} {'best res':>8} {'elapsed':>8}   finished design", flush=True)
    while told < n_trials:
        # Refill every free slot, then wait for the FIRST job to finish.
        while len(in_flight) < n_workers and told + len(in_flight) < n_trials:
            trial, design = _ask(study)
            key = tuple(sorted(design.items()))
            if key in seen:
                # The simulation is deterministic: a design seen before is
                # answered from memory, and its slot goes to a new one.
                number, result = seen[key]
                tell(trial, design, result, note=f" (repeat of #{number}, not re-run)")
            else:
                in_flight[evaluate.submit(**design)] = (trial, design)
        if not in_flight:
            continue
        finished, _ = concurrent.futures.wait(
            in_flight, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in finished:
            trial, design = in_flight.pop(future)
            error = future.exception()
            tell(trial, design, future.result() if error is None else error)
    return study


def print_front(study: optuna.Study) -> None:
    """Print the Pareto-optimal designs, cheapest first."""
    front = pareto_front(study)
    print(f"\nPareto-optimal designs: {len(front)} of {len(study.trials)} trials, cheapest first")
    print(
        f"{'trial':>5} {'layers':>6} {'r_outer':>8} {'spacing':>7} {'X0/layer':>8} "
        f"{'res':>6} {'@1GeV':>6} {'@10GeV':>6} {'cost':>6}"
    )
    for t in front:
        result = t.user_attrs["result"]
        by_p = result["resolution_by_p"]
        print(
            f"{t.number:>5} {t.params['n_layers']:>6} {100 * t.params['r_outer']:>6.1f}cm "
            f"{t.params['spacing']:>7.2f} {100 * t.params['thickness']:>7.3f}% "
            f"{result['resolution']:>5.2f}% {by_p[1.0]:>5.2f}% {by_p[10.0]:>5.2f}% "
            f"{result['cost']:>6.1f}"
        )


def plot_front(study: optuna.Study, path: str | Path) -> None:
    """Save resolution against cost for every design, the Pareto front highlighted."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    done = [t for t in study.trials if t.values]
    front = pareto_front(study)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter(
        [t.values[1] for t in done],
        [t.values[0] for t in done],
        s=16,
        c="0.75",
        label=f"all designs ({len(done)} trials)",
    )
    cost = [t.values[1] for t in front]
    resolution = [t.values[0] for t in front]
    ax.step(cost, resolution, where="post", c="tab:red", lw=1, alpha=0.5)
    # The colour says how thin the layers are, which is most of the cost.
    points = ax.scatter(
        cost,
        resolution,
        s=40,
        c=[100 * t.params["thickness"] for t in front],
        cmap="viridis",
        norm=LogNorm(100 * THICKNESS[0], 100 * THICKNESS[1]),
        edgecolors="tab:red",
        zorder=3,
        label=f"Pareto front ({len(front)} designs)",
    )
    bar = fig.colorbar(points, ax=ax, label="thickness per layer (% X0)")
    bar.set_ticks([0.05, 0.1, 0.2, 0.5, 1.0], labels=["0.05", "0.1", "0.2", "0.5", "1"])
    for t in front:
        ax.annotate(
            f"{t.params['n_layers']}L {100 * t.params['r_outer']:.0f}cm",
            (t.values[1], t.values[0]),
            textcoords="offset points",
            xytext=(5, 3),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200) if t <= 1.5 * max(cost)])
    ax.set_yticks([0.2, 0.3, 0.5, 1, 2, 3, 5, 10])
    ax.set_ylim(0.8 * min(t.values[0] for t in done), 1.25 * max(t.values[0] for t in done))
    ax.set_xlabel("cost (arbitrary units)")
    ax.set_ylabel("σ(pT)/pT, mean of 1, 2, 5, 10 GeV (%)")
    ax.set_title("Toy silicon tracker: NSGA-II over asynchronous idds-fat jobs", fontsize=11)
    ax.grid(which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60, help="designs to evaluate (default 60)")
    parser.add_argument(
        "--workers", type=int, default=4, help="designs evaluated at once (default 4)"
    )
    parser.add_argument(
        "--backend", default=None, help="local, slurm or panda (default: configuration, local)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the optimiser (default 1)")
    parser.add_argument(
        "--plot", default="aid2e_pareto.png", help="Pareto plot (default aid2e_pareto.png)"
    )
    args = parser.parse_args()

    run = workflow(backend=args.backend, source_dir=EXAMPLES_DIR, max_workers=args.workers)(
        optimize
    )
    study = run(args.trials, args.workers, args.seed)

    print_front(study)
    plot_front(study, args.plot)
    print(f"\nPareto plot: {args.plot}")


if __name__ == "__main__":
    main()
