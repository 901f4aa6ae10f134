"""The registered model's report on the validation coin types of its own training run: what a recipe choice is
made on, never the test types.

A hold-out run (`coinyear demo`, `coinyear train` without folds) trains on one grouped split of the non-test
coins and early-stops, fits its levers and calibrates its range on the other part, the validation types
(`data.choice_splits` with the run's seed). This script draws the same split and scores those coins with the
production model through the served path (`evaluate.score_table`): portrait top-1 and top-3, MAE, ±10 years.
The portrait's top-1 does not depend on the fitted temperature, so it is a fair figure on these coins; the
range's coverage is not (it was calibrated on them) and the MAE is slightly flattered by the levers.

    COINYEAR_HOME=/tmp/ob-42 COINYEAR_SEED=42 python benchmarks/validation_types.py --name obverse-seed42

About a minute on 2 cores (one pass over the ~360 validation coins).
"""

from __future__ import annotations

from coinyear import evaluate
from coinyear.data import choice_splits, read_manifest
from coinyear.recipe import TrainConfig

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import model_run, write_results


def main(argv=None) -> int:
    args, settings, started = model_run(__doc__, "validation_types", argv)
    rows = read_manifest(settings.data_dir, settings.min_year, settings.max_year, seed=settings.seed).rows
    splits, _ = choice_splits(rows, 0, TrainConfig().holdout_fraction, settings.seed)
    validation = rows.iloc[splits[0][1]].reset_index(drop=True)
    table, classes = evaluate.score_table(args.model, validation, progress=True)
    metrics = evaluate.table_report(table, classes)
    lines = [f"## {args.name}: {args.model} on the {len(validation)} validation-type coins of seed {settings.seed}",
             "", "| figure | value |", "|---|---:|"]
    for key in ("mae", "within_10y", "portrait_top1", "portrait_top3", "portrait_count", "mae_portrait_right",
                "mae_portrait_wrong"):
        value = metrics.get(key)
        if value is not None:
            shown = f"{100 * value:.1f}%" if key in ("within_10y", "portrait_top1", "portrait_top3") else f"{value:.2f}"
            lines.append(f"| {key} | {shown} |")
    write_results(args.out, args.name, {"model": args.model, "seed": settings.seed, "coins": len(validation),
                                        "metrics": metrics}, lines, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
