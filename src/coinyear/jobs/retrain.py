"""Retraining job: expert feedback from the inference log -> a candidate model -> promote or reject.

`run_retrain` runs six named steps, each an MLflow run nested under one `retrain` parent run; the steps live in
`coinyear.jobs.ingest` (ingest, build), `coinyear.jobs.clean` (clean) and `coinyear.jobs.gate` (validate,
decide); this module orchestrates them and records the decision:

1. ingest    feedback rows no earlier decision consumed, joined to their logged photos, and, while the training
             data is empty, the base dataset;
2. clean     drop undecodable photos, duplicates, superseded and contradictory labels, impossible years,
             counting each reason (the latest expert correction of a photo pair wins, across runs);
3. build     append the clean rows to the `training_data` Delta table, tagged with the run; its `split` column
             puts the test coin types (`data.split_test`, the one evaluation split `coinyear train` keeps out
             too) and the feedback kept for evaluation on the evaluation side, never trained on;
4. train     the recipe of `coinyear.recipe` (the one `coinyear train` uses), registered, `staging`;
5. validate  candidate and production scored on the same evaluation rows, none of which either trained on,
             with `mlflow.models.evaluate`, compared by `mlflow.validate_evaluation_results`;
6. decide    promote or reject; the decision goes to the `model_decisions` table and the version's tags. The
             promotion is a compare-and-set: when `production` is no longer the version the candidate was
             judged against (a rollback or promotion made during the run, e.g. in the UI), the alias stays where
             that person put it and the decision is `superseded`.

Consumed exactly when decided: the decision row carries the ids of the feedback rows it decided on
(`consumed_feedback`). Only a decision (promoted, rejected, or skipped because no row survived cleaning)
consumes them, and the training rows of a run count only once the run has one; a `superseded` run consumes
nothing (its feedback did not reach a live model). A run that fails anywhere — the registry unreachable when
production is read or the alias is set, training, scoring — is recorded as `failed` with the reason, moves
nothing, and leaves its feedback for the next run. Once `production` has moved to the candidate, the run is that
promotion whatever fails after it (reading the alias back, tagging the version, writing the decision row): it is
recorded as `promoted`, with what failed after in the reason, and consumes its feedback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa

from coinyear import registry
from coinyear.config import Settings, ensure_experiment
from coinyear.data import Manifest
from coinyear.jobs.clean import clean, count_reasons
from coinyear.jobs.gate import FAILED, MAE, PROMOTED, REJECTED, SKIPPED, SUPERSEDED, validate
from coinyear.jobs.ingest import build, current_rows, dataset, feedback_key, ingest, read_new_feedback, table_version
from coinyear.lake import open_lake
from coinyear.lake.tables import DECISIONS_SCHEMA, MODEL_DECISIONS, TRAINING_DATA, Lake

log = logging.getLogger(__name__)

# decisions that settle the feedback they were made on. A failed run settles nothing; nor does a superseded one:
# its candidate never served, and the person who moved production meanwhile would expect the next run to judge
# that feedback again, against the production they chose, rather than find it used up by a model nobody uses.
CONSUMING = (PROMOTED, REJECTED, SKIPPED)


def superseded_reason(changed: registry.AliasChanged, verdict: str, feedback_rows: int) -> str:
    """Why a candidate that beat production was not promoted: production moved during the run."""
    def name(version: str | None) -> str:
        return f"v{version}" if version else "none"

    return (f"production moved from {name(changed.expected)} to {name(changed.actual)} during the run (a rollback "
            f"or a promotion made meanwhile), so the candidate was not promoted over it; it had been judged against "
            f"{name(changed.expected)}: {verdict}; the {feedback_rows} feedback rows stay for the next run, which "
            f"judges a new candidate against {name(changed.actual)}")


class RetrainBusy(RuntimeError):
    """Another retraining run holds the lock."""


# ------------------------------------------------------------------------------------------------ result
@dataclass
class RetrainResult:
    decision: str  # promoted | rejected | skipped | superseded | dry_run | failed (the job itself broke)
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
    """One retraining run under the job lock: see the module docstring. A failed run is returned (decision
    `failed`, recorded in `model_decisions`), not raised."""
    with retrain_lock(settings):
        lake = open_lake(settings)
        history = retrain_decisions(lake)
        feedback_version, new_feedback = read_new_feedback(lake, consumed_keys(history))
        runs = decided_runs(history)
        existing = current_rows(lake.read(TRAINING_DATA), runs)
        first_build = len(existing) == 0
        if len(new_feedback) == 0 and not first_build and not force:
            return RetrainResult(SKIPPED, "no new feedback since the last decision; nothing to do (use --force to "
                                          "retrain anyway)")
        if dry_run:
            candidates = ingest(settings, lake, new_feedback, first_build)
            kept, dropped = clean(candidates, existing, settings)
            return RetrainResult("dry_run", f"would add {len(kept)} rows to the training data and retrain",
                                 new_feedback_rows=len(new_feedback), ingested_rows=len(kept),
                                 dropped=count_reasons(dropped))
        return Retraining(settings, lake, runs).run(new_feedback, feedback_version, existing, first_build)


def retrain_decisions(lake: Lake) -> pd.DataFrame:
    """The retraining job's rows of `model_decisions` (the deploy job writes there too)."""
    decisions = lake.read(MODEL_DECISIONS)
    if len(decisions) == 0:
        return decisions
    return decisions[decisions.get("kind", pd.Series("retrain", index=decisions.index)).fillna("retrain")
                     == "retrain"]


def consumed_keys(decisions: pd.DataFrame) -> set[str]:
    """The `feedback_key`s that decisions settled: the anti-join side of `read_new_feedback`."""
    if "consumed_feedback" not in decisions or len(decisions) == 0:
        return set()
    settled = decisions[decisions["decision"].isin(CONSUMING)]["consumed_feedback"].dropna()
    return {key for keys in settled for key in json.loads(keys)}


def decided_runs(decisions: pd.DataFrame) -> set[str]:
    """The retrain runs with a decision: only their `training_data` rows count."""
    if len(decisions) == 0:
        return set()
    return set(decisions.loc[decisions["decision"].isin(CONSUMING), "retrain_run_id"].dropna())


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


def recipe(settings: Settings):
    """The training recipe of the job: `coinyear.recipe`'s, exactly what `coinyear train` builds from the
    same settings without flags."""
    from coinyear.recipe import recipe_from_settings

    return recipe_from_settings(settings)[1]


class Retraining:
    """The steps of one run after the lock and the new-data check; each step is a nested MLflow run."""

    def __init__(self, settings: Settings, lake: Lake, decided: set[str]):
        self.settings, self.lake, self.decided = settings, lake, decided
        self.client = registry.client(settings)
        self.experiment_id = ensure_experiment(settings)
        self.parent = ""  # the retrain run's id, set when run() starts
        self.current = "start"  # the step running, named in a failure's reason
        self.promoted: str | None = None  # the version `production` was moved to, once it was

    @contextlib.contextmanager
    def step(self, name: str):
        import mlflow

        self.current = name
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name,
                              tags={"mlflow.parentRunId": self.parent, "coinyear.step": name}) as run:
            log.info("retrain step %s", name)
            yield run

    def run(self, new_feedback: pd.DataFrame, feedback_version: int, existing: pd.DataFrame,
            first_build: bool) -> RetrainResult:
        import mlflow

        self.parent = self.client.create_run(
            self.experiment_id, run_name="retrain", tags={"coinyear.job": "retrain"}).info.run_id
        result = RetrainResult(FAILED, "", run_id=self.parent, new_feedback_rows=len(new_feedback))
        keys = sorted(feedback_key(new_feedback))
        try:
            # before anything is built: without knowing production there is nothing to compare with
            self.current = "read production"
            result.production_before = registry.version_by_alias(self.settings, registry.PRODUCTION)
            with self.step("ingest"):
                candidates = ingest(self.settings, self.lake, new_feedback, first_build)
                mlflow.log_metrics({"new_feedback_rows": len(new_feedback), "candidate_rows": len(candidates)})
                mlflow.log_param("feedback_version", feedback_version)
            with self.step("clean"):
                kept, dropped = clean(candidates, existing, self.settings)
                result.dropped = count_reasons(dropped)
                mlflow.log_metrics({"kept_rows": len(kept), **{f"dropped_{k}": v for k, v in result.dropped.items()}})
                if len(dropped):
                    mlflow.log_text(dropped.to_csv(index=False), "dropped_rows.csv")
            if len(kept) == 0 and len(new_feedback) and len(existing):
                # a decision too: these rows were judged unusable, so they are settled, not examined on every run
                result.decision = SKIPPED
                result.reason = f"none of the {len(new_feedback)} new feedback rows survived cleaning"
                self.record(result, feedback_version, keys)
                return result
            with self.step("build"):
                result.ingested_rows = build(self.settings, self.lake, kept, feedback_version, self.parent, existing)
                result.training_data_version = table_version(self.lake, TRAINING_DATA)
                runs = sorted(self.decided | {self.parent})
                mlflow.log_metrics({"ingested_rows": result.ingested_rows})
                mlflow.log_param("training_data_version", result.training_data_version)
                mlflow.log_dict({"training_data_version": result.training_data_version, "retrain_runs": runs},
                                "training_data.json")
                train_rows, eval_rows = dataset(self.lake, self.settings, result.training_data_version, set(runs))
                mlflow.log_metrics({"train_rows": len(train_rows.rows), "eval_rows": len(eval_rows.rows),
                                    "unusable_rows": len(train_rows.dropped) + len(eval_rows.dropped)})
            self.train_validate_decide(result, train_rows, eval_rows, feedback_version, keys)
            return result
        except Exception as error:  # any failure: recorded, nothing moved, the feedback stays new
            if self.promoted:  # ...unless production did move: then the run is the promotion it made
                self.after_promotion(result, error, feedback_version, keys)
                return result
            log.exception("retraining failed in step %s", self.current)
            result.decision = FAILED
            result.reason = (f"{self.current} failed: {type(error).__name__}: {error}; production unchanged, the "
                             f"{len(new_feedback)} feedback rows stay for the next run")
            result.production_after = result.production_before
            with contextlib.suppress(Exception):  # the version may not exist, or the registry be down
                if result.candidate_version:
                    registry.tag_version(self.settings, result.candidate_version,
                                         {"decision": FAILED, "decision_reason": result.reason[:5000]})
            try:
                self.record(result, feedback_version, None)
            except Exception:
                log.exception("recording the failed run in %s failed too", MODEL_DECISIONS)
            return result
        finally:
            self.close_run(result)

    def close_run(self, result: RetrainResult) -> None:
        """The decision on the retrain run's tags, and the run's end: best effort. The decision is made and
        recorded by now; a tracking server failing here must not turn it into an error (the job would exit as
        failed after, say, a promotion)."""
        try:
            self.client.set_tag(self.parent, "decision", result.decision)
            self.client.set_tag(self.parent, "decision_reason", result.reason[:5000])
            self.client.set_terminated(self.parent, "FAILED" if result.decision == FAILED else "FINISHED")
        except Exception:
            log.exception("closing retrain run %s failed; its decision (%s) stands", self.parent, result.decision)

    def train_validate_decide(self, result: RetrainResult, train_rows: Manifest, eval_rows: Manifest,
                              feedback_version: int, keys: list[str]) -> None:
        from coinyear.train import run_training

        settings = self.settings
        self.current = "train"
        outcome = run_training(settings, recipe(settings), train_rows, register=True, run_name="train",
                               tags={"mlflow.parentRunId": self.parent, "coinyear.step": "train",
                                     "training_data_version": str(result.training_data_version)})
        version = outcome.version
        if version is None:  # run_training registers when asked to: a None here is a bug, not a decision
            raise RuntimeError("training registered no model version")
        result.candidate_version = version
        registry.promote(settings, version, registry.STAGING)
        registry.tag_version(settings, version,
                             {"training_data_version": result.training_data_version,
                              "training_data": self.lake.uri(TRAINING_DATA), "retrain_run_id": self.parent})
        with self.step("validate"):
            verdict = validate(settings, version, result.production_before, eval_rows)
        result.candidate_metrics, result.production_metrics = verdict.candidate_metrics, verdict.production_metrics
        if verdict.decision == FAILED:
            raise RuntimeError(verdict.reason)
        with self.step("decide"):
            result.decision, result.reason = verdict.decision, verdict.reason
            if verdict.decision == PROMOTED:
                try:
                    self.promote(version, result.production_before)
                except registry.AliasChanged as changed:
                    # moving the alias now would silently undo what someone chose during the run
                    result.decision, result.reason = SUPERSEDED, superseded_reason(changed, verdict.reason,
                                                                                   len(keys))
                else:
                    # production moved: from here on a failure is a note on this promotion, not a failed run
                    self.promoted = result.production_after = version
            self.current = "decide: read production back"
            result.production_after = registry.version_by_alias(settings, registry.PRODUCTION)
            self.current = "decide: tag the version"
            self.tag_decision(result, version)
            self.current = "decide: record the decision"
            self.record(result, feedback_version, keys)

    def tag_decision(self, result: RetrainResult, version: str) -> None:
        """The decision and its reason on the version's tags (`coinyear models list`, the Models page)."""
        registry.tag_version(self.settings, version,
                             {"decision": result.decision, "decision_reason": result.reason[:5000],
                              "decision_run_id": self.parent})

    def after_promotion(self, result: RetrainResult, error: Exception, feedback_version: int,
                        keys: list[str]) -> None:
        """`production` moved to the candidate, then `self.current` failed: record the promotion it was, with
        what failed after it, and consume the feedback the live model was trained on. "failed, production
        unchanged" would be untrue, would tag the live version `failed`, and the next run would retrain on the
        same feedback."""
        log.exception("production moved to version %s, then %s failed", self.promoted, self.current)
        result.decision = PROMOTED
        result.reason = f"{result.reason}; after the promotion, {self.current} failed: {type(error).__name__}: {error}"
        # the tags may be what failed: one more try (they also carry the note), never a reason to stop here
        try:
            self.tag_decision(result, str(self.promoted))
        except Exception:
            log.exception("tagging promoted version %s failed", self.promoted)
        try:
            self.record(result, feedback_version, keys)
        except Exception:  # the ledger is unwritable: the promotion stands, its feedback stays new
            log.exception("recording the promotion of version %s in %s failed", self.promoted, MODEL_DECISIONS)
            result.reason += (f"; the decision could not be recorded in {MODEL_DECISIONS}, so the next run sees its "
                              f"{len(keys)} feedback rows again")

    def promote(self, version: str, judged_against: str | None) -> None:
        """`production` -> `version`, only while it is still `judged_against` (registry.AliasChanged otherwise,
        nothing moved). A failure that did not move the alias raises; one that did (the answer lost after the
        change) is a promotion."""
        try:
            registry.promote(self.settings, version, registry.PRODUCTION, expected_current=judged_against)
        except registry.AliasChanged:
            raise
        except Exception as error:
            try:
                moved = registry.version_by_alias(self.settings, registry.PRODUCTION) == version
            except registry.RegistryError:
                moved = False
            if not moved:
                raise registry.RegistryError(f"cannot move production to version {version}: {error}") from error
            log.warning("moving production to version %s reported %s, but the alias did move", version, error)

    def record(self, result: RetrainResult, feedback_version: int, consumed: list[str] | None) -> None:
        """The decision row; with `consumed` (the feedback keys it settles) when it is a decision."""
        row = {
            "decided_at": datetime.now(UTC), "retrain_run_id": result.run_id,
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
            "consumed_feedback": json.dumps(consumed) if result.decision in CONSUMING and consumed is not None
            else None,
        }
        self.lake.append(MODEL_DECISIONS, pa.Table.from_pylist([row], schema=DECISIONS_SCHEMA))
