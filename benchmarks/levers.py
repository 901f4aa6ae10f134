"""The post-hoc levers (`coinyear.calibrate`) applied to a model already registered, lever by lever.

Training fits them at its end on its validation coin types; this script fits them with the same functions on the
same validation types of a registered model that was trained without them (the split is the run's own: its
`folds`, `holdout_fraction` and `seed`), then reports each on the test coin types (`data.split_test`), which no
choice sees:

* the network's levers (`calibrate.fit_levers`): the ruler mixture of the rotation-averaged probabilities
  (`ruler_pooled`), the portrait head's temperature and the ruler blend's weight, each alone and together;
* the 90% range (`calibrate.fit_ranges`): recalibrated on the validation types, scaled by the rotation spread (as
  trained), by the portrait mixture's dispersion, or both, and the one chosen on the validation types;
* the portrait flag (`calibrate.portrait_floor`): the feature-distance flag as registered, and with the portrait
  flag at 5% and 10% of the validation coins, as false alarms on the in-span test types (whether it catches coins
  beyond the span is `era_shift.py`'s question).

Every variant is computed from one pass of the network over the validation and test coins (`infer(with_heads)`)
by `model.blend_rulers`, the function the network serves with. Finally the chosen levers are set on the loaded
pyfunc itself (PyTorch; its ONNX graph was exported without them) and the test coins are scored through its
`answers`, the served path: those figures must equal the "all levers" row.

    COINYEAR_HOME=.coinyear python benchmarks/levers.py --name demo

A few minutes on 2 cores (two TTA passes over ~800 coins).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from coinyear import evaluate
from coinyear.calibrate import Heads, fit_levers, fit_ranges, portrait_floor
from coinyear.config import configure_mlflow, get_settings
from coinyear.data import ImageCache, choice_splits, load_arrays, read_manifest
from coinyear.fit import infer_arrays
from coinyear.quality import SCALES, interval_metrics

# isort: split
# this folder's modules: a script's own folder is first on sys.path when it runs
from common import model_parser, write_results


def run_split(settings, model_uri: str) -> dict:
    """The training run's own split recipe: folds, hold-out fraction, seed (the demo's defaults otherwise)."""
    from coinyear.predict import resolve_model_uri

    _, name, version = resolve_model_uri(settings, model_uri)
    params = {}
    if name and version:
        client = mlflow.MlflowClient()
        params = client.get_run(client.get_model_version(name, version).run_id).data.params
    return {"folds": int(params.get("folds", 0)), "holdout_fraction": float(params.get("holdout_fraction", 0.15)),
            "seed": int(params.get("seed", 42)), "version": version}


@dataclass
class Registered:
    """A registered model's pyfunc, its portrait classes (names, median years), the manifest's rows and the
    training run's own split: its training, validation and test coins (row indices)."""

    settings: Any
    split: dict
    pyfunc: Any
    names: list[str]
    years: np.ndarray
    rows: pd.DataFrame
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray


def registered_split(model_uri: str) -> Registered:
    """Load `model_uri` and rebuild its run's split (a hold-out run only: a K-fold model's refit saw every
    validation coin)."""
    settings = get_settings()
    configure_mlflow(settings)
    split = run_split(settings, model_uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    rows = read_manifest(settings.data_dir, settings.min_year, settings.max_year).rows
    splits, test_index = choice_splits(rows, split["folds"], split["holdout_fraction"], split["seed"])
    if len(splits) != 1:
        raise SystemExit("a K-fold model's validation coins were seen by its refit: this script needs a hold-out")
    return Registered(settings, split, pyfunc, [name for name, _ in pyfunc.portraits],
                      np.array([year for _, year in pyfunc.portraits]), rows, splits[0][0], splits[0][1],
                      test_index)


def portrait_labels(rows, names: list[str]) -> np.ndarray:
    """The catalogue portrait as the model's class index, as training labels it (`train.aux_labels`): a named
    class, else the last ("other"); -100 when the catalogue names none."""
    index = {name: i for i, name in enumerate(names[:-1])}
    return np.array([-100 if value == "" else index.get(value, len(names) - 1)
                     for value in evaluate.catalogue_portraits(rows)])


def scored_heads(network, chosen: pd.DataFrame, fronts, backs, names: list[str],
                 with_features: bool = False) -> tuple[Heads, dict]:
    """One scoring pass of the registered network over the `chosen` rows' photos: its raw head outputs with the
    catalogue's labels (`Heads`), and the pass's outputs. Checks the one scoring path: the heads blended with
    the levers as registered give the years the network served."""
    out = infer_arrays(network, fronts, backs, with_features=with_features, with_heads=True)
    heads = Heads(out["regression"], out["logits"], network.portrait_years().numpy(), portrait_labels(chosen, names),
                  chosen["year_from"].to_numpy(float), chosen["year_to"].to_numpy(float))
    assert np.allclose(heads.served(network.config)["year"], out["year"], atol=1e-3)
    return heads, out


def figures(answer: dict, part: Heads, truth, names, low=None, high=None, flagged=None) -> dict:
    """The report's figures of one variant on one set of coins."""
    order = np.argsort(-answer["portraits"], axis=1, kind="stable")[:, :evaluate.PORTRAIT_RANKS]
    ranked = [[names[c] for c in row] for row in order]
    return evaluate.report_metrics(answer["year"], part.year_from, part.year_to, low, high, flagged, truth, ranked,
                                   names)


def registered_run(doc: str, folder: str, argv=None) -> tuple[Any, Registered, float]:
    """A script's command line (`model_parser`), the registered model's split, and the start time."""
    args = model_parser(doc, folder).parse_args(argv)
    started = time.perf_counter()
    return args, registered_split(args.model), started


def main(argv=None) -> int:
    args, registered, started = registered_run(__doc__, "levers", argv)
    settings, split, pyfunc, names, years, rows = (registered.settings, registered.split, registered.pyfunc,
                                                    registered.names, registered.years, registered.rows)
    val_index, test_index = registered.val_index, registered.test_index
    network, quality = pyfunc.model, pyfunc.quality
    config = network.config
    trained = replace(config)  # the levers as registered
    cache = ImageCache(settings.cache_dir, config.image_size, config.grayscale)

    sets, truth, arrays = {}, {}, {}
    for label, index in (("validation", val_index), ("test", test_index)):
        chosen = rows.iloc[index]
        fronts, backs = load_arrays(chosen, cache)
        arrays[label] = (fronts, backs)
        sets[label] = scored_heads(network, chosen, fronts, backs, names, with_features=True)
        truth[label] = evaluate.catalogue_portraits(chosen).to_numpy()
    validation, test = sets["validation"][0], sets["test"][0]

    levers = fit_levers([validation], trained)
    fitted = replace(trained, portrait_temperature=levers.temperature, ruler_pooled=levers.ruler_pooled,
                     ruler_blend=levers.ruler_blend)
    variants = {
        "as registered": trained,
        "+ ruler mixture of the rotation-averaged probabilities": replace(trained, ruler_pooled=True),
        f"+ temperature {levers.temperature:.2f}": replace(trained, portrait_temperature=levers.temperature),
        f"+ both (T {levers.temperature:.2f}, pooled)": replace(trained, portrait_temperature=levers.temperature,
                                                                 ruler_pooled=True),
        f"all fitted (T {levers.temperature:.2f}, {'pooled' if levers.ruler_pooled else 'per rotation'}, "
        f"w {levers.ruler_blend:.1f})": fitted,
    }
    results: dict = {"variants": {}, "ranges": {}, "flags": {}}
    for label, variant in variants.items():
        results["variants"][label] = {"validation": figures(validation.served(variant), validation,
                                                            truth["validation"], names),
                                      "test": figures(test.served(variant), test, truth["test"], names)}

    # the 90% range, on the fitted network's answers: recalibrated per scale on the validation types
    val_answer, test_answer = validation.served(fitted), test.served(fitted)
    registered_low, registered_high = quality.conformal.ranges(test.served(trained), 0.9, years)
    results["ranges"]["as registered (the run's calibration, rotation spread, network as registered)"] = \
        interval_metrics(registered_low, registered_high, test.year_from, test.year_to)
    for by in SCALES:
        conformal, _ = fit_ranges(val_answer, years, validation.year_from, validation.year_to, (by,))
        results["ranges"][f"scaled by {by}"] = interval_metrics(*conformal.ranges(test_answer, 0.9, years),
                                                                test.year_from, test.year_to)
    chosen_ranges, widths = fit_ranges(val_answer, years, validation.year_from, validation.year_to)
    results["ranges"][f"chosen on validation: {chosen_ranges.by}"] = interval_metrics(
        *chosen_ranges.ranges(test_answer, 0.9, years), test.year_from, test.year_to)

    # the flag: false alarms on the in-span test types
    distance_flag = quality.ood.flag(sets["test"][1]["features"])
    results["flags"]["feature distance (as registered)"] = float(distance_flag.mean())
    floors = {}
    for rate in (0.05, 0.10):
        floors[rate] = portrait_floor(val_answer["portraits"], rate)
        unsure = test_answer["portraits"].max(axis=1) < floors[rate]
        results["flags"][f"portrait flag at {rate:.0%} of validation coins (floor {floors[rate]:.3f})"] = \
            float(unsure.mean())
        results["flags"][f"either, portrait flag at {rate:.0%}"] = float((distance_flag | unsure).mean())

    # the served path itself, with the chosen levers set on the loaded pyfunc
    levers.apply(config)
    pyfunc.onnx = None
    quality.conformal = chosen_ranges
    quality.ood.portrait_floor = floors[0.05]
    fronts, backs = (torch.from_numpy(np.asarray(a)).float() / 255 for a in arrays["test"])
    served = pyfunc.answers(pyfunc.score_tensors(fronts, backs, True), 0.9, portraits=evaluate.PORTRAIT_RANKS)
    ranked = [[pick["portrait"] for pick in picks] for picks in served["portraits"]]
    results["served"] = evaluate.report_metrics(served["year"], test.year_from, test.year_to, served["low"],
                                                served["high"], served["out_of_distribution"], truth["test"], ranked,
                                                names)
    assert np.allclose(served["year"], test_answer["year"], atol=1e-3), "the served path must equal the levers'"

    report = {"model": args.model, "version": split["version"], "split": split,
              "coins": {"validation": len(val_index), "test": len(test_index)},
              "levers": {"temperature": levers.temperature, "ruler_pooled": levers.ruler_pooled,
                         "ruler_blend": levers.ruler_blend, "conformal_by": chosen_ranges.by,
                         "portrait_floor_5pct": floors[0.05], "portrait_floor_10pct": floors[0.10],
                         **levers.validation, **widths}, **results}
    lines = [f"## {args.name}: {args.model} (version {split['version']}), levers fitted on {len(val_index)} "
             f"validation-type coins, reported on {len(test_index)} test-type coins", "",
             "| network | val MAE | test MAE | test ±10 y | test portrait top-1 | top-3 |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, measured in results["variants"].items():
        v, t = measured["validation"], measured["test"]
        lines.append(f"| {label} | {v['mae']:.2f} | {t['mae']:.2f} | {100 * t['within_10y']:.1f}% | "
                     f"{100 * t['portrait_top1']:.1f}% | {100 * t['portrait_top3']:.1f}% |")
    lines += ["", "| 90% range on the test types | coverage | median width |", "|---|---:|---:|"]
    lines += [f"| {label} | {100 * m['coverage']:.1f}% | {m['median_width']:.1f} y |"
              for label, m in results["ranges"].items()]
    lines += ["", "| flag | in-span test coins flagged (false alarms) |", "|---|---:|"]
    lines += [f"| {label} | {100 * share:.1f}% |" for label, share in results["flags"].items()]
    s = results["served"]
    lines += ["", f"Served (the pyfunc's `answers`, all levers, range by {chosen_ranges.by}, portrait flag at 5%): "
              f"MAE {s['mae']:.2f}, within ±10 y {100 * s['within_10y']:.1f}%, portrait top-1 "
              f"{100 * s['portrait_top1']:.1f}% / top-3 {100 * s['portrait_top3']:.1f}%, 90% range coverage "
              f"{100 * s['interval90_coverage']:.1f}% / median width {s['interval90_median_width']:.1f} y, "
              f"flagged {100 * s['ood_flagged']:.1f}%."]
    write_results(args.out, args.name, report, lines, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
