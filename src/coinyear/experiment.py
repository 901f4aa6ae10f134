"""One training experiment, untracked: set the test coin types aside, cross-validate (grouped K-fold) or hold out
one grouped validation split of the other types, fit the model to serve, calibrate its ranges and its
out-of-distribution flag, and score it once on the test types (`train_on_manifest`). `coinyear.train` tracks it
in MLflow; benchmarks call it directly.

Metric names: `val_*` are measured on validation coins (out-of-fold with K folds, else the validation hold-out),
the coins every choice is made on (the early-stopping epoch, the conformal calibration, the OOD threshold), so
they flatter the model a little; `test_*` (`evaluate.report_metrics`) are the served model's on the test coin
types, which no choice and no fit ever saw: the headline numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from coinyear import evaluate
from coinyear.augment import make_augmentation
from coinyear.calibrate import BLENDS, Heads, disagreement_ceiling, fit_levers, fit_ranges, portrait_floor
from coinyear.config import AUX_COLUMNS
from coinyear.data import ImageCache, Manifest, choice_splits, load_arrays, mapped_arrays
from coinyear.fit import CoinDataset, best_epoch, fit, infer_arrays, process_rank, resolve_device
from coinyear.model import CoinEnsemble, DualImageRegressor, as_ensemble, build_model
from coinyear.quality import SCALES, Conformal, FeatureDistance, Quality
from coinyear.recipe import TrainConfig
from coinyear.rulers import portrait_labels
from coinyear.years import training_span

log = logging.getLogger(__name__)

# Hold-out coins needed to calibrate the out-of-distribution flag on them alone (see fit_quality).
MIN_FLAG_CALIBRATION = 100

OTHER_CLASS = "other"  # the auxiliary class of every value outside the `top` commonest


def aux_labels(rows: pd.DataFrame, top: int, columns: tuple[str, ...] = AUX_COLUMNS,
               among: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Class indices of the auxiliary `columns` present and each column's class names: the `top` most common
    values, then "other". "portrait" is read from `obverse_desc` when the rows have no such column (-100 = no
    label: ignored). `among` (row positions, default all) are the rows whose values pick the classes: the
    training run passes the non-test rows, so the test coin types do not choose the model's classes."""
    labels, classes = {}, {}
    for column in columns:
        if column == "portrait" and column not in rows.columns and "obverse_desc" in rows.columns:
            rows = rows.assign(portrait=portrait_labels(rows["obverse_desc"]).to_numpy())
        if column not in rows.columns:
            continue
        values = rows[column].fillna("").astype(str).str.strip()
        counted = values if among is None else values.iloc[among]
        common = [v for v in counted[counted != ""].value_counts().index[:top]]
        index = {value: i for i, value in enumerate(common)}
        labels[column] = np.array([-100 if v == "" else index.get(v, len(common)) for v in values])
        classes[column] = [*common, OTHER_CLASS]
    return labels, classes



def year_normalisation(year_from, year_to) -> tuple[float, float]:
    midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
    return float(np.median(midpoint)), float(max(np.std(midpoint), 1.0))


def new_model(config: TrainConfig, year_from, year_to, aux: dict[str, np.ndarray] | None = None,
              index: np.ndarray | None = None) -> DualImageRegressor:
    """A fresh model for training on `year_from`/`year_to` (the training rows' years). With a portrait head,
    each portrait class gets the median year of its training coins (`aux` labels of all rows, `index` = the
    training rows), the ruler mixture the served year blends in (ModelConfig.ruler_blend)."""
    torch.manual_seed(config.seed)
    center, scale = year_normalisation(year_from, year_to)
    model = build_model(config.model, year_center=center, year_scale=scale)
    if aux and "portrait" in aux and "portrait" in model.aux_heads:
        labels = aux["portrait"] if index is None else aux["portrait"][index]
        midpoints = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
        overall = float(np.median(midpoints))
        years = [float(np.median(midpoints[labels == c])) if (labels == c).any() else overall
                 for c in range(len(model.portrait_years))]
        model.portrait_years.copy_(torch.tensor(years))
    return model


@dataclass
class TrainingResult:
    model: DualImageRegressor | CoinEnsemble | None  # what is served; None when no final model was asked for
    metrics: dict[str, float]
    histories: dict[str, list[dict]]
    # coin_id, year_from, year_to, predicted, spread, fold (out-of-fold or validation); predicted_no_tta with TTA
    predictions: pd.DataFrame
    seconds: float
    fold_models: list[DualImageRegressor] = field(default_factory=list)
    quality: Quality | None = None
    # the served model on the test coin types: coin_id, year_from, year_to, predicted, spread, low, high (its 90%
    # range), portrait (the catalogue's, "" when none) and portrait_1..3 (its likeliest classes, with a portrait
    # head); empty without a final model or without test rows
    test_predictions: pd.DataFrame = field(default_factory=pd.DataFrame)


def serving_model(members: list[DualImageRegressor], tta_angles: tuple[float, ...]):
    """One plain regressor when there is nothing to average, else the ensemble over members and rotations."""
    if len(members) == 1 and tta_angles in ((), (0.0,)):
        return members[0].eval()
    return CoinEnsemble(members, tta_angles or (0.0,)).eval()


def fit_quality(model, fronts, backs, groups, predictions: pd.DataFrame, config: TrainConfig,
                device: torch.device, unseen=None, index: np.ndarray | None = None,
                portraits: np.ndarray | None = None, disagreement: np.ndarray | None = None,
                predicted_rows: np.ndarray | None = None) -> Quality:
    """Interval calibration from the out-of-fold (or validation) predictions; the OOD reference and threshold
    from the served model's out-of-distribution features of every coin, or of the rows `index` (positions in
    the arrays): the training run passes the non-test rows, so a test coin is never its own neighbour.

    Those features are member 0's on the unrotated photos (what the served model compares), so one plain
    pass per coin gives them: scoring every coin with the rotation TTA as well would cost 5 passes more for
    years nobody reads. `unseen` (rows the served model never trained on: the validation hold-out) calibrate
    the flag's threshold when given; it and `groups` count the reference rows (those of `index`).

    `portraits` (the served portrait probabilities of the `predictions` rows), with `config.calibrate`, let the
    range's scale be chosen among SCALES (`calibrate.fit_ranges`; the portrait years are the served model's) and
    set the portrait flag's floor at `config.portrait_flag_rate` of those coins; their view `disagreement`
    sets the view flag's ceiling at `config.view_flag_rate` of them and, with `predicted_rows` (the positions of
    the `predictions` rows among the reference rows), the era-shift score's scales and ceiling at
    `config.shift_flag_rate` (`FeatureDistance.fit_shift`)."""
    scaled = config.conformal_scaled and len(config.tta_angles) >= 2
    years = np.array([year for _, year in as_ensemble(model).portrait_classes()])
    if scaled and config.calibrate and portraits is not None and len(years) == portraits.shape[1]:
        scored = {"year": predictions["predicted"].to_numpy(float), "spread": predictions["spread"].to_numpy(float),
                  "portraits": portraits}
        conformal, _ = fit_ranges(scored, years, predictions["year_from"], predictions["year_to"], SCALES)
    else:
        conformal = Conformal.fit(predictions["predicted"], predictions["year_from"], predictions["year_to"],
                                  predictions["spread"] if scaled else None)
    plain = model.regressors[0] if isinstance(model, CoinEnsemble) else model
    reference = infer_arrays(plain, fronts, backs, device=device, with_features=True, index=index)
    ood = FeatureDistance.fit(reference["features"], groups, quantile=config.ood_quantile, calibration=unseen)
    if config.calibrate and portraits is not None and len(portraits) >= MIN_FLAG_CALIBRATION:
        # as the distance's threshold: a quantile of fewer coins is mostly noise, then no portrait flag
        ood.portrait_floor = portrait_floor(portraits, config.portrait_flag_rate)
    if config.calibrate and disagreement is not None and len(disagreement) >= MIN_FLAG_CALIBRATION:
        ood.disagreement_ceiling = disagreement_ceiling(disagreement, config.view_flag_rate)
        if predicted_rows is not None and config.shift_flag_rate > 0:
            ood.fit_shift(reference["embedding"], groups, predicted_rows, disagreement, config.shift_flag_rate)
    model.cpu()
    return Quality(conformal, ood)


def score_test_rows(model, quality: Quality, rows: pd.DataFrame, fronts, backs, index: np.ndarray,
                    device: torch.device) -> pd.DataFrame:
    """The served model (`model` with its `quality`) on the rows `index`, as `evaluate.table_report` reads it:
    coin_id, year_from, year_to, predicted, spread, low and high (the 90% range), out_of_distribution,
    portrait (the catalogue's) and, with a named portrait head, portrait_1..3 (the likeliest classes)."""
    scored = infer_arrays(model, fronts, backs, device=device, index=index, with_features=True)
    model.cpu()
    years = np.array([year for _, year in as_ensemble(model).portrait_classes()])
    low, high = quality.conformal.ranges(scored, evaluate.INTERVAL_LEVEL, years)
    chosen = rows.iloc[index]
    table = pd.DataFrame({"coin_id": chosen["coin_id"].to_numpy(), "year_from": chosen["year_from"].to_numpy(),
                          "year_to": chosen["year_to"].to_numpy(), "predicted": scored["year"],
                          "spread": scored["spread"], "low": low, "high": high,
                          "out_of_distribution": quality.ood.flag(scored["features"],
                                                                  portraits=scored.get("portraits"),
                                                                  disagreement=scored.get("disagreement"),
                                                                  embedding=scored.get("embedding")),
                          "portrait": evaluate.catalogue_portraits(chosen).to_numpy()})
    if "portraits" in scored:
        names = [name for name, _ in as_ensemble(model).portrait_classes()]
        order = np.argsort(-scored["portraits"], axis=1, kind="stable")[:, :evaluate.PORTRAIT_RANKS]
        for rank in range(order.shape[1]):
            table[f"portrait_{rank + 1}"] = [names[c] for c in order[:, rank]]
    return table


def train_on_manifest(manifest: Manifest, config: TrainConfig, cache_dir: Path, on_metrics=None,
                      final_model: bool = True, tensor_dir: Path | None = None,
                      trace: list | None = None) -> TrainingResult:
    """Set the test coin types aside, cross-validate (folds >= 2) or hold out one grouped validation split of
    the rest, then produce the model to register and score it on the test types.

    The splits are `data.choice_splits`: no fold, no refit, no early stopping, calibration or class choice
    ever sees a test coin type. With K folds, the `val_*` metrics are the out-of-fold ones and the final model
    is fit on all non-test rows for the median best epoch (or, with `ensemble`, is the K fold models
    averaged); with a hold-out, the final model is the one early-stopped on the validation rows. Predictions
    use the rotation TTA of the served model, and the interval calibration and OOD detector are fitted for it
    on validation rows. The final model is then scored once on the test rows: `test_*` metrics
    (`evaluate.report_metrics`) and `TrainingResult.test_predictions`. `final_model=False` stops after the
    folds (benchmarks; no test metrics). `on_metrics(dict, step)` receives every metric as it is produced
    (MLflow logging).

    With `tensor_dir` the images are read from memory-mapped tensor files there (built once, see
    `data.mapped_arrays`) instead of being loaded into memory. Inside a torch.distributed group every rank
    calls this: the hold-out model is trained by all ranks (`fit`), and rank 0 alone goes on to predict,
    calibrate and return the model (the other ranks return no model). K-fold is refused there: the folds
    and the refit would be K+1 distributed fits in a row, which this path does not do.
    """
    from coinyear.quality import cross_conformal, interval_metrics

    started = time.perf_counter()
    rows = manifest.rows
    if len(rows) < 4:
        raise ValueError(f"only {len(rows)} valid rows: too few to train")
    rank, world = process_rank()
    if world > 1 and config.folds >= 2:
        raise ValueError("distributed training runs one grouped hold-out; K-fold (folds >= 2) runs in one "
                         "process: drop --folds or --distributed")
    device = resolve_device(config.device)
    splits, test_index = choice_splits(rows, config.folds, config.holdout_fraction, config.seed)
    usable = np.setdiff1d(np.arange(len(rows)), test_index)  # every non-test row, in row order
    aux, classes = (aux_labels(rows, config.aux_top, config.aux_heads, among=usable) if config.aux_weight > 0
                    else ({}, {}))
    if classes:
        config = replace(config, model=replace(config.model, aux_names=classes,
                                               aux_classes={name: len(names) for name, names in classes.items()}))
    cache = ImageCache(cache_dir, config.model.image_size, config.model.grayscale)
    if tensor_dir is not None:
        fronts, backs = mapped_arrays(rows, cache, tensor_dir, progress=rank == 0)
    else:
        fronts, backs = load_arrays(rows, cache, progress=True)
    year_from, year_to = rows["year_from"].to_numpy(), rows["year_to"].to_numpy()
    augment = make_augmentation(config)
    emit = on_metrics or (lambda metrics, step=None: None)

    def subset(index, with_augment):
        return CoinDataset(fronts, backs, year_from, year_to, augment if with_augment else None, aux, index=index)

    predictions, spread, plain = (np.full(len(rows), np.nan) for _ in range(3))
    fold_of = np.full(len(rows), -1)
    heads: list[tuple[np.ndarray, Heads]] = []  # per fold: its validation rows' raw head outputs (the levers)
    val_portraits: dict[int, np.ndarray] = {}  # row -> the served portrait probabilities
    val_disagreement: dict[int, float] = {}  # row -> the portrait head's disagreement between the rotated views
    histories, fold_metrics, fold_models = {}, [], []
    best_epochs: list[int] = []
    for fold, (train_index, val_index) in enumerate(tqdm(splits, desc="folds", unit="fold", disable=len(splits) == 1)):
        name = f"fold{fold + 1}" if len(splits) > 1 else "holdout"  # "holdout": the validation rows
        model = new_model(config, year_from[train_index], year_to[train_index], aux, train_index)
        history = fit(model, subset(train_index, True), config, subset(val_index, False), name=name,
                      on_epoch=lambda r, n=name: emit({f"{n}/{k}": v for k, v in r.items()
                                                       if isinstance(v, float)}, r["epoch"]), trace=trace)
        histories[name], best_epochs = history, [*best_epochs, best_epoch(history)]
        if rank != 0:
            continue
        served = serving_model([model], config.tta_angles)
        inferred = infer_arrays(served, fronts, backs, device=device, index=val_index, with_heads=True)
        predictions[val_index], spread[val_index] = inferred["year"], inferred["spread"]
        if "logits" in inferred:
            heads.append((val_index, Heads(inferred["regression"], inferred["logits"],
                                           as_ensemble(served).portrait_years().numpy(),
                                           aux["portrait"][val_index], year_from[val_index], year_to[val_index])))
        if config.tta_angles:
            plain[val_index] = infer_arrays(model, fronts, backs, device=device, index=val_index)["year"]
        model.cpu()
        fold_of[val_index] = fold + 1
        metrics = evaluate.regression_metrics(predictions[val_index], year_from[val_index], year_to[val_index])
        fold_metrics.append(metrics)
        emit({f"{name}/{k}": v for k, v in metrics.items()})
        log.info("%s: MAE %.2f, within 10y %.1f%%", name, metrics["mae"], 100 * metrics["within_10y"])
        fold_models.append(model)
    if rank != 0:
        return TrainingResult(None, {}, histories, pd.DataFrame(), time.perf_counter() - started)

    metrics = {}
    if heads and config.calibrate:
        # the post-hoc levers, on the validation coins (`coinyear.calibrate`); every model shares config.model
        blends = BLENDS if config.fit_ruler_blend else (config.model.ruler_blend,)
        levers = fit_levers([part for _, part in heads], config.model, blends=blends)
        levers.apply(config.model)
        metrics.update({"portrait_temperature": levers.temperature, "ruler_pooled": float(levers.ruler_pooled),
                        "ruler_blend": levers.ruler_blend, **levers.validation})
        log.info("levers fitted on the validation coins: temperature %.2f, ruler %s, blend %.1f (val MAE %.2f -> "
                 "%.2f)", levers.temperature, "pooled" if levers.ruler_pooled else "per rotation",
                 levers.ruler_blend, levers.validation["val_mae_as_trained"], levers.validation["val_mae_levers"])
    for val_index, part in heads:  # the validation answers as now served
        answer = part.served(config.model)
        predictions[val_index], spread[val_index] = answer["year"], answer["spread"]
        val_portraits.update(zip(val_index.tolist(), answer["portraits"]))
        val_disagreement.update(zip(val_index.tolist(), answer["disagreement"]))
    evaluated = fold_of > 0
    overall = evaluate.regression_metrics(predictions[evaluated], year_from[evaluated], year_to[evaluated])
    metrics.update({f"val_{k}": v for k, v in overall.items()})
    if config.tta_angles:
        metrics["val_mae_no_tta"] = evaluate.regression_metrics(
            plain[evaluated], year_from[evaluated], year_to[evaluated])["mae"]
    table = pd.DataFrame({"coin_id": rows["coin_id"], "year_from": year_from, "year_to": year_to,
                          "predicted": predictions, "spread": spread, "fold": fold_of})
    if config.tta_angles:
        table["predicted_no_tta"] = plain
    table = table[evaluated].reset_index(drop=True)
    if len(splits) > 1:
        metrics.update(evaluate.summarize_folds(fold_metrics))
        scaled = config.conformal_scaled and len(config.tta_angles) >= 2
        low, high = cross_conformal(table["predicted"], table["year_from"], table["year_to"], table["fold"], 0.9,
                                    table["spread"] if scaled else None)
        metrics.update({f"val_interval90_{k}": v for k, v in
                        interval_metrics(low, high, table["year_from"], table["year_to"]).items()})

    final, quality, test_table = None, None, pd.DataFrame()
    if final_model:
        if len(splits) > 1 and not config.ensemble:
            final_epochs = int(np.median(best_epochs)) if config.early_stopping else config.epochs
            refit = new_model(config, year_from[usable], year_to[usable], aux, usable)
            histories["final"] = fit(refit, subset(usable, True), config, None, name="final",
                                     epochs=final_epochs,
                                     on_epoch=lambda r: emit({f"final/{k}": v for k, v in r.items()
                                                              if isinstance(v, float)}, r["epoch"]))
            metrics["final_epochs"] = float(final_epochs)
            members = [refit]
        else:
            members = fold_models
        final = serving_model(members, config.tta_angles)
        # what the served model knows, recorded with it (/version, MLmodel metadata, the out-of-span words)
        trained = usable if len(splits) > 1 else splits[0][0]
        final.config.span = training_span(year_from[trained], year_to[trained],
                                          [(name, year) for name, year in as_ensemble(final).portrait_classes()
                                           if name != OTHER_CLASS])
        # a hold-out model never saw its validation coins: they calibrate the flag (K-fold finals saw every
        # non-test coin); a quantile of fewer than MIN_FLAG_CALIBRATION scores is mostly noise: then every
        # reference coin's. The reference is the non-test coins (positions below count those rows).
        unseen = (np.searchsorted(usable, splits[0][1])
                  if len(splits) == 1 and len(splits[0][1]) >= MIN_FLAG_CALIBRATION else None)

        def in_table_order(by_row: dict[int, Any]) -> np.ndarray | None:
            """Per-row validation answers stacked in the order of `table`'s rows; None unless every row has one."""
            if not by_row or len(by_row) != int(evaluated.sum()):
                return None
            return np.stack([by_row[int(i)] for i in np.flatnonzero(evaluated)])

        portraits, disagreement = in_table_order(val_portraits), in_table_order(val_disagreement)
        quality = fit_quality(final, fronts, backs, rows["group"].to_numpy()[usable], table, config, device, unseen,
                              index=usable, portraits=portraits, disagreement=disagreement,
                              predicted_rows=np.searchsorted(usable, np.flatnonzero(evaluated)))
        metrics["portrait_floor"] = quality.ood.portrait_floor
        metrics["disagreement_ceiling"] = quality.ood.disagreement_ceiling
        metrics["shift_ceiling"] = quality.ood.shift_ceiling
        metrics["conformal_q90"] = quality.conformal.quantile(0.9)
        metrics["ood_threshold"] = quality.ood.threshold
        if len(test_index):
            test_table = score_test_rows(final, quality, rows, fronts, backs, test_index, device)
            names = [name for name, _ in as_ensemble(final).portrait_classes()]
            metrics.update({f"test_{k}": v for k, v in evaluate.table_report(test_table, names).items()})
            log.info("test coin types: MAE %.2f, within 10y %.1f%% (%d coins)", metrics["test_mae"],
                     100 * metrics["test_within_10y"], len(test_index))
        else:
            log.warning("no row of a test coin type: this run reports no test_* metrics")
    metrics["train_seconds"] = time.perf_counter() - started
    emit(metrics)
    return TrainingResult(final, metrics, histories, table, metrics["train_seconds"], fold_models, quality,
                          test_table)

