"""Does the model know when a photo was taken differently? The re-shot-coins test (issue 13).

OCRE's photos are museum shots: the coin fills a white frame under even light. A collector photographs the same
coin on a dark cloth, under a warm lamp, smaller in the frame, a little out of focus. This test re-shoots the
grouped hold-out coins of a registered model (the split its training run used) in those ways, each applied to
both sides as one tensor operation on the 128 px photos the model reads:

  * `dark cloth`: the white background (pixels brighter than 0.92 in every channel) replaced by a dark, slightly
    noisy grey;
  * `warm lamp`: gamma 1.25 and a warm colour cast (red x1.08, blue x0.82);
  * `smaller`: the coin at 70% of the frame, centred on its own white background;
  * `soft focus`: a 5x5 Gaussian blur (sigma 1.2 px);
  * `collector`: all four together.

Reported per variant, against the untouched photos of the same coins: the hold-out MAE and how far the years
move; the served out-of-distribution flag's rate; the AUROC of the flag's feature distance (re-shot vs original),
and of the rotation-TTA spread; and the 90% range's coverage and median width. The original photos are in the
flag's reference (every training-span coin is), so every coin, original or re-shot, is scored without the
reference coins of its own type: as a new coin of an unseen type would be, the way training calibrates the flag.

    .venv/bin/python benchmarks/photo_shift.py --home /tmp/demo-home     # a `make demo` COINYEAR_HOME

Writes benchmarks/results/photo_shift/<name>.{json,md}. About 4 minutes on 2 idle cores (430 coins x 6
variants x 10 photos through the TTA graph).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from coinyear.augment import shrink_in_frame
from coinyear.evaluate import regression_metrics
from coinyear.quality import interval_metrics

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import DATA_DIR, results_parser, write_results
from quantize import production, split_tensors, training_split  # a sibling benchmark script

WHITE = 0.92  # OCRE photos' background is near-white: brighter than this in every channel


def dark_cloth(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    background = (images > WHITE).all(dim=1, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    cloth = 0.13 + 0.025 * torch.randn(images.shape, generator=generator)
    return torch.where(background, cloth.clamp(0, 1), images)


def warm_lamp(images: torch.Tensor) -> torch.Tensor:
    cast = torch.tensor([1.08, 1.0, 0.82]).view(1, 3, 1, 1)
    return (images.clamp(0, 1) ** 1.25 * cast).clamp(0, 1)


def smaller(images: torch.Tensor, scale: float = 0.7) -> torch.Tensor:
    return shrink_in_frame(images, scale, 1.0)  # the training re-shoot's own shrink, on a white frame


def soft_focus(images: torch.Tensor, sigma: float = 1.2) -> torch.Tensor:
    taps = torch.arange(5, dtype=images.dtype) - 2
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, 5).repeat(channels, 1, 1, 1)
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    blurred = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(blurred, horizontal.transpose(2, 3), groups=channels)


VARIANTS = {
    "original": lambda images: images,
    "dark cloth": dark_cloth,
    "warm lamp": warm_lamp,
    "smaller": smaller,
    "soft focus": soft_focus,
    "collector": lambda images: soft_focus(warm_lamp(dark_cloth(smaller(images)))),
}


def auroc(original: np.ndarray, shifted: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(original)), np.ones(len(shifted))], np.r_[original, shifted]))


def main(argv=None) -> int:
    parser = results_parser(__doc__, "photo_shift")
    parser.add_argument("--home", type=Path, required=True, help="a COINYEAR_HOME with a production model")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--coins", type=int, default=0, help="only the first N hold-out coins (0: all)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model, version, (fronts, backs, year_from, year_to), (holdout_groups, reference_groups) = \
        production_holdout(args.home, args.data)
    if args.coins:
        fronts, backs, year_from, year_to = (x[:args.coins] for x in (fronts, backs, year_from, year_to))
        holdout_groups = holdout_groups[:args.coins]
    quality = model.quality
    rows, measured = {}, {}
    for name, reshoot in VARIANTS.items():
        scored = model.score_tensors(reshoot(fronts), reshoot(backs), True)
        distance = quality.ood.score(scored["features"], groups=holdout_groups, reference_groups=reference_groups)
        flagged = (distance > quality.ood.threshold) | quality.ood.featureless(scored["features"])
        if "portraits" in scored:  # the portrait flag, as served
            flagged |= quality.ood.unsure_portrait(scored["portraits"])
        low, high = quality.conformal.ranges(scored, 0.9, np.array([year for _, year in model.portraits]))
        measured[name] = {"year": scored["year"], "distance": distance, "spread": scored["spread"]}
        rows[name] = {**regression_metrics(scored["year"], year_from, year_to),
                      "mean_abs_year_change": float(np.mean(np.abs(scored["year"] - measured["original"]["year"]))),
                      "flag_rate": float(flagged.mean()),
                      "distance_auroc": auroc(measured["original"]["distance"], distance),
                      "spread_auroc": auroc(measured["original"]["spread"], scored["spread"]),
                      **{f"interval90_{k}": v for k, v in interval_metrics(low, high, year_from, year_to).items()}}
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    report = {"name": args.name, "home": str(args.home), "version": version, "coins": len(fronts), "variants": rows}
    lines = [f"## {args.name}: coinyear version {version} of {args.home}, {len(fronts)} grouped hold-out coins", "",
             "| photos | MAE | mean year change | served flag rate | flag distance AUROC vs original | "
             "TTA spread AUROC | 90% coverage | median width |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['mae']:.1f} | {r['mean_abs_year_change']:.1f} | {100 * r['flag_rate']:.1f}% | "
              f"{r['distance_auroc']:.3f} | {r['spread_auroc']:.3f} | {100 * r['interval90_coverage']:.1f}% | "
              f"{r['interval90_median_width']:.1f} |" for name, r in rows.items()]
    write_results(args.out, args.name, report, lines, started)
    return 0


def production_holdout(home: Path, data: Path):
    """(production python model, its version, (hold-out fronts, backs, year_from, year_to), (hold-out coin types,
    reference coin types)) for the grouped hold-out its training run used."""
    model, version, params = production(home)
    split = training_split(home, data, params)
    holdout, _ = split_tensors(home, data, params, model.size, model.grayscale, calibration=1, split=split)
    return model, version, holdout, holdout_and_reference_groups(split, model)


def holdout_and_reference_groups(split, model) -> tuple[np.ndarray, np.ndarray]:
    """The coin type of each hold-out coin of `split` (`training_split`) and of each flag reference row (the
    model's reference table names the coins, in the reference order)."""
    rows, _, holdout = split
    group_of = dict(zip(rows["coin_id"].astype(str), rows["group"].astype(str)))
    if model.references is None:
        raise SystemExit("this model version has no reference table: it cannot name its reference coins' types")
    reference = np.array([group_of[coin] for coin in model.references.table["coin_id"]])
    return rows["group"].astype(str).to_numpy()[holdout], reference


if __name__ == "__main__":
    raise SystemExit(main())
