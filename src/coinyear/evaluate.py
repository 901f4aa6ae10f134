"""Evaluation stage: regression metrics for dated coins, per-decade errors, and the plots people look at.

Every metric takes predicted years and the label range `[year_from, year_to]`; point metrics use the range
midpoint, `range_mae` counts zero error for a prediction inside the range (labels are type-level ranges).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from coinyear.years import year_label  # noqa: F401 - re-exported: callers date labels from here

TOLERANCES = (5, 10, 50)


def regression_metrics(predicted, year_from, year_to) -> dict[str, float]:
    predicted, year_from, year_to = (np.asarray(a, dtype=float) for a in (predicted, year_from, year_to))
    midpoint = (year_from + year_to) / 2
    error = predicted - midpoint
    outside = np.maximum(year_from - predicted, 0) + np.maximum(predicted - year_to, 0)
    variance = float(np.sum((midpoint - midpoint.mean()) ** 2))
    metrics = {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "r2": float(1 - np.sum(error**2) / variance) if variance > 0 else float("nan"),
        "range_mae": float(np.mean(outside)),
        "median_ae": float(np.median(np.abs(error))),
        "count": float(len(predicted)),
    }
    for tolerance in TOLERANCES:
        metrics[f"within_{tolerance}y"] = float(np.mean(np.abs(error) <= tolerance))
    return metrics


def decade_of(years) -> np.ndarray:
    """Decade label, e.g. 73 -> 70, -27 -> -30 (floor, so BC decades do not merge with AD ones)."""
    return (np.floor(np.asarray(years, dtype=float) / 10) * 10).astype(int)


def per_decade_mae(predicted, year_from, year_to) -> pd.DataFrame:
    midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
    frame = pd.DataFrame({"decade": decade_of(midpoint), "ae": np.abs(np.asarray(predicted, float) - midpoint)})
    return frame.groupby("decade")["ae"].agg(mae="mean", count="size").reset_index()


def decade_confusion(predicted, year_from, year_to) -> pd.DataFrame:
    """Counts of true decade (rows) against predicted decade (columns), over the decades that occur."""
    midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
    # a diverged model can predict absurd years; they land in the edge decades, a century past the labels,
    # instead of asking for a table of millions of empty decades
    predicted = np.clip(np.nan_to_num(np.asarray(predicted, float)), midpoint.min() - 100, midpoint.max() + 100)
    true, pred = decade_of(midpoint), decade_of(predicted)
    lo, hi = min(true.min(), pred.min()), max(true.max(), pred.max())
    decades = list(range(int(lo), int(hi) + 10, 10))
    table = pd.crosstab(pd.Categorical(true, decades), pd.Categorical(pred, decades), dropna=False)
    table.index.name, table.columns.name = "true_decade", "predicted_decade"
    return table


def summarize_folds(fold_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Mean and standard deviation of every metric across folds: `cv_<metric>_mean`, `cv_<metric>_std`."""
    summary = {}
    for key in fold_metrics[0]:
        values = [m[key] for m in fold_metrics if not math.isnan(m[key])]
        summary[f"cv_{key}_mean"] = float(np.mean(values)) if values else float("nan")
        summary[f"cv_{key}_std"] = float(np.std(values)) if values else float("nan")
    return summary


# ------------------------------------------------------------------------------------------------ plots
def plot_loss_curves(histories: dict[str, list[dict]]):
    """One line per fold (or the single run): training loss and validation MAE by epoch."""
    fig, (ax_loss, ax_mae) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label=name)
        if any("val_mae" in h for h in history):
            ax_mae.plot(epochs, [h.get("val_mae", np.nan) for h in history], marker="o", label=name)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_mae.set(title="validation MAE", xlabel="epoch", ylabel="years")
    for axis in (ax_loss, ax_mae):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_predicted_vs_true(predicted, year_from, year_to, title: str = "predicted vs true"):
    midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
    predicted = np.asarray(predicted, float)
    fig, axis = plt.subplots(figsize=(5.5, 5.5))
    axis.errorbar(midpoint, predicted, xerr=[midpoint - year_from, year_to - midpoint], fmt="o", ms=3,
                  alpha=0.4, elinewidth=0.6)
    lo, hi = min(midpoint.min(), predicted.min()) - 5, max(midpoint.max(), predicted.max()) + 5
    axis.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect")
    axis.fill_between([lo, hi], [lo - 10, hi - 10], [lo + 10, hi + 10], color="green", alpha=0.1, label="±10 years")
    axis.set(title=title, xlabel="true year (label range)", ylabel="predicted year", xlim=(lo, hi), ylim=(lo, hi))
    axis.legend()
    axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_decade_confusion(table: pd.DataFrame):
    fig, axis = plt.subplots(figsize=(8, 7))
    values = table.to_numpy()
    axis.imshow(np.log1p(values), cmap="Blues")
    labels = [str(d) for d in table.index]
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    for (i, j), count in np.ndenumerate(values):
        if count:
            axis.text(j, i, str(int(count)), ha="center", va="center", fontsize=6)
    axis.set(title="decade confusion matrix", xlabel="predicted decade", ylabel="true decade")
    fig.tight_layout()
    return fig


def plot_decade_mae(table: pd.DataFrame):
    fig, axis = plt.subplots(figsize=(9, 3.5))
    axis.bar(table["decade"].astype(str), table["mae"])
    for x, (mae, count) in enumerate(zip(table["mae"], table["count"])):
        axis.text(x, mae, f"n={count}", ha="center", va="bottom", fontsize=6)
    axis.set(title="MAE per decade", xlabel="decade", ylabel="MAE (years)")
    axis.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- scoring a model
def score_manifest(model_uri: str, rows: pd.DataFrame, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Predict every row of a validated manifest with any MLflow model, through the same base64 input the
    API takes (so what is scored here is exactly what is served)."""
    import mlflow
    from tqdm.auto import tqdm

    from coinyear.pyfunc import BACK, FRONT, encode_file

    model = mlflow.pyfunc.load_model(model_uri)
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring", disable=not progress, leave=False):
        chunk = rows.iloc[start:start + batch_size]
        frame = pd.DataFrame({FRONT: [encode_file(p) for p in chunk["obverse_path"]],
                              BACK: [encode_file(p) for p in chunk["reverse_path"]]})
        out.append(np.asarray(model.predict(frame), dtype=float).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_model(model_uri: str, rows: pd.DataFrame, progress: bool = False) -> dict:
    """Metrics and per-decade MAE of a model on a validated manifest."""
    predicted = score_manifest(model_uri, rows, progress=progress)
    metrics = regression_metrics(predicted, rows["year_from"], rows["year_to"])
    decades = per_decade_mae(predicted, rows["year_from"], rows["year_to"])
    return {"model": model_uri, "metrics": metrics, "per_decade": decades.to_dict("records")}
