"""Model quality benchmark: grouped K-fold cross-validation on the OCRE coins for the constant-median baseline,
the original design and our recipe (plus one-change-at-a-time variants), with calibrated 90% intervals and
the out-of-distribution flag.

    PYTHONPATH=src python benchmarks/quality.py --data ../shared/data/ocre --out benchmarks/results/quality
    PYTHONPATH=src python benchmarks/quality.py --limit 120 --folds 2 --epochs 1 --out /tmp/q   # smoke test
    PYTHONPATH=src python benchmarks/quality.py --cpu-probe --out /tmp/q   # one epoch per recipe on this CPU

Every number is out-of-fold: a coin is scored only by models that never saw its coin type. Models train for a
fixed number of epochs (no early stopping on the fold being scored). Intervals are cross-conformal: each fold
is calibrated on the other folds' residuals. Writes results.json, results.md, oof_predictions.csv and plots;
results are written after every configuration, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coinyear import evaluate
from coinyear.data import ImageCache, grouped_folds, load_arrays, read_manifest
from coinyear.experiment import train_on_manifest
from coinyear.fit import infer_arrays, resolve_device
from coinyear.model import ModelConfig
from coinyear.quality import FeatureDistance, cross_conformal, interval_metrics
from coinyear.recipe import TTA_ANGLES, TrainConfig

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import DATA_DIR, write_json

log = logging.getLogger("benchmarks.quality")
LEVEL = 0.9


def recipes(epochs: int) -> dict[str, TrainConfig | None]:
    """Name -> recipe, in the order they run (most important first). None = the constant-median baseline."""
    ours = TrainConfig(model=ModelConfig(backbone="efficientnet_lite0", mode="shared", image_size=128, proj_dim=256),
                       epochs=epochs, loss="interval", tta_angles=TTA_ANGLES, early_stopping=False)
    original = TrainConfig(model=ModelConfig(backbone="resnet18", mode="shared", grayscale=True, image_size=128,
                                             proj_dim=256, pretrained=False),
                           epochs=epochs, loss="mse", horizontal_flip=True, tta_angles=(), early_stopping=False)
    # the seed design's four architectures (issue: model-quality table), same interval loss, no TTA; torchvision
    # ImageNet weights are not available offline, so these train from scratch
    architectures = {
        f"{backbone} {mode}": TrainConfig(model=ModelConfig(backbone=backbone, mode=mode, image_size=128, proj_dim=256,
                                                            pretrained=False),
                                          epochs=epochs, loss="interval", tta_angles=(), early_stopping=False)
        for backbone in ("mobilenet_v3_small", "resnet18") for mode in ("shared", "dual")}
    return {
        "median baseline": None,
        "ours": ours,
        "original design": original,
        "ours, 2x epochs": replace(ours, epochs=2 * epochs),
        "ours + mint/denomination heads": replace(ours, aux_weight=0.2),
        "ours, MSE loss": replace(ours, loss="mse"),
        **architectures,
    }


# ------------------------------------------------------------------------------------------------ scoring
def score(table: pd.DataFrame, spread: bool) -> dict:
    """Point metrics and cross-conformal 90% interval metrics of out-of-fold predictions."""
    metrics = evaluate.regression_metrics(table["predicted"], table["year_from"], table["year_to"])
    low, high = cross_conformal(table["predicted"], table["year_from"], table["year_to"], table["fold"], LEVEL,
                                table["spread"] if spread else None)
    metrics.update({f"interval_{k}": v for k, v in
                    interval_metrics(low, high, table["year_from"], table["year_to"]).items()})
    return metrics


LEVELS = np.arange(0.5, 0.99, 0.05)  # the interval levels of the coverage curve


def coverage_curve(table: pd.DataFrame, spread: bool, levels=LEVELS) -> list[dict]:
    out = []
    for level in levels:
        low, high = cross_conformal(table["predicted"], table["year_from"], table["year_to"], table["fold"],
                                    float(level), table["spread"] if spread else None)
        out.append({"level": float(level), **interval_metrics(low, high, table["year_from"], table["year_to"])})
    return out


def median_baseline(rows: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    midpoint = rows["year"].to_numpy()
    predicted, fold_of = np.zeros(len(rows)), np.zeros(len(rows), int)
    for fold, (train, val) in enumerate(grouped_folds(rows, folds, seed)):
        predicted[val], fold_of[val] = np.median(midpoint[train]), fold + 1
    return pd.DataFrame({"coin_id": rows["coin_id"], "year_from": rows["year_from"], "year_to": rows["year_to"],
                         "predicted": predicted, "spread": 0.0, "fold": fold_of})


def synthetic_inputs(count: int, size: int, channels: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Photos that are not coins: uniform noise, a blank grey card, and real-coin colours with the pixels
    shuffled (right colour statistics, no structure)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (count, channels, size, size), dtype=np.uint8)
    blank = np.full((count, channels, size, size), 128, np.uint8) + rng.integers(0, 3, (count, 1, 1, 1), dtype=np.uint8)
    return {"noise": (noise, noise[::-1].copy()), "blank": (blank, blank.copy())}


def shuffled_pixels(images: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = images.reshape(images.shape[0], images.shape[1], -1).copy()
    for item in flat:
        item[:, :] = item[:, rng.permutation(item.shape[1])]
    return flat.reshape(images.shape)


def ood_check(result, rows: pd.DataFrame, fronts, backs, config: TrainConfig, device) -> dict:
    """Per fold: reference = the fold model's training coins, threshold by grouped leave-out (as in
    training); report the share flagged among the fold's unseen real coins and among non-coin photos."""
    fold_column = result.predictions.set_index("coin_id")["fold"]
    fold_of = rows["coin_id"].map(fold_column).to_numpy()
    groups = rows["group"].to_numpy()
    size, channels = config.model.image_size, 1 if config.model.grayscale else 3
    fakes = synthetic_inputs(64, size, channels)
    take = np.random.default_rng(1).choice(len(rows), min(64, len(rows)), replace=False)
    fakes["shuffled pixels"] = (shuffled_pixels(fronts[take]), shuffled_pixels(backs[take], 1))
    flagged = {"real unseen coins": []} | {name: [] for name in fakes}
    scores = {"real unseen coins": []} | {name: [] for name in fakes}
    for fold, model in enumerate(result.fold_models, start=1):
        train, val = fold_of != fold, fold_of == fold
        features = infer_arrays(model, fronts[train], backs[train], device=device, with_features=True)["features"]
        detector = FeatureDistance.fit(features, groups[train], quantile=config.ood_quantile)
        checks = {"real unseen coins": (fronts[val], backs[val]), **fakes}
        for name, (front, back) in checks.items():
            unseen = infer_arrays(model, front, back, device=device, with_features=True)["features"]
            value = detector.score(unseen)
            flagged[name].append(value > detector.threshold)
            scores[name].append(value / detector.threshold)
        model.cpu()
    return {"flag_rate": {k: float(np.mean(np.concatenate(v))) for k, v in flagged.items()},
            "score_over_threshold": {k: np.concatenate(v).tolist() for k, v in scores.items()}}


# ------------------------------------------------------------------------------------------------- output
def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"Grouped {results['folds']}-fold CV on {results['coins']} OCRE coins ({results['groups']} coin types), "
             f"{results['epochs']} epochs, out-of-fold. Device: {env['device_name']}; torch {env['torch']}.", "",
             "| recipe | MAE (y) | RMSE (y) | within ±10 y | 90% interval coverage | median width (y) | "
             "train time (s, this device) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["configs"].items():
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error'].splitlines()[-1]} | | | | | |")
            continue
        m = entry["metrics"]
        lines.append(f"| {name} | {m['mae']:.2f} | {m['rmse']:.2f} | {100 * m['within_10y']:.1f}% | "
                     f"{100 * m['interval_coverage']:.1f}% | {m['interval_median_width']:.1f} | "
                     f"{entry['train_seconds']:.0f} |")
    lines.append("")
    for name, entry in results["configs"].items():
        extra = []
        if "mae_no_tta" in entry:
            extra.append(f"MAE without rotation TTA {entry['mae_no_tta']:.2f}")
        if "metrics_constant_width" in entry:
            c = entry["metrics_constant_width"]
            extra.append(f"constant-width intervals: coverage {100 * c['interval_coverage']:.1f}%, "
                         f"median width {c['interval_median_width']:.1f} y")
        if "ood" in entry:
            extra.append("OOD flag rate: " + ", ".join(f"{k} {100 * v:.1f}%"
                                                        for k, v in entry["ood"]["flag_rate"].items()))
        if extra:
            lines.append(f"- {name}: " + "; ".join(extra))
    skipped = results.get("skipped", [])
    if skipped:
        lines.append(f"- not run (time budget): {', '.join(skipped)}")
    return "\n".join(lines) + "\n"


def plots(results: dict, tables: dict[str, pd.DataFrame], out: Path) -> None:
    import matplotlib.pyplot as plt

    measured = [n for n in tables if "error" not in results["configs"][n]]
    # predicted vs true of our recipe
    trained = [n for n in measured if n != "median baseline"]
    best = min(trained, key=lambda n: results["configs"][n]["metrics"]["mae"], default=None)
    if best:
        t = tables[best]
        fig = evaluate.plot_predicted_vs_true(t["predicted"], t["year_from"], t["year_to"],
                                              f"{best}: out-of-fold predicted vs true")
        fig.savefig(out / "quality_predicted_vs_true.png", dpi=110)
        plt.close(fig)
    # MAE per decade, every recipe
    fig, axis = plt.subplots(figsize=(10, 4))
    for name in measured:
        t = tables[name]
        decades = evaluate.per_decade_mae(t["predicted"], t["year_from"], t["year_to"])
        axis.plot(decades["decade"], decades["mae"], marker="o", label=name)
    axis.set(title="out-of-fold MAE per decade of the label midpoint", xlabel="decade", ylabel="MAE (years)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_decade_mae.png", dpi=110)
    plt.close(fig)
    # coverage vs nominal level
    fig, (ax_cov, ax_width) = plt.subplots(1, 2, figsize=(11, 4))
    for name in measured:
        curve = pd.DataFrame(results["configs"][name]["coverage_curve"])
        ax_cov.plot(curve["level"], curve["coverage"], marker="o", label=name)
        ax_width.plot(curve["level"], curve["median_width"], marker="o", label=name)
    ax_cov.plot([0.5, 0.95], [0.5, 0.95], "k--", lw=1, label="ideal")
    ax_cov.axhspan(0.88, 0.92, color="green", alpha=0.1)
    ax_cov.set(title="cross-conformal coverage (out-of-fold)", xlabel="nominal level", ylabel="empirical coverage")
    ax_width.set(title="median interval width", xlabel="nominal level", ylabel="years")
    for axis in (ax_cov, ax_width):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_interval_coverage.png", dpi=110)
    plt.close(fig)
    # OOD score distributions
    with_ood = next((n for n in results["configs"] if "ood" in results["configs"][n]), None)
    if with_ood:
        fig, axis = plt.subplots(figsize=(7, 4))
        for name, values in results["configs"][with_ood]["ood"]["score_over_threshold"].items():
            axis.hist(np.clip(values, 0, 5), bins=50, alpha=0.5, label=name, density=True)
        axis.axvline(1.0, color="k", ls="--", label="threshold")
        axis.set(title=f"{with_ood}: OOD score / threshold (per fold)", xlabel="score / threshold (clipped at 5)",
                 ylabel="density")
        axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "quality_ood_scores.png", dpi=110)
        plt.close(fig)


def write(results: dict, tables: dict[str, pd.DataFrame], out: Path) -> None:
    slim = json.loads(json.dumps(results))
    for entry in slim["configs"].values():  # the raw scores go into the plot, not the JSON
        entry.get("ood", {}).pop("score_over_threshold", None)
    write_json(out / "results.json", slim)
    (out / "results.md").write_text(markdown(results))
    if tables:
        pd.concat([t.assign(recipe=n) for n, t in tables.items()]).to_csv(out / "oof_predictions.csv", index=False)
    try:
        plots(results, tables, out)
    except Exception:  # a plot must never cost the numbers
        log.exception("plotting failed")


# ---------------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict:
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}


def cpu_probe(args, manifest) -> None:
    """Seconds for one training epoch of each recipe on (part of) one fold's training coins, on this CPU.

    Records wall-clock and process CPU seconds: on a shared machine the wall clock measures the neighbours,
    while CPU seconds / threads is what the epoch costs on otherwise idle cores (an extrapolation).
    """
    from coinyear.augment import make_augmentation
    from coinyear.experiment import new_model, serving_model
    from coinyear.fit import CoinDataset, fit

    rows = manifest.rows
    train, _ = grouped_folds(rows, args.folds, args.seed)[0]
    fold_coins = len(train)
    train = train[:args.probe_coins] if args.probe_coins else train
    out = {"environment": environment(torch.device("cpu")), "train_coins": int(len(train)),
           "fold_train_coins": int(fold_coins), "load_average": os.getloadavg(), "recipes": {}}
    for name, config in recipes(1).items():
        if config is None or name not in args.probe:
            continue
        config = replace(config, device="cpu")
        cache = ImageCache(Path(args.cache), config.model.image_size, config.model.grayscale)
        fronts, backs = load_arrays(rows.iloc[train], cache, progress=True)
        model = new_model(config, rows["year_from"].iloc[train], rows["year_to"].iloc[train])
        data = CoinDataset(fronts, backs, rows["year_from"].iloc[train], rows["year_to"].iloc[train],
                           make_augmentation(config))
        started, cpu_started = time.perf_counter(), time.process_time()
        fit(model, data, config, None, name=name, epochs=1)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        infer_started = time.process_time()
        served = serving_model([model], config.tta_angles)
        infer_arrays(served, fronts[:128], backs[:128], device="cpu")
        threads = torch.get_num_threads()
        scale = fold_coins / len(train)
        out["recipes"][name] = {
            "epoch_wall_seconds": wall, "epoch_cpu_seconds": cpu, "threads": threads,
            "fold_epoch_seconds_extrapolated": cpu / threads * scale,
            "served_inference_cpu_seconds_per_coin": (time.process_time() - infer_started) / 128}
        print(name, out["recipes"][name], flush=True)
    write_json(Path(args.out) / "cpu_probe.json", out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA_DIR)
    parser.add_argument("--out", default="benchmarks/results/quality")
    parser.add_argument("--cache", default=".coinyear/cache", help="decoded-image cache folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--limit", type=int, help="a random subset of N coins (smoke tests)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--image-size", type=int, help="override every recipe's image size (e.g. 64 on a CPU)")
    parser.add_argument("--only", help="';'-separated recipe names to run (default: all)")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds; a recipe is skipped when it would not finish in what is left")
    parser.add_argument("--cpu-probe", action="store_true", help="time one epoch per recipe on this CPU, then exit")
    parser.add_argument("--probe", default="ours;original design", help="';'-separated recipes the CPU probe times")
    parser.add_argument("--probe-coins", type=int, default=600, help="coins the CPU probe trains one epoch on")
    args = parser.parse_args(argv)
    args.probe = args.probe.split(";")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(args.data, limit=args.limit, seed=args.seed)
    print(manifest.report(), flush=True)
    if args.cpu_probe:
        cpu_probe(args, manifest)
        return 0

    device = resolve_device("auto")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = manifest.rows
    results = {"folds": args.folds, "epochs": args.epochs, "coins": int(len(rows)),
               "groups": int(rows["group"].nunique()), "level": LEVEL, "environment": environment(device),
               "configs": {}, "skipped": []}
    tables: dict[str, pd.DataFrame] = {}
    chosen = recipes(args.epochs)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(";")}
    epoch_seconds = None  # measured on the first trained recipe, to decide what still fits the budget
    for name, config in chosen.items():
        if config is not None and epoch_seconds is not None:
            factor = (config.model.image_size / 128) ** 2
            needed = epoch_seconds * factor * config.epochs * args.folds * 1.4  # + validation, TTA, decoding
            left = args.time_budget - (time.perf_counter() - started)
            if needed > left:
                print(f"skipping {name}: needs ~{needed:.0f}s, {left:.0f}s left", flush=True)
                results["skipped"].append(name)
                continue
        print(f"=== {name}", flush=True)
        recipe_started = time.perf_counter()
        try:
            if config is None:
                table = median_baseline(rows, args.folds, args.seed)
                entry = {"train_seconds": 0.0}
            else:
                config = replace(config, folds=args.folds, seed=args.seed)
                if args.image_size:
                    config = replace(config, model=replace(config.model, image_size=args.image_size))
                result = train_on_manifest(manifest, config, Path(args.cache), final_model=False)
                table = result.predictions
                train_seconds = sum(h["epoch_seconds"] for hist in result.histories.values() for h in hist)
                epoch_seconds = epoch_seconds or train_seconds / (config.epochs * args.folds)
                entry = {"train_seconds": train_seconds, "recipe": config.flat(),
                         "pretrained_loaded": bool(result.fold_models[0].pretrained_loaded),
                         "cv_mae_mean": result.metrics.get("cv_mae_mean"),
                         "cv_mae_std": result.metrics.get("cv_mae_std")}
                if config.tta_angles:
                    entry["mae_no_tta"] = float(result.metrics["val_mae_no_tta"])
                if config.tta_angles:  # our recipes: check the out-of-distribution flag too
                    cache = ImageCache(Path(args.cache), config.model.image_size, config.model.grayscale)
                    fronts, backs = load_arrays(rows, cache)
                    entry["ood"] = ood_check(result, rows, fronts, backs, config, device)
            scaled = config is not None and len(config.tta_angles) >= 2
            entry["metrics"] = score(table, spread=scaled)
            entry["interval_kind"] = "scaled by rotation spread" if scaled else "constant width"
            if scaled:
                entry["metrics_constant_width"] = score(table, spread=False)
            entry["coverage_curve"] = coverage_curve(table, spread=scaled)
            entry["wall_seconds"] = time.perf_counter() - recipe_started
            tables[name] = table
            m = entry["metrics"]
            print(f"{name}: MAE {m['mae']:.2f}, ±10y {100 * m['within_10y']:.1f}%, coverage "
                  f"{100 * m['interval_coverage']:.1f}%, width {m['interval_median_width']:.1f}, "
                  f"{entry['train_seconds']:.0f}s", flush=True)
        except Exception:  # noqa: BLE001 - a recipe that fails is recorded with its traceback; the others run
            traceback.print_exc()
            entry = {"error": traceback.format_exc()}
        results["configs"][name] = entry
        results["total_seconds"] = time.perf_counter() - started
        write(results, tables, out)
    print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
