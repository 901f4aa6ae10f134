"""The ruler behind the portrait, and similar coins, as dating evidence: measured on the grouped hold-out.

Trains the default recipe (what `make demo` trains) once on the grouped hold-out split, with or without an
auxiliary portrait head (`--aux-weight`; the label is read from `obverse_desc` by `coinyear.rulers`), then scores
the coin types training never saw five ways:

* `regression`: the served year (the regressor, rotation TTA);
* `ruler mixture`: the hierarchy the portrait head implies, sum over portraits of p(portrait) x the median year
  of the training coins with that portrait (the "other" class: their median too);
* `regression + ruler` / `regression + neighbours`: the mean of the served year and that estimate;
* `neighbours`: the mean catalogue year of the k training coins nearest in the model's fused embedding
  (cosine), weighted by similarity;
* with `--year-bins W`, a second auxiliary head classifies the coin's midpoint year into W-year bins (the
  classification-over-year-bins variant of the hierarchy): `year-bin mixture`, sum over bins of p(bin) x the
  median year of the training coins in that bin, and `regression + year bins`, their mean. The label is the
  bin of the catalogue midpoint (a hard label: OCRE's date ranges are narrow, half of them a year or less).

The blends are fixed 50/50, never tuned on the hold-out they are scored on. Writes
`<out>/<name>.json` and `.md`. Usage (about 12 minutes on 2 idle CPU cores):

    python benchmarks/ruler_head.py --aux-weight 0.3 --name portrait-0.3
    python benchmarks/ruler_head.py --aux-weight 0 --name plain
    python benchmarks/ruler_head.py --aux-weight 0.3 --year-bins 10 --name portrait-0.3-bins-10
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from coinyear import evaluate
from coinyear import recipe as recipe_module
from coinyear.config import Settings
from coinyear.data import ImageCache, choice_splits, load_arrays, read_manifest
from coinyear.experiment import aux_labels, train_on_manifest
from coinyear.recipe import recipe_from_settings

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import DATA_DIR, results_parser, write_results


@torch.inference_mode()
def embeddings_and_portraits(model, fronts: np.ndarray, backs: np.ndarray, batch: int = 64, logits: bool = False,
                             obverse: bool = False):
    """Fused embedding [N, F] and each auxiliary head's class probabilities {head: [N, classes]}, plain pass
    (with `logits`, the heads' raw logits instead of their probabilities); with `obverse`, also the obverse's
    pooled backbone features [N, D] (what an obverse portrait head reads), third."""
    model.eval()
    embedded, outputs, obverses = [], {name: [] for name in model.aux_heads}, []
    for start in range(0, len(fronts), batch):
        front = torch.from_numpy(np.asarray(fronts[start:start + batch])).float() / 255
        back = torch.from_numpy(np.asarray(backs[start:start + batch])).float() / 255
        front_features, back_features = model.backbone_features(front, back)
        features = model.fuse(front_features, back_features)
        embedded.append(features.numpy())
        obverses.append(front_features.numpy())
        # each head from what it reads (the obverse alone for an obverse portrait head, ModelConfig.portrait_input)
        for name, raw in model.aux_logits(front_features, features).items():
            outputs[name].append((raw if logits else torch.softmax(raw, dim=1)).numpy())
    heads = {name: np.concatenate(parts) for name, parts in outputs.items()}
    if obverse:
        return np.concatenate(embedded), heads, np.concatenate(obverses)
    return np.concatenate(embedded), heads


def neighbour_years(embedded: np.ndarray, midpoints: np.ndarray, train: np.ndarray, query: np.ndarray,
                    k: int = 10) -> np.ndarray:
    """Similarity-weighted mean year of the k nearest training coins (cosine on the fused embedding)."""
    unit = embedded / np.maximum(np.linalg.norm(embedded, axis=1, keepdims=True), 1e-12)
    similarity = unit[query] @ unit[train].T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    weights = np.maximum(np.take_along_axis(similarity, nearest, axis=1), 1e-6)
    return (weights * midpoints[train][nearest]).sum(axis=1) / weights.sum(axis=1)


def main(argv=None) -> int:
    parser = results_parser(__doc__, "ruler_head", "portrait")
    parser.add_argument("--data", default=DATA_DIR)
    parser.add_argument("--cache", default=".coinyear/cache")
    parser.add_argument("--aux-weight", type=float, default=0.3)
    parser.add_argument("--aux-top", type=int, default=20, help="portraits with a class of their own")
    parser.add_argument("--epochs", type=int, help="override the default recipe's epochs")
    parser.add_argument("--limit", type=int, help="a random subset of N coins (smoke runs)")
    parser.add_argument("--k", type=int, default=10, help="neighbours averaged")
    parser.add_argument("--year-bins", type=int, default=0,
                        help="width in years of the bins a second auxiliary head classifies into (0: no such head)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    manifest = read_manifest(args.data)
    if args.limit:
        manifest.rows = manifest.rows.sample(n=args.limit, random_state=0).reset_index(drop=True)
    heads: tuple[str, ...] = ("portrait",)
    if args.year_bins:
        midpoint = (manifest.rows["year_from"] + manifest.rows["year_to"]) / 2
        bins = np.floor((midpoint - midpoint.min()) / args.year_bins).astype(int)
        manifest.rows = manifest.rows.assign(year_bin=bins.astype(str))
        heads = ("portrait", "year_bin")
        # an experiment's own head: the trainer accepts only catalogue columns as auxiliary heads
        recipe_module.AUX_COLUMNS = (*recipe_module.AUX_COLUMNS, "year_bin")
        if bins.nunique() > args.aux_top:
            raise SystemExit(f"{bins.nunique()} year bins but --aux-top {args.aux_top}: widen the bins")
    _, config = recipe_from_settings(Settings(), epochs=args.epochs)
    # ruler_blend 0: the "regression" row is the regression head alone; the blend is computed below, as served
    config = replace(config, aux_weight=args.aux_weight, aux_heads=heads, aux_top=args.aux_top,
                     model=replace(config.model, ruler_blend=0.0))
    result = train_on_manifest(manifest, config, Path(args.cache), final_model=False)
    model = result.fold_models[0]
    rows = manifest.rows
    # the validation coins (final_model=False scores no test type): the estimates are compared on them
    train, holdout = choice_splits(rows, 0, config.holdout_fraction, config.seed)[0][0]
    table = result.predictions.set_index("coin_id").loc[rows["coin_id"].iloc[holdout]]

    cache = ImageCache(Path(args.cache), config.model.image_size, config.model.grayscale)
    fronts, backs = load_arrays(rows, cache)
    embedded, head_p = embeddings_and_portraits(model, fronts, backs)
    portrait_p = head_p.get("portrait")
    year_from, year_to = rows["year_from"].to_numpy(float), rows["year_to"].to_numpy(float)
    midpoints = (year_from + year_to) / 2
    estimates = {"regression": table["predicted"].to_numpy()}
    estimates["neighbours"] = neighbour_years(embedded, midpoints, train, holdout, args.k)
    estimates["regression + neighbours"] = (estimates["regression"] + estimates["neighbours"]) / 2
    extra: dict = {}
    if portrait_p is not None:
        labels = aux_labels(rows, args.aux_top, ("portrait",))[0]["portrait"]
        classes = portrait_p.shape[1]
        # each portrait's median training year, as the trainer set it (train.new_model)
        estimates["ruler mixture"] = portrait_p[holdout] @ model.portrait_years.numpy()
        estimates["regression + ruler"] = (estimates["regression"] + estimates["ruler mixture"]) / 2
        known = labels[holdout] >= 0
        extra["portrait_accuracy_holdout"] = float((portrait_p[holdout].argmax(1) == labels[holdout])[known].mean())
        extra["portrait_classes"] = classes
    if "year_bin" in head_p:
        labels = aux_labels(rows, args.aux_top, ("year_bin",))[0]["year_bin"]
        # each bin class's median training year (the head's classes are the bins, most common first)
        centres = np.array([np.median(midpoints[train][labels[train] == c]) if (labels[train] == c).any()
                            else np.median(midpoints[train]) for c in range(head_p["year_bin"].shape[1])])
        estimates["year-bin mixture"] = head_p["year_bin"][holdout] @ centres
        estimates["regression + year bins"] = (estimates["regression"] + estimates["year-bin mixture"]) / 2
        extra["year_bin_accuracy_holdout"] = float((head_p["year_bin"][holdout].argmax(1) == labels[holdout]).mean())
        extra["year_bins"] = int(head_p["year_bin"].shape[1])
    metrics = {name: evaluate.regression_metrics(years, year_from[holdout], year_to[holdout])
               for name, years in estimates.items()}
    report = {"name": args.name, "aux_weight": args.aux_weight, "aux_top": args.aux_top, "k": args.k,
              "year_bins": args.year_bins,
              "epochs": config.epochs, "backbone": config.model.backbone, "image_size": config.model.image_size,
              "coins": len(rows), "holdout_coins": len(holdout), "metrics": metrics, **extra}
    lines = [f"## {args.name}: aux weight {args.aux_weight}, {config.epochs} epochs, {len(holdout)} hold-out coins",
             "", "| estimate | MAE | within ±10 y | R² |", "|---|---|---|---|"]
    lines += [f"| {name} | {m['mae']:.2f} | {100 * m['within_10y']:.1f}% | {m['r2']:.3f} |"
              for name, m in metrics.items()]
    write_results(args.out, args.name, report, lines, started)
    print(json.dumps(extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
