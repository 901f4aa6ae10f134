"""Monitoring job: `coinyear monitor` turns the inference log into daily health metrics per model version.

For each (date, model_version) of the `inference_log` table: request volume, error rate, latency percentiles,
the distribution of predicted years, drift against the training set measured as the population stability
index (PSI) of the predictions (against the training labels) and of two simple photo statistics (brightness
and contrast), and the MAE on the rows experts corrected (`feedback`). The rows are appended to the
`monitoring` Delta table with `computed_at`; readers keep the latest `computed_at` per (date, model_version).

PSI reads: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 the inputs or outputs no longer look like training.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ImageOps

from coinyear.config import Settings
from coinyear.data import ImageError, decode_side, read_manifest
from coinyear.lake import FEEDBACK, INFERENCE_LOG, MONITORING, TRAINING_DATA, Lake

log = logging.getLogger(__name__)

# Photo statistics are computed on a sample: enough for a stable PSI, bounded cost on a busy day.
IMAGE_SAMPLE = 300
STAT_SIZE = 64
PSI_EPSILON = 1e-4
NO_MODEL = "none"


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


# ------------------------------------------------------------------------------------------- reference
def training_reference(settings: Settings, lake: Lake) -> tuple[np.ndarray, np.ndarray]:
    """(label midpoints, photo statistics) of the training set: the retraining job's `train` rows, or the base
    dataset before the first retrain."""
    if lake.exists(TRAINING_DATA):
        rows = lake.read(TRAINING_DATA, columns=["split", "obverse", "year_from", "year_to"])
        rows = rows[rows["split"] == "train"]
        paths = rows["obverse"]
    else:
        rows = read_manifest(settings.data_dir, settings.min_year, settings.max_year, check_images=False,
                             limit=settings.retrain_base_limit, seed=settings.retrain_holdout_seed).rows
        paths = rows["obverse_path"]
    years = (rows["year_from"].to_numpy(float) + rows["year_to"].to_numpy(float)) / 2
    sample = paths.sample(min(IMAGE_SAMPLE, len(paths)), random_state=0) if len(paths) else paths
    return years, stats_of(sample)


# ------------------------------------------------------------------------------------------------- job
def compute_monitoring(settings: Settings, lake: Lake | None = None) -> pd.DataFrame:
    """One row of metrics per (date, model_version) in the inference log."""
    lake = lake or Lake(settings)
    requests = lake.read(INFERENCE_LOG, columns=["request_id", "date", "status_code", "execution_time_ms",
                                                 "model_version", "prediction"])
    if len(requests) == 0:
        return pd.DataFrame()
    requests["model_version"] = requests["model_version"].fillna(NO_MODEL).astype(str)
    feedback = lake.read(FEEDBACK).sort_values("timestamp").drop_duplicates("request_id", keep="last")
    requests = requests.merge(feedback[["request_id", "year_from", "year_to"]], on="request_id", how="left")
    reference_years, reference_stats = training_reference(settings, lake)
    bins, computed_at = settings.monitor_psi_bins, datetime.now(timezone.utc)

    rows = []
    for (date, version), group in requests.groupby(["date", "model_version"], sort=True):
        ok = group[group["status_code"] == 200]
        predictions = ok["prediction"].to_numpy(float)
        corrected = ok.dropna(subset=["year_from"])
        truth = (corrected["year_from"].to_numpy(float) + corrected["year_to"].to_numpy(float)) / 2
        latency = group["execution_time_ms"].to_numpy(float)
        sample = ok["request_id"].sample(min(IMAGE_SAMPLE, len(ok)), random_state=0)
        photos = lake.read(INFERENCE_LOG, columns=["front_image"],
                           filters=[("request_id", "in", sorted(sample))])["front_image"] if len(sample) else []
        stats = stats_of(photos)

        def quantile(values, q):
            return float(np.quantile(values, q)) if len(values) else float("nan")

        rows.append({
            "date": pd.Timestamp(date).date(), "model_version": version, "computed_at": computed_at,
            "requests": int(len(group)), "errors": int(len(group) - len(ok)),
            "error_rate": float(1 - len(ok) / len(group)),
            "latency_p50_ms": quantile(latency, 0.5), "latency_p90_ms": quantile(latency, 0.9),
            "latency_p99_ms": quantile(latency, 0.99),
            "prediction_mean": float(predictions.mean()) if len(predictions) else float("nan"),
            "prediction_std": float(predictions.std()) if len(predictions) else float("nan"),
            "prediction_p10": quantile(predictions, 0.1), "prediction_p50": quantile(predictions, 0.5),
            "prediction_p90": quantile(predictions, 0.9),
            "prediction_psi": psi(reference_years, predictions, bins),
            "brightness_psi": psi(reference_stats[:, 0], stats[:, 0], bins),
            "contrast_psi": psi(reference_stats[:, 1], stats[:, 1], bins),
            "feedback_rows": int(len(corrected)),
            "feedback_mae": float(np.mean(np.abs(corrected["prediction"].to_numpy(float) - truth)))
            if len(corrected) else float("nan"),
        })
    return pd.DataFrame(rows)


def run_monitor(settings: Settings) -> pd.DataFrame:
    """Compute the metrics and append them to the `monitoring` table (this job is its only writer)."""
    lake = Lake(settings)
    table = compute_monitoring(settings, lake)
    if len(table):
        lake.append(MONITORING, table)
    return table
