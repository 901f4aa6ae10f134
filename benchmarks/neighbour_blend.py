"""Would the neighbours' dates improve the served year? Measured on a registered model's grouped hold-out.

The served year already blends the regression head with the ruler mixture (`ModelConfig.ruler_blend`). This
scores the grouped hold-out coins of a `make demo` model (the split its training run used) as served, then mixes
in the similarity-weighted mean catalogue year of their k nearest reference coins (the flag's cosine distance on
the served features, the coins `params.neighbours` returns), each coin without the reference coins of its own
type (the hold-out coins are in the served reference: as a coin of an unseen type would be).

The blend weight and k are never chosen on the coins they are scored on: the hold-out's coin types are split in
two halves at random, (k, weight) is picked on one half and scored on the other, both ways, and that is repeated
for 20 random splits (the mean and spread of the cross-fitted MAE are reported). The fixed 50/50 blend with k = 10
is reported too.

    .venv/bin/python benchmarks/neighbour_blend.py --home /tmp/demo-home     # a `make demo` COINYEAR_HOME

Writes benchmarks/results/neighbour_blend/<name>.{json,md}. About a minute on 2 idle cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from coinyear.evaluate import regression_metrics

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import DATA_DIR, results_parser, write_results
from photo_shift import production_holdout  # a sibling benchmark script

KS = (3, 5, 10, 20)
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def neighbour_estimates(features, reference, groups, reference_groups, midpoints) -> dict[int, np.ndarray]:
    """For each k in KS, the similarity-weighted mean midpoint of the k nearest reference coins of other types."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    similarity = unit @ ref.T
    similarity[groups[:, None] == reference_groups[None, :]] = -np.inf
    order = np.argsort(-similarity, axis=1)
    estimates = {}
    for k in KS:
        nearest = order[:, :k]
        weights = np.maximum(np.take_along_axis(similarity, nearest, axis=1), 1e-6)
        estimates[k] = (weights * midpoints[nearest]).sum(axis=1) / weights.sum(axis=1)
    return estimates


def cross_fitted(served, estimates, year_from, year_to, groups, repeats: int = 20, seed: int = 0):
    """Cross-fitted MAE of the blend over `repeats` random halvings of the coin types, and the picks made."""
    types = np.unique(groups)
    rng = np.random.default_rng(seed)
    maes, picks = [], []
    for _ in range(repeats):
        half = np.isin(groups, rng.permutation(types)[: len(types) // 2])
        blended = np.empty(len(served))
        for fit, test in ((half, ~half), (~half, half)):
            k, weight = min(((k, w) for k in KS for w in WEIGHTS), key=lambda kw: regression_metrics(
                ((1 - kw[1]) * served + kw[1] * estimates[kw[0]])[fit], year_from[fit], year_to[fit])["mae"])
            blended[test] = ((1 - weight) * served + weight * estimates[k])[test]
            picks.append((k, weight))
        maes.append(regression_metrics(blended, year_from, year_to)["mae"])
    return np.array(maes), picks


def main(argv=None) -> int:
    parser = results_parser(__doc__, "neighbour_blend")
    parser.add_argument("--home", type=Path, required=True, help="a COINYEAR_HOME with a production model")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model, version, (fronts, backs, year_from, year_to), (groups, reference_groups) = \
        production_holdout(args.home, args.data)
    scored = model.score_tensors(fronts, backs, True)
    table = model.references.table
    midpoints = (table["year_from"].to_numpy(float) + table["year_to"].to_numpy(float)) / 2
    estimates = neighbour_estimates(scored["features"], model.quality.ood.reference, groups, reference_groups,
                                    midpoints)
    served = scored["year"]
    rows = {"served year (regression + ruler)": regression_metrics(served, year_from, year_to),
            "neighbours alone (k = 10)": regression_metrics(estimates[10], year_from, year_to),
            "served + neighbours 50/50 (k = 10)": regression_metrics((served + estimates[10]) / 2, year_from, year_to)}
    maes, picks = cross_fitted(served, estimates, year_from, year_to, groups)
    report = {"name": args.name, "home": str(args.home), "version": version, "coins": len(served),
              "metrics": rows, "cross_fitted_mae_mean": float(maes.mean()), "cross_fitted_mae_std": float(maes.std()),
              "picks": [list(p) for p in picks]}
    lines = [f"## {args.name}: coinyear version {version} of {args.home}, {len(served)} grouped hold-out coins", "",
             "| estimate | MAE | within ±10 y | R² |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['mae']:.2f} | {100 * m['within_10y']:.1f}% | {m['r2']:.3f} |" for name, m in rows.items()]
    lines += [f"| served + neighbours, k and weight cross-fitted on the other half of the types (20 splits) | "
              f"{maes.mean():.2f} ± {maes.std():.2f} | | |"]
    write_results(args.out, args.name, report, lines, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
