"""Monitoring job: `coinyear monitor` turns the inference log into daily health metrics per model version.

For each (date, model_version) of the `inference_log` table: request volume, error rate and latency percentiles
(per HTTP request: a request of several coins logs one row per coin, all with its status and latency), the coins
scored (`rows`),
the distribution of predicted years, drift measured as the population stability index (PSI) of the predictions
against the version's own predictions on its reference coins (the out-of-fold or hold-out predictions its
training run logged as `evaluation/predictions.csv`) and of two simple photo statistics (brightness and contrast)
against the training photos, and the MAE on the rows experts corrected (`feedback`). The rows are appended to
the `monitoring` Delta table with `computed_at`; readers keep the latest `computed_at` per (date, model_version).

The predictions are compared with the model's own predictions, not with the labels: a regressor's predictions
are narrower than the labels, so against the labels every day would read as drift, the first one included.
PSI reads: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 the inputs or outputs no longer look like training;
`drift_alerts` names the PSI columns above COINYEAR_MONITOR_PSI_ALERT (the threshold the UI warns at too).
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import ImageOps

from coinyear import registry
from coinyear.config import Settings
from coinyear.data import ImageError, decode_side, read_manifest
from coinyear.lake import open_lake
from coinyear.lake.tables import FEEDBACK, INFERENCE_LOG, MONITORING, TRAINING_DATA, Lake

log = logging.getLogger(__name__)

# Photo statistics are computed on a sample: enough for a stable PSI, bounded cost on a busy day.
IMAGE_SAMPLE = 300
STAT_SIZE = 64
PSI_EPSILON = 1e-4
NO_MODEL = "none"
# what training logs with each run: the predictions on the coins it held out (or out-of-fold), column `predicted`
REFERENCE_PREDICTIONS = "evaluation/predictions.csv"
PSI_COLUMNS = ("prediction_psi", "brightness_psi", "contrast_psi")


# ------------------------------------------------------------------------------------------- statistics
def psi(reference, observed, bins: int = 10) -> float:
    """Population stability index of `observed` against `reference`, on the reference's quantile bins."""
    reference = np.asarray(reference, dtype=float)
    observed = np.asarray(observed, dtype=float)
    reference, observed = reference[np.isfinite(reference)], observed[np.isfinite(observed)]
    if len(reference) == 0 or len(observed) == 0:
        return float("nan")
    # about ten observations per bin at least: with fewer, empty bins alone would read as drift
    bins = min(bins, max(2, len(observed) // 10))
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, observed, side="right"), minlength=len(edges) + 1)
    expected = np.maximum(expected / expected.sum(), PSI_EPSILON)
    actual = np.maximum(actual / actual.sum(), PSI_EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def image_stats(source: bytes | str | Path) -> tuple[float, float]:
    """(brightness, contrast) of a front photo: mean and standard deviation of its grey levels, in [0, 1]."""
    image = ImageOps.fit(decode_side(source, "front").convert("L"), (STAT_SIZE, STAT_SIZE))
    pixels = np.asarray(image, dtype=float) / 255
    return float(pixels.mean()), float(pixels.std())


def stats_of(sources) -> np.ndarray:
    """[N, 2] brightness and contrast; unreadable photos are left out."""
    out = []
    for source in sources:
        try:
            out.append(image_stats(source))
        except (ImageError, OSError, TypeError):
            continue
    return np.asarray(out, dtype=float).reshape(-1, 2)


def correction_error(predicted, year_from, year_to) -> np.ndarray:
    """Absolute error of each corrected prediction against the midpoint of the expert's range: the definition of
    `val_mae` (`evaluate.regression_metrics`), so the feedback MAE and a version's validation MAE compare."""
    predicted, year_from, year_to = (np.asarray(a, dtype=float) for a in (predicted, year_from, year_to))
    return np.abs(predicted - (year_from + year_to) / 2)


def corrected_predictions(log: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """The logged predictions an expert corrected (the latest correction of a request counts), with `error`
    (`correction_error`): the one feedback MAE of the monitoring table and the UI."""
    latest = feedback.sort_values("timestamp").drop_duplicates("request_id", keep="last")
    joined = log.dropna(subset=["prediction"]).merge(latest[["request_id", "year_from", "year_to"]],
                                                     on="request_id")
    joined = joined.dropna(subset=["year_from", "year_to"])
    return joined.assign(error=correction_error(joined["prediction"], joined["year_from"], joined["year_to"]))


def drift_alerts(row, threshold: float) -> str:
    """The PSI columns of a monitoring row above `threshold`, comma-separated ('' when none)."""
    return ",".join(name for name in PSI_COLUMNS if name in row and np.isfinite(row[name]) and row[name] > threshold)


# ------------------------------------------------------------------------------------------- reference
def training_photo_stats(settings: Settings, lake: Lake) -> np.ndarray:
    """Photo statistics of the training set: the retraining job's `train` rows, or the base dataset before the
    first retrain."""
    if lake.exists(TRAINING_DATA):
        rows = lake.read(TRAINING_DATA, columns=["split", "obverse"])
        paths = rows.loc[rows["split"] == "train", "obverse"]
    else:
        base = read_manifest(settings.data_dir, settings.min_year, settings.max_year, check_images=False,
                             limit=settings.retrain_base_limit, seed=settings.retrain_holdout_seed)
        paths = base.rows["obverse_path"]
    sample = paths.sample(min(IMAGE_SAMPLE, len(paths)), random_state=0) if len(paths) else paths
    return stats_of(sample)


def reference_predictions(settings: Settings, version: str) -> np.ndarray:
    """The version's own predictions on its reference coins (the `evaluation/predictions.csv` its training run
    logged); empty, with a warning, when there are none (no model, an unknown version, a run without them), so
    its prediction PSI is NaN rather than a comparison with something else."""
    if version == NO_MODEL:
        return np.array([])
    try:
        client = registry.client(settings)
        run_id = client.get_model_version(settings.model_name, version).run_id
        if run_id is None:
            raise ValueError(f"version {version} was not registered from a run")
        with tempfile.TemporaryDirectory() as folder:
            table = pd.read_csv(client.download_artifacts(run_id, REFERENCE_PREDICTIONS, folder))
        return table["predicted"].to_numpy(float)
    except (MlflowException, OSError, KeyError, ValueError) as error:  # this one indicator is left empty
        log.warning("no reference predictions for %s version %s (%s): its prediction PSI is left empty",
                    settings.model_name, version, error)
        return np.array([])


def one_row_per_request(log: pd.DataFrame) -> pd.DataFrame:
    """The inference log's rows collapsed to one per HTTP request (its status and latency once: a request of
    several coins logs a row per coin). Rows logged before there was an `http_request_id` stand alone."""
    ids = log["http_request_id"].fillna(log["request_id"]) if "http_request_id" in log else log["request_id"]
    return log.assign(http_request_id=ids).drop_duplicates("http_request_id")


# ------------------------------------------------------------------------------------------------- job
def compute_monitoring(settings: Settings, lake: Lake | None = None) -> pd.DataFrame:
    """One row of metrics per (date, model_version) in the inference log."""
    lake = lake or open_lake(settings)
    requests = lake.read(INFERENCE_LOG, columns=["request_id", "http_request_id", "date", "status_code",
                                                 "execution_time_ms", "model_version", "prediction"])
    if len(requests) == 0:
        return pd.DataFrame()
    requests["model_version"] = requests["model_version"].fillna(NO_MODEL).astype(str)
    errors = corrected_predictions(requests[requests["status_code"] == 200], lake.read(FEEDBACK))
    errors = errors.set_index("request_id")["error"]
    reference_stats = training_photo_stats(settings, lake)
    references = {version: reference_predictions(settings, version)
                  for version in requests["model_version"].unique()}
    bins, computed_at = settings.monitor_psi_bins, datetime.now(UTC)

    rows = []
    for (date, version), group in requests.groupby(["date", "model_version"], sort=True):
        ok = group[group["status_code"] == 200]
        predictions = ok["prediction"].to_numpy(float)
        corrected = errors[errors.index.isin(ok["request_id"])]
        calls = one_row_per_request(group)
        answered = int((calls["status_code"] == 200).sum())
        latency = calls["execution_time_ms"].to_numpy(float)
        sample = ok["request_id"].sample(min(IMAGE_SAMPLE, len(ok)), random_state=0)
        photos = lake.read(INFERENCE_LOG, columns=["front_image"],
                           filters=[("request_id", "in", sorted(sample))])["front_image"] if len(sample) else []
        stats = stats_of(photos)

        def quantile(values, q):
            return float(np.quantile(values, q)) if len(values) else float("nan")

        rows.append({
            "date": pd.Timestamp(date).date(), "model_version": version, "computed_at": computed_at,
            "requests": len(calls), "errors": len(calls) - answered,
            "error_rate": float((len(calls) - answered) / len(calls)),
            "rows": len(group),
            "latency_p50_ms": quantile(latency, 0.5), "latency_p90_ms": quantile(latency, 0.9),
            "latency_p99_ms": quantile(latency, 0.99),
            "prediction_mean": float(predictions.mean()) if len(predictions) else float("nan"),
            "prediction_std": float(predictions.std()) if len(predictions) else float("nan"),
            "prediction_p10": quantile(predictions, 0.1), "prediction_p50": quantile(predictions, 0.5),
            "prediction_p90": quantile(predictions, 0.9),
            "prediction_psi": psi(references[version], predictions, bins),
            "brightness_psi": psi(reference_stats[:, 0], stats[:, 0], bins),
            "contrast_psi": psi(reference_stats[:, 1], stats[:, 1], bins),
            "feedback_rows": len(corrected),
            "feedback_mae": float(corrected.mean()) if len(corrected) else float("nan"),
        })
        rows[-1]["drift_alerts"] = drift_alerts(rows[-1], settings.monitor_psi_alert)
    return pd.DataFrame(rows)


def run_monitor(settings: Settings) -> pd.DataFrame:
    """Compute the metrics and append them to the `monitoring` table (this job is its only writer)."""
    lake = open_lake(settings)
    table = compute_monitoring(settings, lake)
    if len(table):
        lake.append(MONITORING, table)
    return table
