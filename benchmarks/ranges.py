"""Other ways to make the 90% range, against the served one, on a registered hold-out model.

The served range is split conformal on the validation coin types: each coin's error divided by its portrait
mixture's dispersion, floored at the median dispersion (`quality.Conformal`, the scale `calibrate.fit_ranges`
chose). This script fits each variant below on the same validation coins from one scoring pass, then reports:

* on the validation types, a grouped 2-fold check (calibrated on half of the coin types, measured on the other
  half, both ways, averaged): the coverage and median width a variant would be chosen on;
* on the test coin types (which choose nothing): the coverage and median width.

Variants: no scale; the rotation spread (floored at its median); the mixture's dispersion floored at lower
quantiles or plus a constant; its sum with the rotation spread or with the regression head's disagreement with
the served year; the mixture's 5-95% width plus a constant; one quantile per bin of the top portrait probability
(Mondrian conformal); and conformalised quantiles of the portrait mixture (CQR: [min(year, mixture's a-quantile),
max(year, its 1-a quantile)] widened by a calibrated margin).

    COINYEAR_HOME=/tmp/d42 python benchmarks/ranges.py --name demo-seed42

About 2 minutes on 2 cores (one TTA pass over ~740 coins).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from coinyear.data import ImageCache, load_arrays
from coinyear.fit import infer_arrays
from coinyear.quality import interval_metrics, mixture_dispersion

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import write_results
from levers import registered_run  # a sibling benchmark script

LEVEL = 0.9


def conformal_quantile(scores: np.ndarray, level: float = LEVEL) -> float:
    """The ceil((n+1)·level)-th smallest score (the largest when n is too small), as `Conformal.quantile`."""
    rank = min(int(np.ceil((len(scores) + 1) * level)), len(scores))
    return float(np.sort(scores)[rank - 1])


def mixture_quantile(portraits: np.ndarray, years: np.ndarray, share: float) -> np.ndarray:
    """Per coin the year below which `share` of its portrait mixture lies."""
    order = np.argsort(years, kind="stable")
    cumulative = np.cumsum(portraits[:, order], axis=1)
    cumulative /= cumulative[:, -1:]
    return years[order][np.minimum((cumulative < share).sum(axis=1), len(years) - 1)]


def answers(scored: dict, years: np.ndarray, year_from, year_to) -> dict[str, np.ndarray]:
    """What a range may read per coin: served year, label midpoint and the candidate difficulties."""
    portraits = scored["portraits"]
    return {"year": scored["year"], "midpoint": (np.asarray(year_from) + np.asarray(year_to)) / 2,
            "spread": scored["spread"], "dispersion": mixture_dispersion(portraits, years),
            "top": portraits.max(axis=1), "portraits": portraits,
            "width": mixture_quantile(portraits, years, 0.95) - mixture_quantile(portraits, years, 0.05),
            "disagreement": np.abs(scored["regression"].mean(axis=(1, 2)) - scored["year"])}


# A range maker: fitted on calibration coins, it returns a function giving (low, high) for other coins.
Maker = Callable[[dict], Callable[[dict], tuple[np.ndarray, np.ndarray]]]


def scaled(difficulty: Callable[[dict, dict], np.ndarray]) -> Maker:
    """Errors divided by a per-coin difficulty (which may read the calibration coins, for a floor)."""
    def fit(calibration: dict):
        q = conformal_quantile(np.abs(calibration["year"] - calibration["midpoint"])
                               / difficulty(calibration, calibration))
        return lambda coins: (coins["year"] - q * difficulty(coins, calibration),
                              coins["year"] + q * difficulty(coins, calibration))
    return fit


def mondrian(bins: int, difficulty: Callable[[dict, dict], np.ndarray]) -> Maker:
    """`scaled`, with one quantile per bin of the top portrait probability (edges: calibration quantiles)."""
    def fit(calibration: dict):
        edges = np.quantile(calibration["top"], np.linspace(0, 1, bins + 1)[1:-1])
        which = np.digitize(calibration["top"], edges)
        scores = np.abs(calibration["year"] - calibration["midpoint"]) / difficulty(calibration, calibration)
        q = np.array([conformal_quantile(scores[which == b]) for b in range(bins)])

        def ranges(coins):
            half = q[np.digitize(coins["top"], edges)] * difficulty(coins, calibration)
            return coins["year"] - half, coins["year"] + half
        return ranges
    return fit


def mixture_cqr(share: float, years: np.ndarray) -> Maker:
    """Conformalised quantiles of the portrait mixture, always holding the served year, widened by a margin."""
    def bounds(coins):
        return (np.minimum(coins["year"], mixture_quantile(coins["portraits"], years, share)),
                np.maximum(coins["year"], mixture_quantile(coins["portraits"], years, 1 - share)))

    def fit(calibration: dict):
        low, high = bounds(calibration)
        margin = conformal_quantile(np.maximum(low - calibration["midpoint"], calibration["midpoint"] - high))
        return lambda coins: (bounds(coins)[0] - margin, bounds(coins)[1] + margin)
    return fit


def variants(years: np.ndarray) -> dict[str, Maker]:
    def floored(key: str, share: float) -> Callable[[dict, dict], np.ndarray]:
        return lambda coins, cal: np.maximum(coins[key], max(float(np.quantile(cal[key], share)), 0.5))

    makers: dict[str, Maker] = {
        "no scale": scaled(lambda coins, cal: np.ones_like(coins["year"])),
        "rotation spread, floored at its median": scaled(floored("spread", 0.5)),
        "**mixture dispersion, floored at its median (served)**": scaled(floored("dispersion", 0.5))}
    for share in (0.0, 0.1, 0.25):
        makers[f"mixture dispersion, floored at its {share:.0%} quantile"] = scaled(floored("dispersion", share))
    for constant in (1, 2, 5, 8):
        makers[f"mixture dispersion + {constant} y"] = scaled(
            lambda coins, cal, c=constant: coins["dispersion"] + c)
    makers["mixture dispersion + rotation spread + 2 y"] = scaled(
        lambda coins, cal: coins["dispersion"] + coins["spread"] + 2)
    makers["mixture dispersion + regression disagreement + 2 y"] = scaled(
        lambda coins, cal: coins["dispersion"] + coins["disagreement"] + 2)
    for constant in (2, 8):
        makers[f"mixture 5-95% width + {constant} y"] = scaled(lambda coins, cal, c=constant: coins["width"] + c)
    for bins in (2, 3):
        makers[f"{bins} bins of top portrait probability, unscaled"] = mondrian(
            bins, lambda coins, cal: np.ones_like(coins["year"]))
        makers[f"{bins} bins of top portrait probability, dispersion + 2 y"] = mondrian(
            bins, lambda coins, cal: coins["dispersion"] + 2)
    for share in (0.05, 0.1, 0.2):
        makers[f"mixture quantiles {share:.0%}-{1 - share:.0%}, conformalised"] = mixture_cqr(share, years)
    return makers


def take(coins: dict, mask: np.ndarray) -> dict:
    return {key: value[mask] for key, value in coins.items()}


def measured(low, high, coins: dict) -> tuple[float, float]:
    """(coverage of the label midpoint, median width)."""
    metrics = interval_metrics(low, high, coins["midpoint"], coins["midpoint"])
    return metrics["coverage"], metrics["median_width"]


def main(argv=None) -> int:
    args, registered, started = registered_run(__doc__, "ranges", argv)
    network, rows, years = registered.pyfunc.model, registered.rows, registered.years
    cache = ImageCache(registered.settings.cache_dir, network.config.image_size, network.config.grayscale)
    coins, types = {}, {}
    for label, index in (("validation", registered.val_index), ("test", registered.test_index)):
        chosen = rows.iloc[index]
        scored = infer_arrays(network, *load_arrays(chosen, cache), with_features=True, with_heads=True)
        coins[label] = answers(scored, years, chosen["year_from"].to_numpy(float), chosen["year_to"].to_numpy(float))
        types[label] = chosen["group"].to_numpy(str)
    validation, test = coins["validation"], coins["test"]
    # the grouped 2-fold check within the validation types
    kinds = np.unique(types["validation"])
    half = np.isin(types["validation"], np.random.default_rng(0).permutation(kinds)[:len(kinds) // 2])

    results = {}
    for label, make in variants(years).items():
        checks = [measured(*make(take(validation, part))(take(validation, ~part)), take(validation, ~part))
                  for part in (half, ~half)]
        results[label] = {"validation_2fold_coverage": float(np.mean([c for c, _ in checks])),
                          "validation_2fold_median_width": float(np.mean([w for _, w in checks])),
                          **dict(zip(("test_coverage", "test_median_width"),
                                     measured(*make(validation)(test), test), strict=True))}
    report = {"model": args.model, "version": registered.split["version"], "split": registered.split,
              "coins": {"validation": len(validation["year"]), "test": len(test["year"])},
              "validation_types": len(kinds), "variants": results}
    lines = [f"## {args.name}: {args.model} (version {registered.split['version']}, seed "
             f"{registered.split['seed']}), 90% ranges calibrated on {len(validation['year'])} validation coins "
             f"({len(kinds)} coin types), reported on {len(test['year'])} test-type coins", "",
             "| range | validation, grouped 2-fold: coverage / median width | test types: coverage / median width |",
             "|---|---:|---:|"]
    lines += [f"| {label} | {100 * r['validation_2fold_coverage']:.1f}% / {r['validation_2fold_median_width']:.1f} y "
              f"| {100 * r['test_coverage']:.1f}% / {r['test_median_width']:.1f} y |" for label, r in results.items()]
    write_results(args.out, args.name, report, lines, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
