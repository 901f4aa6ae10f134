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


# ------------------------------------------------------------------------------------------- the report
INTERVAL_LEVEL = 0.9  # the range level the report measures
PORTRAIT_RANKS = 3  # the report's portrait top-k
POOLED = "other"  # train.OTHER_CLASS: the rarer portraits pooled in one class, a name nobody can check


def catalogue_portraits(rows: pd.DataFrame) -> pd.Series:
    """Each row's portrait as the catalogue names it ("" when none): a `portrait` column, else read from
    `obverse_desc` (coinyear.rulers), else "" for every row."""
    from coinyear.rulers import portrait_labels

    if "portrait" in rows.columns:
        return rows["portrait"].fillna("").astype(str).str.strip().reset_index(drop=True)
    if "obverse_desc" in rows.columns:
        return portrait_labels(rows["obverse_desc"])
    return pd.Series([""] * len(rows), dtype=object)


def portrait_metrics(truth, ranked, predicted, year_from, year_to, classes) -> dict[str, float]:
    """Portrait recognition on the coins whose catalogue portrait (`truth`) is one of the model's named
    portrait `classes` (the pooled "other" class names nobody, so its coins are left out): top-1 and top-k
    accuracy of `ranked` (per coin the class names, likeliest first; k = PORTRAIT_RANKS), and the year MAE of
    those coins when the likeliest portrait is right and when it is wrong. NaN where no coin qualifies."""
    named = {str(name) for name in classes or ()} - {POOLED, ""}
    truth = [str(value) if isinstance(value, str) else "" for value in truth]
    eligible = np.array([value in named for value in truth], dtype=bool)
    midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
    error = np.abs(np.asarray(predicted, float) - midpoint)
    top1 = np.array([bool(picks) and picks[0] == value for value, picks in zip(truth, ranked)], dtype=bool)
    topk = np.array([value in list(picks)[:PORTRAIT_RANKS] for value, picks in zip(truth, ranked)], dtype=bool)
    right, wrong = eligible & top1, eligible & ~top1

    def mean(values, mask) -> float:
        return float(np.mean(values[mask])) if mask.any() else float("nan")

    return {"portrait_count": float(eligible.sum()), "portrait_top1": mean(top1, eligible),
            f"portrait_top{PORTRAIT_RANKS}": mean(topk, eligible),
            "mae_portrait_right": mean(error, right), "mae_portrait_wrong": mean(error, wrong),
            "portrait_right_count": float(right.sum()), "portrait_wrong_count": float(wrong.sum())}


def report_metrics(predicted, year_from, year_to, low=None, high=None, flagged=None, portraits=None,
                   ranked=None, classes=None) -> dict[str, float]:
    """What the report says of a model on a set of coins (the test coin types): `regression_metrics`; with a
    range (`low`, `high` at INTERVAL_LEVEL) its coverage and width (`interval90_*`); with the OOD flag
    (`flagged`) the share flagged (`ood_flagged`); with the catalogue portraits and the model's ranked
    portrait classes, `portrait_metrics`."""
    from coinyear.quality import interval_metrics

    metrics = regression_metrics(predicted, year_from, year_to)
    if low is not None and high is not None:
        level = round(100 * INTERVAL_LEVEL)
        metrics.update({f"interval{level}_{k}": v for k, v in interval_metrics(low, high, year_from, year_to).items()})
    if flagged is not None:
        metrics["ood_flagged"] = float(np.mean(np.asarray(flagged, bool))) if len(flagged) else float("nan")
    if portraits is not None and ranked is not None and classes:
        metrics.update(portrait_metrics(portraits, ranked, predicted, year_from, year_to, classes))
    return metrics


def table_report(table: pd.DataFrame, classes: list[str] | None = None) -> dict[str, float]:
    """`report_metrics` of a prediction table: predicted, year_from, year_to and, when present, low and high,
    out_of_distribution, portrait (the catalogue's) and portrait_1.. (the model's likeliest classes, likeliest
    first); `classes` are the model's portrait classes."""
    ranks = sorted((c for c in table.columns if c.startswith("portrait_") and c[9:].isdigit()),
                   key=lambda c: int(c[9:]))
    ranked = [list(picks) for picks in table[ranks].itertuples(index=False)] if ranks else None
    return report_metrics(table["predicted"], table["year_from"], table["year_to"], table.get("low"),
                          table.get("high"), table.get("out_of_distribution"), table.get("portrait"), ranked, classes)


REPORT_LINES = (  # (metric, label, how it is shown)
    ("count", "coins scored", "count"), ("mae", "MAE", "years"), ("median_ae", "median error", "years"),
    ("within_10y", "within ±10 years", "share"), ("within_50y", "within ±50 years", "share"),
    ("range_mae", "error outside the catalogue range", "years"),
    ("portrait_count", "coins with a portrait the model names", "count"),
    ("portrait_top1", "portrait right (top 1)", "share"), (f"portrait_top{PORTRAIT_RANKS}",
                                                           f"portrait in the top {PORTRAIT_RANKS}", "share"),
    ("mae_portrait_right", "MAE when the top portrait is right", "years"),
    ("mae_portrait_wrong", "MAE when the top portrait is wrong", "years"),
    (f"interval{round(100 * INTERVAL_LEVEL)}_coverage", f"{round(100 * INTERVAL_LEVEL)}% range holds the year",
     "share"),
    (f"interval{round(100 * INTERVAL_LEVEL)}_median_width", f"{round(100 * INTERVAL_LEVEL)}% range median width",
     "years"),
    ("ood_flagged", "flagged as unlike the training coins", "share"),
)


def format_report(metrics: dict[str, float], title: str = "") -> str:
    """The report as a readable table: one line per metric present (REPORT_LINES), '-' where it is NaN."""
    lines = [title] if title else []
    width = max(len(label) for _, label, _ in REPORT_LINES)
    for key, label, kind in REPORT_LINES:
        if key not in metrics:
            continue
        value = metrics[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            shown = "-"
        elif kind == "count":
            shown = f"{int(value)}"
        elif kind == "share":
            shown = f"{100 * value:.1f} %"
        else:
            shown = f"{value:.2f} years"
        counted = {"mae_portrait_right": "portrait_right_count", "mae_portrait_wrong": "portrait_wrong_count"}
        if key in counted and counted[key] in metrics and shown != "-":
            coins = int(metrics[counted[key]])
            shown += f"  ({coins} coin{'' if coins == 1 else 's'})"
        lines.append(f"  {label:<{width}}  {shown}")
    return "\n".join(lines)


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
def score_table(model_uri: str, rows: pd.DataFrame, batch_size: int = 64,
                progress: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Score every row of a validated manifest with any MLflow model, through the same base64 input the API
    takes (so what is scored here is exactly what is served): (the table `table_report` reads, the model's
    portrait classes). A coinyear model that can is asked for its INTERVAL_LEVEL range and OOD flag
    (`params.interval`) and its PORTRAIT_RANKS likeliest portraits (`params.portraits`); any other model
    gives the years alone."""
    import mlflow
    from tqdm.auto import tqdm

    from coinyear.pyfunc import BACK, FRONT, encode_file

    model = mlflow.pyfunc.load_model(model_uri)
    try:
        python_model = model.unwrap_python_model()
    except Exception:  # noqa: BLE001 - not a Python model (another flavour): it answers plain years
        python_model = None
    classes = [str(name) for name, _ in (getattr(python_model, "portraits", None) or [])]
    params: dict = {}
    if classes:
        params["portraits"] = min(PORTRAIT_RANKS, len(classes))
    if getattr(python_model, "quality", None) is not None:
        params["interval"] = INTERVAL_LEVEL
    parts = []
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring", disable=not progress, leave=False):
        chunk = rows.iloc[start:start + batch_size]
        frame = pd.DataFrame({FRONT: [encode_file(p) for p in chunk["obverse_path"]],
                              BACK: [encode_file(p) for p in chunk["reverse_path"]]})
        answer = model.predict(frame, params=params) if params else model.predict(frame)
        part = pd.DataFrame({"year_from": chunk["year_from"].to_numpy(), "year_to": chunk["year_to"].to_numpy()})
        if isinstance(answer, pd.DataFrame) and "year" in answer:
            part["predicted"] = answer["year"].to_numpy(float)
            for column in ("low", "high", "out_of_distribution"):
                if column in answer:
                    part[column] = answer[column].to_numpy()
            if "portraits" in answer:
                for rank in range(params["portraits"]):
                    part[f"portrait_{rank + 1}"] = [picks[rank]["portrait"] if len(picks) > rank else ""
                                                    for picks in answer["portraits"]]
        else:
            part["predicted"] = np.asarray(answer, dtype=float).reshape(-1)
        parts.append(part)
    columns = ["year_from", "year_to", "predicted"]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    table.insert(0, "coin_id", rows["coin_id"].to_numpy() if "coin_id" in rows else np.arange(len(rows)))
    table["portrait"] = catalogue_portraits(rows).to_numpy()
    return table, classes


def score_manifest(model_uri: str, rows: pd.DataFrame, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """The predicted year of every row of a validated manifest (`score_table`'s `predicted`)."""
    return score_table(model_uri, rows, batch_size, progress)[0]["predicted"].to_numpy(float)


def evaluate_model(model_uri: str, rows: pd.DataFrame, progress: bool = False) -> dict:
    """The report of a model on a validated manifest: `table_report` metrics (MAE, ±10 years, portrait top-1
    and top-3, MAE with the top portrait right and wrong, range coverage and width when the model has them),
    per-decade MAE and the model's portrait classes."""
    table, classes = score_table(model_uri, rows, progress=progress)
    metrics = table_report(table, classes)
    decades = per_decade_mae(table["predicted"], table["year_from"], table["year_to"])
    return {"model": model_uri, "metrics": metrics, "per_decade": decades.to_dict("records"),
            "portrait_classes": classes}
