"""Retraining job: expert feedback from the inference log -> a candidate model -> promote or reject.

`run_retrain` runs six named steps, each an MLflow run nested under one `retrain` parent run:

1. ingest    feedback rows committed since the last retrain (the watermark), joined to their logged photos,
             and, on the very first run, the base dataset;
2. clean     drop undecodable photos, exact duplicate photos, contradictory labels and impossible years,
             counting each reason;
3. build     append the clean rows to the `training_data` Delta table; its version names the exact data a
             model saw, and its `split` column holds the frozen grouped hold-out (chosen once, never trained on);
4. train     the configured recipe on every `train` row (`coinyear.train.run_training`), registered, `staging`;
5. validate  candidate and production scored on the same evaluation rows (hold-out + feedback kept for
             evaluation) with `mlflow.models.evaluate`, compared by `mlflow.validate_evaluation_results`;
6. decide    promote or reject; the decision goes to the `model_decisions` table and the version's tags.

Exactly once: the watermark (the `feedback` table version read) is committed as a Delta transaction marker in
the same commit as the rows it produced, so a crash can never ingest a feedback row twice or lose one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from coinyear import evaluate, registry
from coinyear.config import Settings, ensure_experiment
from coinyear.data import ImageError, Manifest, decode_side, grouped_holdout, read_manifest, validate_rows
from coinyear.lake import FEEDBACK, INFERENCE_LOG, MODEL_DECISIONS, TRAINING_DATA, Lake

log = logging.getLogger(__name__)

WATERMARK_APP = "coinyear-retrain:feedback"
TRAIN, HOLDOUT, FEEDBACK_EVAL = "train", "holdout", "feedback_eval"
BASE, FEEDBACK_SOURCE = "base", "feedback"
PROMOTED, REJECTED, SKIPPED, FAILED = "promoted", "rejected", "skipped", "failed"
LATENCY_PROBES = 20
MAE = "mean_absolute_error"  # mlflow.models.evaluate's name for it

TRAINING_DATA_SCHEMA = pa.schema([
    ("coin_id", pa.string()), ("source", pa.string()), ("split", pa.string()),
    ("obverse", pa.string()), ("reverse", pa.string()),
    ("year_from", pa.int32()), ("year_to", pa.int32()),
    ("date_text", pa.string()), ("denomination", pa.string()), ("mint", pa.string()),
    ("content_hash", pa.string()), ("request_id", pa.string()), ("feedback_timestamp", pa.string()),
    ("feedback_version", pa.int64()), ("retrain_run_id", pa.string()), ("added_at", pa.timestamp("us", tz="UTC")),
])
DECISIONS_SCHEMA = pa.schema([
    ("decided_at", pa.timestamp("us", tz="UTC")), ("retrain_run_id", pa.string()), ("model_name", pa.string()),
    ("decision", pa.string()), ("reason", pa.string()),
    ("candidate_version", pa.string()), ("production_before", pa.string()), ("production_after", pa.string()),
    ("candidate_mae", pa.float64()), ("production_mae", pa.float64()),
    ("candidate_latency_ms", pa.float64()), ("production_latency_ms", pa.float64()),
    ("candidate_metrics", pa.string()), ("production_metrics", pa.string()),
    ("eval_rows", pa.int64()), ("new_feedback_rows", pa.int64()), ("ingested_rows", pa.int64()),
    ("dropped", pa.string()), ("training_data_version", pa.int64()), ("feedback_version", pa.int64()),
    # which job decided (retrain | deploy) and, for a deployment, the serving endpoint it changed
    ("kind", pa.string()), ("endpoint_name", pa.string()),
])


class RetrainBusy(RuntimeError):
    """Another retraining run holds the lock."""


# ------------------------------------------------------------------------------------------------ result
@dataclass
class RetrainResult:
    decision: str  # promoted | rejected | skipped | dry_run | failed (the job itself broke)
    reason: str
    run_id: str | None = None
    candidate_version: str | None = None
    production_before: str | None = None
    production_after: str | None = None
    new_feedback_rows: int = 0
    ingested_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    production_metrics: dict[str, float] = field(default_factory=dict)
    training_data_version: int | None = None

    def report(self) -> str:
        lines = [f"new feedback rows: {self.new_feedback_rows}; rows added to training data: {self.ingested_rows}"]
        lines += [f"  dropped {count}: {reason}" for reason, count in sorted(self.dropped.items())]
        if self.training_data_version is not None:
            lines.append(f"training_data version {self.training_data_version}")
        for name, metrics, version in (("candidate", self.candidate_metrics, self.candidate_version),
                                       ("production", self.production_metrics, self.production_before)):
            if metrics:
                lines.append(f"{name} v{version}: MAE {metrics.get(MAE, float('nan')):.2f} years, "
                             f"within ±10y {100 * metrics.get('within_10y', float('nan')):.0f}%, "
                             f"latency {metrics.get('latency_median_ms', float('nan')):.0f} ms "
                             f"(p95 {metrics.get('latency_p95_ms', float('nan')):.0f} ms)")
        lines.append(f"decision: {self.decision.upper()} - {self.reason}")
        if self.production_after:
            lines.append(f"production is version {self.production_after}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- job
def run_retrain(settings: Settings, dry_run: bool = False, force: bool = False) -> RetrainResult:
    """One retraining run under the job lock: see the module docstring."""
    with retrain_lock(settings):
        lake = Lake(settings)
        watermark = feedback_watermark(lake)
        feedback_version, new_feedback = read_new_feedback(lake, watermark)
        existing = lake.read(TRAINING_DATA)
        first_build = len(existing) == 0
        if len(new_feedback) == 0 and not first_build and not force:
            return RetrainResult(SKIPPED, f"no new feedback since the last retrain (feedback table version "
                                          f"{watermark}); nothing to do (use --force to retrain anyway)")
        if dry_run:
            candidates = ingest(settings, lake, new_feedback, first_build)
            kept, dropped = clean(candidates, existing, settings)
            return RetrainResult("dry_run", f"would add {len(kept)} rows to the training data and retrain",
                                 new_feedback_rows=len(new_feedback), ingested_rows=len(kept),
                                 dropped=_count(dropped))
        return Retraining(settings, lake).run(new_feedback, feedback_version, existing, first_build)


@contextlib.contextmanager
def retrain_lock(settings: Settings):
    """One retraining at a time per COINYEAR_HOME (the scheduler and a manual run share it).

    A file system without locks (a Databricks volume) leaves it to the platform: the Job allows one run at a
    time (`max_concurrent_runs: 1` in deploy/databricks/databricks.yml).
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.state_dir / "retrain.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError as error:
            raise RetrainBusy(f"another retraining run holds {handle.name}") from error
        except OSError as error:
            log.warning("no file lock on %s (%s): relying on the scheduler for one run at a time", handle.name, error)
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


class Retraining:
    """The steps of one run after the lock and the new-data check; each step is a nested MLflow run."""

    def __init__(self, settings: Settings, lake: Lake):
        self.settings, self.lake = settings, lake
        self.client = registry.client(settings)
        self.experiment_id = ensure_experiment(settings)
        self.parent = None

    @contextlib.contextmanager
    def step(self, name: str):
        import mlflow

        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name,
                              tags={"mlflow.parentRunId": self.parent, "coinyear.step": name}) as run:
            log.info("retrain step %s", name)
            yield run

    def run(self, new_feedback: pd.DataFrame, feedback_version: int, existing: pd.DataFrame,
            first_build: bool) -> RetrainResult:
        import mlflow

        self.parent = self.client.create_run(
            self.experiment_id, run_name="retrain", tags={"coinyear.job": "retrain"}).info.run_id
        result = RetrainResult(FAILED, "the job stopped with an error (see the run's log)", run_id=self.parent,
                               new_feedback_rows=len(new_feedback),
                               production_before=registry.version_by_alias(self.settings, registry.PRODUCTION))
        status = "FAILED"
        try:
            with self.step("ingest"):
                candidates = ingest(self.settings, self.lake, new_feedback, first_build)
                mlflow.log_metrics({"new_feedback_rows": len(new_feedback), "candidate_rows": len(candidates)})
                mlflow.log_param("feedback_version", feedback_version)
            with self.step("clean"):
                kept, dropped = clean(candidates, existing, self.settings)
                result.dropped = _count(dropped)
                mlflow.log_metrics({"kept_rows": len(kept), **{f"dropped_{k}": v for k, v in result.dropped.items()}})
                if len(dropped):
                    mlflow.log_text(dropped.to_csv(index=False), "dropped_rows.csv")
            if len(kept) == 0 and len(new_feedback) and len(existing):
                # remember the watermark anyway, or these rows would be examined again on every run
                result.decision, result.reason = SKIPPED, f"none of the {len(new_feedback)} new feedback rows " \
                                                          f"survived cleaning"
                self.record(result, feedback_version)
                status = "FINISHED"
                return result
            with self.step("build"):
                result.ingested_rows = build(self.settings, self.lake, kept, feedback_version, self.parent)
                result.training_data_version = table_version(self.lake, TRAINING_DATA)
                mlflow.log_metrics({"ingested_rows": result.ingested_rows})
                mlflow.log_param("training_data_version", result.training_data_version)
                train_rows, eval_rows = dataset(self.lake, self.settings, result.training_data_version)
                mlflow.log_metrics({"train_rows": len(train_rows.rows), "eval_rows": len(eval_rows.rows),
                                    "unusable_rows": len(train_rows.dropped) + len(eval_rows.dropped)})
            self.train_validate_decide(result, train_rows, eval_rows, feedback_version)
            status = "FINISHED"
            return result
        finally:
            self.client.set_tag(self.parent, "decision", result.decision)
            self.client.set_tag(self.parent, "decision_reason", result.reason[:5000])
            self.client.set_terminated(self.parent, status)

    def train_validate_decide(self, result: RetrainResult, train_rows: Manifest, eval_rows: Manifest,
                              feedback_version: int) -> None:
        from coinyear.train import run_training

        settings = self.settings
        try:
            outcome = run_training(settings, recipe(settings), train_rows, register=True, run_name="train",
                                   tags={"mlflow.parentRunId": self.parent, "coinyear.step": "train",
                                         "training_data_version": str(result.training_data_version)})
            result.candidate_version = outcome.version
            registry.promote(settings, outcome.version, registry.STAGING)
            registry.tag_version(settings, outcome.version,
                                 {"training_data_version": result.training_data_version,
                                  "training_data": self.lake.uri(TRAINING_DATA)})
        except Exception as error:  # a recipe that cannot train is a rejected candidate, not a crashed job
            log.exception("training the candidate failed")
            result.decision, result.reason = REJECTED, f"training failed: {type(error).__name__}: {error}"
            self.record(result, feedback_version)
            return
        with self.step("validate"):
            decision, reason = self.validate(result, eval_rows)
        with self.step("decide"):
            result.decision, result.reason = decision, reason
            if decision == PROMOTED:
                registry.promote(settings, result.candidate_version, registry.PRODUCTION)
            result.production_after = registry.version_by_alias(settings, registry.PRODUCTION)
            registry.tag_version(settings, result.candidate_version,
                                 {"decision": decision, "decision_reason": reason[:5000],
                                  "decision_run_id": self.parent})
            self.record(result, feedback_version)

    def validate(self, result: RetrainResult, eval_rows: Manifest) -> tuple[str, str]:
        """(decision, reason): an error or a NaN rejects at once; otherwise MLflow validation against production
        and the latency budget, every failure named in the reason."""
        import mlflow
        from mlflow.models.evaluation.validation import ModelValidationFailedException

        settings, rows = self.settings, eval_rows.rows
        if len(rows) == 0:
            return REJECTED, "no usable evaluation rows: the candidate cannot be judged"
        frame = encoded_frame(rows)
        truth = pd.DataFrame({"year": rows["year"].to_numpy(float), "year_from": rows["year_from"].to_numpy(float),
                              "year_to": rows["year_to"].to_numpy(float), "source": rows["source"].to_numpy()})
        decades = qualifying_decades(truth["year"], settings.retrain_decade_min_coins)
        mlflow.log_dict({"rows": len(rows), "checked_decades": decades}, "evaluation_set.json")

        candidate = score(registry.model_uri(settings, result.candidate_version), frame)
        if candidate.error:
            return REJECTED, f"candidate failed to score the evaluation set: {candidate.error}"
        bad = int(np.sum(~np.isfinite(candidate.predictions)))
        if bad:
            return REJECTED, f"candidate predicted NaN or infinity for {bad} of {len(rows)} coins"
        candidate_eval = evaluate_predictions(f"candidate-v{result.candidate_version}", truth, candidate, decades)
        result.candidate_metrics = candidate_eval.metrics
        too_slow = [] if candidate.median_ms <= settings.retrain_latency_budget_ms else [
            f"candidate too slow: median {candidate.median_ms:.1f} ms per one-coin request, "
            f"budget {settings.retrain_latency_budget_ms:g} ms"]
        if result.production_before is None:
            if too_slow:
                return REJECTED, too_slow[0]
            return PROMOTED, (f"first valid model (no production yet): MAE {candidate_eval.metrics[MAE]:.2f} "
                              f"years on {len(rows)} evaluation coins")
        production = score(registry.model_uri(settings, result.production_before), frame)
        if production.error or not np.all(np.isfinite(production.predictions)):
            broken = f"production v{result.production_before} cannot score the evaluation set " \
                     f"({production.error or 'NaN predictions'})"
            if too_slow:
                return REJECTED, "; ".join([*too_slow, broken])
            return PROMOTED, f"{broken}; the valid candidate replaces it"
        production_eval = evaluate_predictions(f"production-v{result.production_before}", truth, production,
                                               decades)
        result.production_metrics = production_eval.metrics
        thresholds = validation_thresholds(settings, production_eval.metrics, decades)
        comparison = explain(candidate_eval.metrics, production_eval.metrics, settings, decades)
        try:
            mlflow.validate_evaluation_results(thresholds, candidate_eval, production_eval)
        except ModelValidationFailedException:
            return REJECTED, "; ".join([comparison, *too_slow])
        return (REJECTED, "; ".join([*too_slow, comparison])) if too_slow else (PROMOTED, comparison)

    def record(self, result: RetrainResult, feedback_version: int) -> None:
        """The decision row, committed together with the watermark (see `feedback_watermark`)."""
        row = {
            "decided_at": datetime.now(timezone.utc), "retrain_run_id": result.run_id,
            "model_name": self.settings.model_name, "decision": result.decision, "reason": result.reason,
            "candidate_version": result.candidate_version, "production_before": result.production_before,
            "production_after": result.production_after or result.production_before,
            "candidate_mae": result.candidate_metrics.get(MAE, math.nan),
            "production_mae": result.production_metrics.get(MAE, math.nan),
            "candidate_latency_ms": result.candidate_metrics.get("latency_median_ms", math.nan),
            "production_latency_ms": result.production_metrics.get("latency_median_ms", math.nan),
            "candidate_metrics": json.dumps(result.candidate_metrics),
            "production_metrics": json.dumps(result.production_metrics),
            "eval_rows": int(result.candidate_metrics.get("example_count", 0)),
            "new_feedback_rows": result.new_feedback_rows, "ingested_rows": result.ingested_rows,
            "dropped": json.dumps(result.dropped), "training_data_version": result.training_data_version,
            "feedback_version": feedback_version, "kind": "retrain",
        }
        # a forced rerun reads no newer feedback: its decision carries no marker (an already committed marker
        # would make the lake skip the append as a duplicate)
        marker = feedback_version + 1
        moves = marker > (self.lake.committed_version(MODEL_DECISIONS, WATERMARK_APP) or 0)
        self.lake.append(MODEL_DECISIONS, pa.Table.from_pylist([row], schema=DECISIONS_SCHEMA),
                         transaction=(WATERMARK_APP, marker) if moves else None)


# ------------------------------------------------------------------------------------------------ ingest
def table_version(lake: Lake, table: str) -> int:
    """The table's current version (Delta's, or the Spark lake's logical one), -1 while it does not exist."""
    return lake.version(table)


def feedback_watermark(lake: Lake) -> int:
    """The `feedback` table version the last completed retrain read (-1: none yet).

    Committed as a transaction marker with the training rows (build) or the decision row (record), whichever
    came last. Markers store version + 1, as Delta transaction versions start at 0.
    """
    markers = [lake.committed_version(table, WATERMARK_APP) for table in (TRAINING_DATA, MODEL_DECISIONS)]
    return max([m for m in markers if m is not None], default=0) - 1


def read_new_feedback(lake: Lake, watermark: int) -> tuple[int, pd.DataFrame]:
    """(feedback table version read, its rows added after version `watermark`).

    `feedback` is append-only, so the rows at the watermark version are exactly those already ingested.
    """
    version = table_version(lake, FEEDBACK)
    if version < 0 or version <= watermark:
        return max(version, watermark), lake.read(FEEDBACK).iloc[0:0]
    current = lake.read(FEEDBACK, version=version)
    if watermark < 0:
        return version, current
    seen = lake.read(FEEDBACK, columns=["request_id", "timestamp"], version=watermark)
    key = ["request_id", "timestamp"]
    merged = current.merge(seen.drop_duplicates(key), on=key, how="left", indicator=True)
    return version, current[(merged["_merge"] == "left_only").to_numpy()].reset_index(drop=True)


def ingest(settings: Settings, lake: Lake, new_feedback: pd.DataFrame, first_build: bool) -> pd.DataFrame:
    """Candidate rows (photos as bytes) from the new feedback and, on the first build, the base dataset."""
    parts = [feedback_candidates(lake, new_feedback)]
    if first_build:
        parts.insert(0, base_candidates(settings))
    return pd.concat(parts, ignore_index=True)


CANDIDATE_COLUMNS = ["coin_id", "source", "front", "back", "obverse", "reverse", "year_from", "year_to",
                     "date_text", "denomination", "mint", "request_id", "feedback_timestamp", "group", "problem"]


def base_candidates(settings: Settings) -> pd.DataFrame:
    """The base manifest's rows; rows it rejects (missing file, bad year...) come along with their reason."""
    manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year,
                             limit=settings.retrain_base_limit, seed=settings.retrain_holdout_seed)
    log.info(manifest.report())
    rows = manifest.rows
    valid = pd.DataFrame({
        "coin_id": "base:" + rows["coin_id"].astype(str), "source": BASE,
        "front": [Path(p).read_bytes() for p in rows["obverse_path"]],
        "back": [Path(p).read_bytes() for p in rows["reverse_path"]],
        # absolute, so the rows stay valid whatever the working directory of a later run
        "obverse": [str(Path(p).resolve()) for p in rows["obverse_path"]],
        "reverse": [str(Path(p).resolve()) for p in rows["reverse_path"]],
        "year_from": rows["year_from"], "year_to": rows["year_to"],
        **{c: rows[c].fillna("").astype(str) if c in rows else "" for c in ("date_text", "denomination", "mint")},
        "request_id": None, "feedback_timestamp": None, "group": rows["group"], "problem": None,
    })
    invalid = pd.DataFrame({"coin_id": "base:" + manifest.dropped["coin_id"].astype(str), "source": BASE,
                            "problem": manifest.dropped["reason"] + ": " + manifest.dropped["detail"].astype(str)})
    return pd.concat([valid, invalid], ignore_index=True).reindex(columns=CANDIDATE_COLUMNS)


def feedback_candidates(lake: Lake, feedback: pd.DataFrame) -> pd.DataFrame:
    """New feedback joined to its inference-log row: the expert's years with the photos that were scored."""
    if len(feedback) == 0:
        return pd.DataFrame(columns=CANDIDATE_COLUMNS)
    ids = sorted(set(feedback["request_id"]))
    logged = lake.read(INFERENCE_LOG, columns=["request_id", "front_image", "back_image"],
                       filters=[("request_id", "in", ids)]).drop_duplicates("request_id")
    rows = feedback.merge(logged, on="request_id", how="left")
    latest = rows.sort_values("timestamp").duplicated("request_id", keep="last")
    year_text = rows["year_from"].astype(str) + ".." + rows["year_to"].astype(str)
    out = pd.DataFrame({
        "coin_id": "feedback:" + rows["request_id"].astype(str), "source": FEEDBACK_SOURCE,
        "front": rows["front_image"], "back": rows["back_image"], "obverse": None, "reverse": None,
        "year_from": rows["year_from"], "year_to": rows["year_to"],
        "date_text": year_text, "denomination": "", "mint": "",
        "request_id": rows["request_id"], "feedback_timestamp": rows["timestamp"].astype(str),
        "group": year_text, "problem": None,
    })
    out.loc[~rows["request_id"].isin(logged["request_id"]), "problem"] = \
        "unknown_request: no inference-log row with this request_id"
    out.loc[latest.reindex(out.index).to_numpy(), "problem"] = "superseded: a later correction of this request"
    return out.reindex(columns=CANDIDATE_COLUMNS)


# ------------------------------------------------------------------------------------------------- clean
def clean(candidates: pd.DataFrame, existing: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to add, with `content_hash`; dropped rows: coin_id, reason, detail).

    Reasons: a base-manifest reason, unknown_request, superseded, missing_image, undecodable_image,
    impossible_label, year_out_of_span, contradictory_label (same photos, other years, here or already in the
    training data), duplicate_image (same photos and years already present).
    """
    dropped, kept = [], []
    for row in tqdm(candidates.to_dict("records"), desc="clean", unit="row", leave=False,
                    disable=len(candidates) < 200):
        reason, detail = problem_of(row, settings)
        if reason:
            dropped.append({"coin_id": row["coin_id"], "reason": reason, "detail": detail})
            continue
        row["content_hash"] = content_hash(row["front"], row["back"])
        kept.append(row)
    kept = pd.DataFrame(kept, columns=CANDIDATE_COLUMNS + ["content_hash"])
    key = ["content_hash", "year_from", "year_to"]
    labels = pd.concat([frame[key].astype({"year_from": int, "year_to": int}) for frame in (existing, kept)
                        if len(frame)], ignore_index=True) if len(kept) else pd.DataFrame(columns=key)
    label_counts = labels.drop_duplicates(key)["content_hash"].value_counts()
    contradictory = kept["content_hash"].map(label_counts).fillna(0) > 1
    old_hashes = set(existing["content_hash"]) if len(existing) else set()
    duplicate = ~contradictory & (kept["content_hash"].isin(old_hashes) | kept.duplicated("content_hash"))
    for mask, reason, detail in ((contradictory, "contradictory_label", "the same photos carry other years"),
                                 (duplicate, "duplicate_image", "the same photos are already in the data")):
        dropped += [{"coin_id": c, "reason": reason, "detail": detail} for c in kept.loc[mask, "coin_id"]]
    dropped = pd.DataFrame(dropped, columns=["coin_id", "reason", "detail"])
    for reason, count in _count(dropped).items():
        log.warning("clean: dropped %d rows: %s", count, reason)
    return kept[~contradictory & ~duplicate].reset_index(drop=True), dropped


def problem_of(row: dict, settings: Settings) -> tuple[str | None, str]:
    """(reason, detail) why a candidate row cannot be used, or (None, "")."""
    if isinstance(row.get("problem"), str):
        reason, _, detail = row["problem"].partition(": ")
        return reason, detail
    for side in ("front", "back"):
        if not isinstance(row[side], (bytes, bytearray)) or not row[side]:
            return "missing_image", f"no {side} photo was logged"
    try:
        year_from, year_to = int(row["year_from"]), int(row["year_to"])
    except (TypeError, ValueError):
        return "impossible_label", f"{row['year_from']!r}..{row['year_to']!r}"
    if year_from > year_to:
        return "impossible_label", f"{year_from} > {year_to}"
    if year_from < settings.min_year or year_to > settings.max_year or 0 in (year_from, year_to):
        return "year_out_of_span", f"{year_from}..{year_to} (supported {settings.min_year}..{settings.max_year})"
    for side in ("front", "back"):
        try:
            decode_side(row[side], side)
        except ImageError as error:
            return "undecodable_image", f"{side}: {error}"
    return None, ""


def content_hash(front: bytes, back: bytes) -> str:
    return hashlib.sha256(hashlib.sha256(front).digest() + hashlib.sha256(back).digest()).hexdigest()


def _count(dropped: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in dropped["reason"].value_counts().sort_index().items()} if len(dropped) else {}


# ------------------------------------------------------------------------------------------------- build
def image_store(settings: Settings) -> Path:
    """Content-addressed copies of feedback photos, so a manifest row can point at a file."""
    return settings.state_dir / "images"


def store_image(settings: Settings, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = image_store(settings) / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path)


def assign_splits(settings: Settings, rows: pd.DataFrame) -> pd.Series:
    """Base rows: the frozen grouped hold-out (fixed seed, chosen on the first build only). Feedback rows: a
    fixed share, by photo hash, kept for evaluation."""
    split = pd.Series(TRAIN, index=rows.index)
    base = rows[rows["source"] == BASE]
    if len(base) >= 2 and base["group"].nunique() >= 2:
        _, holdout = grouped_holdout(base.reset_index(drop=True), settings.retrain_holdout_fraction,
                                     settings.retrain_holdout_seed)
        split[base.index[holdout]] = HOLDOUT
    feedback = rows["source"] == FEEDBACK_SOURCE
    bucket = rows.loc[feedback, "content_hash"].map(lambda h: int(h[:8], 16) % 100)
    split[bucket[bucket < settings.retrain_feedback_eval_percent].index] = FEEDBACK_EVAL
    return split


def build(settings: Settings, lake: Lake, kept: pd.DataFrame, feedback_version: int, run_id: str | None) -> int:
    """Append the clean rows to `training_data` with the watermark in the same commit; returns rows added."""
    if len(kept) == 0:
        return 0
    rows = kept.copy()
    rows["split"] = assign_splits(settings, rows)
    feedback = rows["source"] == FEEDBACK_SOURCE
    rows.loc[feedback, "obverse"] = [store_image(settings, b) for b in rows.loc[feedback, "front"]]
    rows.loc[feedback, "reverse"] = [store_image(settings, b) for b in rows.loc[feedback, "back"]]
    rows["feedback_version"], rows["retrain_run_id"] = feedback_version, run_id
    rows["added_at"] = datetime.now(timezone.utc)
    table = pa.Table.from_pandas(rows[TRAINING_DATA_SCHEMA.names].astype({"year_from": int, "year_to": int}),
                                 schema=TRAINING_DATA_SCHEMA, preserve_index=False)
    return lake.append(TRAINING_DATA, table, transaction=(WATERMARK_APP, feedback_version + 1),
                       metadata={"retrain_run_id": str(run_id)})


def dataset(lake: Lake, settings: Settings, version: int) -> tuple[Manifest, Manifest]:
    """(train rows, evaluation rows) of `training_data` at `version`, as validated manifests."""
    table = restore_feedback_photos(settings, lake, lake.read(TRAINING_DATA, version=version))
    source = f"{lake.uri(TRAINING_DATA)}@v{version}"

    def manifest(rows: pd.DataFrame) -> Manifest:
        out = validate_rows(rows.reset_index(drop=True), Path("/"), settings.min_year, settings.max_year)
        out.source = source
        return out

    return manifest(table[table["split"] == TRAIN]), manifest(table[table["split"] != TRAIN])


def restore_feedback_photos(settings: Settings, lake: Lake, table: pd.DataFrame) -> pd.DataFrame:
    """`table` with the photo copies of its feedback rows present again, copied back from `inference_log`.

    A job cluster's COINYEAR_HOME is a local disk (deploy/databricks), so the copies `build` made under
    `state/images` are gone by the next run; the logged photos they came from are still in the lake.
    """
    feedback = table["source"] == FEEDBACK_SOURCE
    present = table["obverse"].map(lambda p: isinstance(p, str) and Path(p).is_file()) \
        & table["reverse"].map(lambda p: isinstance(p, str) and Path(p).is_file())
    missing = feedback & ~present
    if not missing.any():
        return table
    ids = sorted(set(table.loc[missing, "request_id"].dropna()))
    logged = lake.read(INFERENCE_LOG, columns=["request_id", "front_image", "back_image"],
                       filters=[("request_id", "in", ids)]).drop_duplicates("request_id").set_index("request_id")
    table, restored = table.copy(), 0
    for index in table.index[missing]:
        request_id = table.at[index, "request_id"]
        if request_id not in logged.index:
            continue  # left missing: validation drops the row and names it
        front, back = logged.at[request_id, "front_image"], logged.at[request_id, "back_image"]
        if isinstance(front, (bytes, bytearray)) and isinstance(back, (bytes, bytearray)):
            table.at[index, "obverse"] = store_image(settings, bytes(front))
            table.at[index, "reverse"] = store_image(settings, bytes(back))
            restored += 1
    log.info("restored the photos of %d of %d feedback rows from %s", restored, int(missing.sum()), INFERENCE_LOG)
    return table


# ------------------------------------------------------------------------------------------------- train
def recipe(settings: Settings):
    """The training recipe from settings (COINYEAR_BACKBONE, COINYEAR_EPOCHS, ...)."""
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig

    model = ModelConfig(backbone=settings.backbone, mode=settings.mode, proj_dim=settings.proj_dim,
                        grayscale=settings.grayscale, image_size=settings.image_size)
    return TrainConfig(model=model, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                       loss=settings.loss, folds=settings.folds, seed=settings.seed)


# ---------------------------------------------------------------------------------------------- validate
@dataclass
class Scored:
    predictions: np.ndarray
    median_ms: float = math.nan  # one-coin requests; the gate (robust to a busy machine's outliers)
    p95_ms: float = math.nan
    error: str | None = None


def encoded_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The evaluation coins as API input (base64 photos), so validation scores exactly what is served."""
    from coinyear.pyfunc import BACK, FRONT, encode_file

    return pd.DataFrame({FRONT: [encode_file(p) for p in rows["obverse_path"]],
                         BACK: [encode_file(p) for p in rows["reverse_path"]]})


def score(model_uri: str, frame: pd.DataFrame, batch_size: int = 32) -> Scored:
    """Predictions for every row, and the median and p95 latency of one-coin requests; an exception becomes
    `error`."""
    import mlflow

    try:
        model = mlflow.pyfunc.load_model(model_uri)
        out = [np.asarray(model.predict(frame.iloc[s:s + batch_size]), dtype=float).reshape(-1)
               for s in tqdm(range(0, len(frame), batch_size), desc=f"scoring {model_uri}", leave=False)]
        predictions = np.concatenate(out) if out else np.zeros(0)
        timings = []
        for index in range(min(LATENCY_PROBES, len(frame)) + 1):
            started = time.perf_counter()
            model.predict(frame.iloc[[index % len(frame)]])
            timings.append((time.perf_counter() - started) * 1000)
        timings = timings[1:]  # the first call warms up
        return Scored(predictions, float(np.median(timings)), float(np.percentile(timings, 95)))
    except Exception as error:  # any failure of a candidate is a reason to reject it, never a crash
        log.exception("scoring %s failed", model_uri)
        return Scored(np.zeros(0), error=f"{type(error).__name__}: {error}")


def qualifying_decades(years: pd.Series, min_coins: int) -> list[int]:
    counts = pd.Series(evaluate.decade_of(years)).value_counts()
    return sorted(int(d) for d, n in counts.items() if n >= min_coins)


def decade_metric_name(decade: int) -> str:
    return f"decade_{decade}_mae"


def coin_metrics(decades: list[int]) -> list:
    """Our metrics as MLflow extra metrics: range MAE, within ±10 years, feedback MAE, MAE per checked decade."""
    from mlflow.models import make_metric

    def range_mae(predictions, targets, metrics, year_from, year_to):
        return evaluate.regression_metrics(predictions, year_from, year_to)["range_mae"]

    def within_10y(predictions, targets, metrics):
        return float(np.mean(np.abs(np.asarray(predictions) - np.asarray(targets)) <= 10))

    def feedback_mae(predictions, targets, metrics, source):
        mask = np.asarray(source) == FEEDBACK_SOURCE
        return float(np.mean(np.abs(np.asarray(predictions)[mask] - np.asarray(targets)[mask]))) if mask.any() \
            else math.nan

    def decade_mae(decade):
        def metric(predictions, targets, metrics):
            mask = evaluate.decade_of(targets) == decade
            errors = np.abs(np.asarray(predictions)[mask] - np.asarray(targets)[mask])
            return float(np.mean(errors)) if mask.any() else math.nan
        return metric

    metrics = [make_metric(eval_fn=range_mae, greater_is_better=False, name="range_mae"),
               make_metric(eval_fn=within_10y, greater_is_better=True, name="within_10y"),
               make_metric(eval_fn=feedback_mae, greater_is_better=False, name="feedback_mae")]
    return metrics + [make_metric(eval_fn=decade_mae(d), greater_is_better=False, name=decade_metric_name(d))
                      for d in decades]


def evaluate_predictions(name: str, truth: pd.DataFrame, scored: Scored, decades: list[int]):
    """`mlflow.models.evaluate` of one model's predictions, in a run nested under the active (validate) run;
    the latency measured while scoring joins the metrics."""
    import mlflow

    data = truth.assign(prediction=scored.predictions)
    with mlflow.start_run(run_name=f"evaluate-{name}", nested=True, tags={"coinyear.step": "validate"}):
        result = mlflow.models.evaluate(data=data, predictions="prediction", targets="year",
                                        model_type="regressor", extra_metrics=coin_metrics(decades))
        latency = {"latency_median_ms": scored.median_ms, "latency_p95_ms": scored.p95_ms}
        mlflow.log_metrics(latency)
    result._metrics = {**{k: float(v) for k, v in result.metrics.items()}, **latency}
    return result


def validation_thresholds(settings: Settings, baseline: dict[str, float], decades: list[int]) -> dict:
    """MAE at least `retrain_min_mae_improvement` lower; no checked decade more than
    `retrain_max_decade_regression` years worse than production."""
    from mlflow.models import MetricThreshold

    thresholds = {MAE: MetricThreshold(min_relative_change=settings.retrain_min_mae_improvement,
                                       greater_is_better=False)}
    for decade in decades:
        name = decade_metric_name(decade)
        thresholds[name] = MetricThreshold(threshold=baseline[name] + settings.retrain_max_decade_regression,
                                           greater_is_better=False)
    return thresholds


def explain(candidate: dict, production: dict, settings: Settings, decades: list[int]) -> str:
    """The decision in one line: the MAE comparison and every decade that got too much worse."""
    change = (candidate[MAE] - production[MAE]) / production[MAE]
    needed = settings.retrain_min_mae_improvement
    parts = [f"MAE {candidate[MAE]:.2f} vs production {production[MAE]:.2f} ({100 * change:+.1f}%, "
             f"needs <= {-100 * needed:.0f}%)"]
    worse = [f"decade {d}: {candidate[decade_metric_name(d)]:.2f} vs {production[decade_metric_name(d)]:.2f}"
             for d in decades
             if candidate[decade_metric_name(d)] > production[decade_metric_name(d)]
             + settings.retrain_max_decade_regression]
    parts.append(f"{len(worse)} of {len(decades)} checked decades worse by more than "
                 f"{settings.retrain_max_decade_regression:g} years" + (f" ({'; '.join(worse)})" if worse else ""))
    return "; ".join(parts)
