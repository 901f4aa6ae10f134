"""Does the model know what it does not know? The leave-latest-rulers-out test.

A collector's 4th-century coin sent to a model trained on Augustus to Hadrian gets a confident wrong date. OCRE
has no coin of a later era, so this test makes one: it trains the default recipe (what `make demo` trains) on
every coin dated before AD 117 (Augustus to Trajan; its grouped hold-out calibrates the ranges and the flag as
usual), then scores the coins struck from AD 117 on (Hadrian's reign: a ruler and issues training never saw) against the
test coin types before it (in span, never trained or calibrated on).
Coins whose range straddles 117 are left out of both sides. `--cutoff 98` moves the cut to Trajan's accession
(trained on Augustus to Nerva; Trajan's and Hadrian's coins out of span): a second out-of-span set, on which a
new signal is chosen before it is read on Hadrian's coins.

Reported, for the in-span hold-out coins and the out-of-span coins:
* the served out-of-distribution flag rate and the 90% range coverage and width;
* for each signal that could flag a shift, its AUROC (out-of-span vs in-span hold-out) and the share of
  out-of-span coins it flags at a threshold that flags 5% of in-span hold-out coins:
  the feature distance the served flag uses, the rotation-TTA spread, and the portrait head's signals (with a
  portrait head, as the default recipe has): its uncertainty (1 - max probability), its energy
  (-logsumexp of the logits), the probability of its "other" class, and the disagreement between the served
  year and the ruler mixture (sum of p(portrait) x that portrait's median training year), how much its rotated
  views disagree (the mutual information the view flag thresholds, and the share of views naming another
  portrait); the distance to the training coins in other spaces (the class-conditional Mahalanobis distance to
  the portraits' means, Lee et al. 2018, in the backbone features and in the fused embedding; the 10 nearest in
  the fused embedding); and their combination (the largest of them, each as a rank among the in-span hold-out
  coins' values), and the era-shift score the served flag thresholds (`quality.FeatureDistance.shift_score`:
  the mean rank of the fused embedding's 10 nearest and the view disagreement among the validation coins'). The
  same signals are also reported at 10% in-span false alarms (the out-of-span flag's target: AUROC >= 0.8 at
  <= 10%).

Writes `<out>/<name>.json` and `.md`. About 30 minutes on 2 CPU cores (the embeddings of the ~2,000 reference
coins included):

    python benchmarks/era_shift.py --aux-weight 0.3 --name portrait-0.3
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from coinyear import evaluate
from coinyear.config import Settings
from coinyear.data import ImageCache, load_arrays, read_manifest, split_test
from coinyear.experiment import train_on_manifest
from coinyear.fit import infer_arrays
from coinyear.model import as_ensemble, mixture_median
from coinyear.quality import interval_metrics, nearest_mean
from coinyear.recipe import recipe_from_settings

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import DATA_DIR, results_parser, write_results
from ruler_head import embeddings_and_portraits  # a sibling benchmark script

CUTOFF = 117  # Trajan died in AD 117: Hadrian's coins are the latest ruler's
VIEWS = "portrait mutual information over the rotated views (the view flag's)"  # the view flag's signal
SERVED_SHIFT = "served era-shift score (mean rank of fused 10 nearest and view disagreement, validation scales)"


def signal_report(in_span: np.ndarray, out_span: np.ndarray, false_alarm: float = 0.05) -> dict:
    """AUROC of a score (higher = more likely shifted) and the out-of-span share it flags at `false_alarm`."""
    labels = np.r_[np.zeros(len(in_span)), np.ones(len(out_span))]
    threshold = float(np.quantile(in_span, 1 - false_alarm))
    return {"auroc": float(roc_auc_score(labels, np.r_[in_span, out_span])),
            f"flagged_at_{int(false_alarm * 100)}pct_false_alarms": float(np.mean(out_span > threshold))}


def class_mahalanobis(reference: np.ndarray, labels: np.ndarray, queries: np.ndarray, dims: int = 64,
                      min_coins: int = 5) -> np.ndarray:
    """The smallest Mahalanobis distance of each query to the classes' means, with one covariance shared by the
    classes (Lee et al. 2018), in the reference's top `dims` principal components; classes of at least
    `min_coins` reference rows."""
    mean = reference.mean(axis=0)
    _, _, axes = np.linalg.svd(reference - mean, full_matrices=False)
    project = axes[:dims].T
    ref, query = (reference - mean) @ project, (queries - mean) @ project
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= min_coins]
    means = np.stack([ref[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([ref[labels == c] - means[i] for i, c in enumerate(classes)])
    precision = np.linalg.pinv(np.cov(centred, rowvar=False) + 1e-6 * np.eye(ref.shape[1]))
    gaps = query[:, None, :] - means[None, :, :]
    return np.einsum("ncd,de,nce->nc", gaps, precision, gaps).min(axis=1)


def cosine_distances(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine distance of every query to every reference row [Q, N], both centred on the reference mean."""
    mean = reference.mean(axis=0)
    unit = lambda a: (a - mean) / np.maximum(np.linalg.norm(a - mean, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return 1 - unit(queries) @ unit(reference).T


def knn_distance(reference: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Mean cosine distance to the k nearest reference rows, after centring on the reference mean."""
    return nearest_mean(cosine_distances(reference, queries), k)


def views_naming_another(logits: np.ndarray) -> np.ndarray:
    """From the portrait logits of every member and rotation [N, M, A, C]: the share of views whose top portrait
    is not the top one of the averaged logits (a cruder form of `model.view_disagreement`)."""
    views = logits.reshape(len(logits), -1, logits.shape[-1])
    return (views.argmax(axis=-1) != views.mean(axis=1).argmax(axis=1)[:, None]).mean(axis=1)


def ranks(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each value's rank among the reference values, in [0, 1] (the empirical CDF)."""
    return np.searchsorted(np.sort(reference), values, side="right") / len(reference)


def main(argv=None) -> int:
    parser = results_parser(__doc__, "era_shift", "plain")
    parser.add_argument("--data", default=DATA_DIR)
    parser.add_argument("--cache", default=".coinyear/cache")
    parser.add_argument("--aux-weight", type=float, default=0.0, help="portrait head weight (0: the recipe's)")
    parser.add_argument("--aux-top", type=int, default=20)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--limit", type=int, help="a random subset of N coins (smoke runs)")
    parser.add_argument("--cutoff", type=int, default=CUTOFF,
                        help="the year the span ends: trained on coins before it, out of span from it (98: Trajan's "
                             "accession, a second out-of-span set on which to choose a signal before the Hadrian one)")
    parser.add_argument("--arrays", help="also save every coin's years, spreads, features and the quality files "
                                         "in this folder (to study other flags and ranges without retraining)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    manifest = read_manifest(args.data)
    rows = manifest.rows
    if args.limit:
        rows = rows.sample(n=args.limit, random_state=0).reset_index(drop=True)
    before, after = rows[rows["year_to"] < args.cutoff], rows[rows["year_from"] >= args.cutoff]
    manifest.rows = before.reset_index(drop=True)
    _, config = recipe_from_settings(Settings(), epochs=args.epochs)
    if args.aux_weight > 0:
        config = replace(config, aux_weight=args.aux_weight, aux_heads=("portrait",), aux_top=args.aux_top)
    result = train_on_manifest(manifest, config, Path(args.cache), final_model=True)
    served, quality = result.model, result.quality
    assert served is not None and quality is not None
    cache = ImageCache(Path(args.cache), config.model.image_size, config.model.grayscale)
    # in span: the test coin types before the cut-off (no choice was made on them; the flag's reference, like
    # the served model's, is the other coins)
    usable, test = split_test(manifest.rows)
    held = manifest.rows.iloc[test].reset_index(drop=True)
    reference_groups = manifest.rows["group"].to_numpy()[usable]
    sets = {"in_span_holdout": held, "out_of_span": after.reset_index(drop=True)}
    scored, summary, arrays = {}, {}, {}
    # the reference coins (every non-test coin) in two spaces, with their catalogue portraits: the backbone
    # directions the served flag compares, and the fused embedding the heads read (a plain pass over them)
    plain = served.regressors[0] if hasattr(served, "regressors") else served
    reference_rows = manifest.rows.iloc[usable]
    reference_portraits = evaluate.catalogue_portraits(reference_rows).to_numpy(str)
    reference_fused, _, reference_obverse = embeddings_and_portraits(plain, *load_arrays(reference_rows, cache),
                                                                     obverse=True)
    for name, subset in sets.items():
        fronts, backs = load_arrays(subset, cache)
        inferred = infer_arrays(served, fronts, backs, with_features=True, with_heads=True)
        fused, heads, obverse = embeddings_and_portraits(plain, fronts, backs, logits=True, obverse=True)
        portrait_logits = heads.get("portrait")
        portrait_p = None if portrait_logits is None else torch.softmax(torch.from_numpy(portrait_logits), 1).numpy()
        years = np.array([year for _, year in as_ensemble(served).portrait_classes()])
        low, high = quality.conformal.ranges(inferred, 0.9, years)
        year_from, year_to = subset["year_from"].to_numpy(float), subset["year_to"].to_numpy(float)
        # the in-span hold-out coins are in the flag's reference (every training-span coin is): scored as a coin
        # of a type nobody has seen, without the reference coins of its own type (how training calibrates it)
        distance = quality.ood.score(inferred["features"], groups=subset["group"].to_numpy(),
                                     reference_groups=reference_groups)
        flagged = (distance > quality.ood.threshold) | quality.ood.featureless(inferred["features"])
        if "portraits" in inferred:  # the portrait flag (`calibrate.portrait_floor`), as served
            flagged |= quality.ood.unsure_portrait(inferred["portraits"])
        if "disagreement" in inferred:  # the view flag (`calibrate.disagreement_ceiling`), as served
            flagged |= quality.ood.views_disagree(inferred["disagreement"])
            # the era-shift score (`quality.FeatureDistance.fit_shift`), as served
            flagged |= quality.ood.era_shifted(inferred["embedding"], inferred["disagreement"])
        summary[name] = {
            "coins": len(subset), **evaluate.regression_metrics(inferred["year"], year_from, year_to),
            "served_flag_rate": float(flagged.mean()),
            **{f"interval90_{k}": v for k, v in interval_metrics(low, high, year_from, year_to).items()}}
        scored[name] = {"feature distance": distance, "rotation spread": inferred["spread"]}
        if args.arrays:
            arrays.update({f"{name}/{key}": value for key, value in {
                "year": inferred["year"], "spread": inferred["spread"], "features": inferred["features"],
                "embedding": inferred.get("embedding"),
                "distance": distance, "year_from": year_from, "year_to": year_to,
                "group": subset["group"].to_numpy(str), "portrait_p": portrait_p, "fused": fused, "obverse": obverse,
                "logits": inferred.get("logits"), "regression": inferred.get("regression")}.items()
                if value is not None})
        directions = quality.ood._directions(inferred["features"], quality.ood.sides) - quality.ood.center
        named = reference_portraits != ""
        scored[name]["feature distance, class-conditional Mahalanobis"] = class_mahalanobis(
            quality.ood.reference[named], reference_portraits[named], directions)
        scored[name]["fused embedding, 10 nearest"] = knn_distance(reference_fused, fused)
        scored[name]["fused embedding, class-conditional Mahalanobis"] = class_mahalanobis(
            reference_fused[named], reference_portraits[named], fused)
        # the obverse alone: a portrait nobody trained on should lie far from every training obverse, where the
        # fused embedding also reads the reverse (whose types outlive a reign)
        scored[name]["obverse features, 10 nearest"] = knn_distance(reference_obverse, obverse)
        scored[name]["obverse features, nearest"] = knn_distance(reference_obverse, obverse, k=1)
        scored[name]["obverse features, class-conditional Mahalanobis"] = class_mahalanobis(
            reference_obverse[named], reference_portraits[named], obverse)
        if "disagreement" in inferred and quality.ood.shift_scale is not None:
            scored[name][SERVED_SHIFT] = quality.ood.shift_score(inferred["embedding"], inferred["disagreement"])
        if "disagreement" in inferred:  # what the view flag thresholds (`model.view_disagreement`)
            scored[name][VIEWS] = inferred["disagreement"]
            scored[name]["share of rotated views naming another portrait"] = views_naming_another(inferred["logits"])
        if portrait_p is not None:
            scored[name]["portrait uncertainty"] = 1 - portrait_p.max(axis=1)
            scored[name]["portrait energy"] = -torch.logsumexp(torch.from_numpy(portrait_logits), 1).numpy()
            scored[name]["portrait 'other'"] = portrait_p[:, -1]
            ruler = portrait_p @ plain.portrait_years.numpy()
            scored[name]["year vs ruler disagreement"] = np.abs(inferred["year"] - ruler)
        if "portraits" in inferred:  # as served: averaged over the rotations, at the fitted temperature
            served_p = inferred["portraits"]
            scored[name]["served portrait uncertainty (what the portrait flag thresholds)"] = 1 - served_p.max(axis=1)
            regression = inferred["regression"].mean(axis=(1, 2))
            median = mixture_median(torch.from_numpy(served_p).float(), torch.from_numpy(years).float()).numpy()
            scored[name]["regression vs ruler median disagreement"] = np.abs(regression - median)
    reference = scored["in_span_holdout"]
    combined = {name: np.max([ranks(reference[s], values[s]) for s in reference], axis=0)
                for name, values in scored.items()}
    mean_ranks = {"mean rank: obverse 10 nearest, view disagreement": ("obverse features, 10 nearest", VIEWS),
                  "mean rank: fused 10 nearest, view disagreement": ("fused embedding, 10 nearest", VIEWS)}
    for name in scored:
        scored[name]["combined (max rank)"] = combined[name]
        for label, parts in mean_ranks.items():
            if all(part in reference for part in parts):
                scored[name][label] = np.mean([ranks(reference[p], scored[name][p]) for p in parts], axis=0)
    signals = {name: {**signal_report(scored["in_span_holdout"][name], scored["out_of_span"][name]),
                      **signal_report(scored["in_span_holdout"][name], scored["out_of_span"][name], 0.10)}
               for name in scored["in_span_holdout"]}
    report = {"name": args.name, "aux_weight": config.aux_weight, "epochs": config.epochs, "cutoff": args.cutoff,
              "trained_coins": len(before), "sets": summary, "signals": signals,
              "levers": {k: v for k, v in result.metrics.items()
                         if k in ("portrait_temperature", "ruler_pooled", "ruler_blend", "portrait_floor")},
              "conformal_by": quality.conformal.by}
    lines = [f"## {args.name}: trained on {len(before)} coins before AD {args.cutoff}, aux weight {config.aux_weight}",
             "",
             "| coins | n | MAE | served flag rate | 90% coverage | median width |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {s['coins']} | {s['mae']:.1f} | {100 * s['served_flag_rate']:.1f}% | "
              f"{100 * s['interval90_coverage']:.1f}% | {s['interval90_median_width']:.1f} |"
              for name, s in summary.items()]
    lines += ["", "| signal | AUROC | out-of-span flagged at 5% / 10% in-span false alarms |", "|---|---|---|"]
    lines += [f"| {name} | {s['auroc']:.3f} | {100 * s['flagged_at_5pct_false_alarms']:.1f}% / "
              f"{100 * s['flagged_at_10pct_false_alarms']:.1f}% |" for name, s in signals.items()]
    write_results(args.out, args.name, report, lines, started)
    if args.arrays:  # with every signal's values, so that combinations can be studied on a choice set's run
        quality.save(args.arrays)
        signal_values = {f"{name}/signal: {signal}": values for name, by_signal in scored.items()
                         for signal, values in by_signal.items()}
        np.savez_compressed(Path(args.arrays) / "coins.npz", reference_groups=reference_groups.astype(str),
                            reference_portraits=reference_portraits, reference_fused=reference_fused,
                            reference_obverse=reference_obverse, **arrays, **signal_values)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
