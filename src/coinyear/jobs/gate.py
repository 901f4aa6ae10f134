"""Retraining, gate: the candidate and `production` scored on the same evaluation coins through the served pyfunc,
compared with `mlflow.models.evaluate` / `mlflow.validate_evaluation_results`, and the decision with its reason.

The evaluation coins are the test coin types (`data.split_test`: a fixed hash of the coin type, kept out of every
`coinyear train` run, K-fold refit and retraining candidate) and the feedback kept for evaluation
(`ingest.assign_splits`), so neither model trained on any of them. A production version trained before that
split (its run has no `test_split` parameter) may have: the reason says so (`split_warning`).

`validate` answers PROMOTED or REJECTED only when it judged the candidate (a comparison, NaN predictions, the
latency budget); when a model cannot be loaded or scored at all it answers FAILED: no comparison was made, so
nothing may move and the feedback is not consumed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from coinyear import evaluate, registry
from coinyear.config import Settings
from coinyear.data import TEST_SPLIT_RULE, Manifest
from coinyear.jobs.ingest import FEEDBACK_SOURCE

log = logging.getLogger(__name__)

PROMOTED, REJECTED, SKIPPED, FAILED = "promoted", "rejected", "skipped", "failed"
# the candidate was judged against a `production` that someone moved during the run: not promoted (retrain.py)
SUPERSEDED = "superseded"
LATENCY_PROBES = 20
MAE = "mean_absolute_error"  # mlflow.models.evaluate's name for it


@dataclass
class Scored:
    predictions: np.ndarray
    median_ms: float = math.nan  # one-coin requests; the gate (robust to a busy machine's outliers)
    p95_ms: float = math.nan
    error: str | None = None
    python_model: object = None  # the loaded model, for the behaviour checks (not loaded twice)


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
        return Scored(predictions, float(np.median(timings)), float(np.percentile(timings, 95)),
                      python_model=model.unwrap_python_model())
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
    parts = [(f"MAE {candidate[MAE]:.2f} vs production {production[MAE]:.2f} ({100 * change:+.1f}%, "
              f"needs <= {-100 * needed:.0f}%)")]
    worse = [f"decade {d}: {candidate[decade_metric_name(d)]:.2f} vs {production[decade_metric_name(d)]:.2f}"
             for d in decades
             if candidate[decade_metric_name(d)] > production[decade_metric_name(d)]
             + settings.retrain_max_decade_regression]
    parts.append(f"{len(worse)} of {len(decades)} checked decades worse by more than "
                 f"{settings.retrain_max_decade_regression:g} years" + (f" ({'; '.join(worse)})" if worse else ""))
    return "; ".join(parts)


def split_warning(settings: Settings, version: str) -> str | None:
    """Why `version`'s score on the evaluation coins may be flattered: its training run did not keep the test
    coin types out (no `test_split` parameter of `data.TEST_SPLIT_RULE`: a model trained before the rule), so it
    may have trained on some of them. None when it did, or when the registry cannot say."""
    try:
        client = registry.client(settings)
        run_id = client.get_model_version(settings.model_name, version).run_id
        rule = client.get_run(run_id).data.params.get("test_split") if run_id else None
    except Exception:  # noqa: BLE001 - a note, never a reason to fail the gate
        log.warning("cannot read the training run of version %s: its test split is not checked", version)
        return None
    if rule == TEST_SPLIT_RULE:
        return None
    return (f"production v{version} was not trained with the test split ({TEST_SPLIT_RULE}): it may have trained "
            f"on some evaluation coins, which flatters its score")


@dataclass
class Verdict:
    decision: str  # PROMOTED | REJECTED | FAILED (no judgement possible)
    reason: str
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    production_metrics: dict[str, float] = field(default_factory=dict)


def validate(settings: Settings, candidate_version: str, production_version: str | None,
             eval_rows: Manifest) -> Verdict:
    """The verdict on the candidate against `production_version` (None: no production yet), on `eval_rows`.

    Runs inside the active MLflow (validate) run. An error or a NaN rejects at once; otherwise MLflow validation
    against production and the latency budget, every failure named in the reason."""
    import mlflow
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    rows = eval_rows.rows
    if len(rows) == 0:
        return Verdict(REJECTED, "no usable evaluation rows: the candidate cannot be judged")
    frame = encoded_frame(rows)
    truth = pd.DataFrame({"year": rows["year"].to_numpy(float), "year_from": rows["year_from"].to_numpy(float),
                          "year_to": rows["year_to"].to_numpy(float), "source": rows["source"].to_numpy()})
    decades = qualifying_decades(truth["year"], settings.retrain_decade_min_coins)
    mlflow.log_dict({"rows": len(rows), "checked_decades": decades}, "evaluation_set.json")

    candidate = score(registry.model_uri(settings, candidate_version), frame)
    if candidate.error:
        return Verdict(FAILED, f"candidate v{candidate_version} could not be scored: {candidate.error}")
    bad = int(np.sum(~np.isfinite(candidate.predictions)))
    if bad:
        return Verdict(REJECTED, f"candidate predicted NaN or infinity for {bad} of {len(rows)} coins")
    candidate_eval = evaluate_predictions(f"candidate-v{candidate_version}", truth, candidate, decades)
    verdict = Verdict(FAILED, "", candidate_metrics=candidate_eval.metrics)
    too_slow = [] if candidate.median_ms <= settings.retrain_latency_budget_ms else [
        (f"candidate too slow: median {candidate.median_ms:.1f} ms per one-coin request, "
         f"budget {settings.retrain_latency_budget_ms:g} ms")]
    if production_version is None:
        first = (f"first valid model (no production yet): MAE {candidate_eval.metrics[MAE]:.2f} years on "
                 f"{len(rows)} evaluation coins")
        verdict.decision, verdict.reason = (REJECTED, too_slow[0]) if too_slow else (PROMOTED, first)
        return verdict
    production = score(registry.model_uri(settings, production_version), frame)
    if production.error:
        # maybe the registry or the artifact store failing for a moment: no comparison, no move
        verdict.reason = f"production v{production_version} could not be scored: {production.error}"
        return verdict
    if not np.all(np.isfinite(production.predictions)):
        broken = f"production v{production_version} predicts NaN on the evaluation set"
        verdict.decision, verdict.reason = (REJECTED, "; ".join([*too_slow, broken])) if too_slow else (
            PROMOTED, f"{broken}; the valid candidate replaces it")
        return verdict
    production_eval = evaluate_predictions(f"production-v{production_version}", truth, production, decades)
    verdict.production_metrics = production_eval.metrics
    thresholds = validation_thresholds(settings, production_eval.metrics, decades)
    comparison = explain(candidate_eval.metrics, production_eval.metrics, settings, decades)
    warning = split_warning(settings, production_version)
    if warning:
        mlflow.set_tag("coinyear.production_split", warning)
        comparison = f"{comparison}; {warning}"
    try:
        mlflow.validate_evaluation_results(thresholds, candidate_eval, production_eval)
    except ModelValidationFailedException:
        verdict.decision, verdict.reason = REJECTED, "; ".join([comparison, *too_slow])
        return verdict
    loaded = {candidate_version: candidate.python_model, production_version: production.python_model}
    regressions = behaviour_regressions(settings, candidate_version, production_version, loaded) \
        if settings.retrain_behaviour_gate else []
    verdict.decision, verdict.reason = (REJECTED, "; ".join([*too_slow, *regressions, comparison])) \
        if too_slow or regressions else (PROMOTED, comparison)
    return verdict


def behaviour_regressions(settings: Settings, candidate_version: str, production_version: str,
                          loaded: dict[str, object] | None = None) -> list[str]:
    """The behaviour checks (coinyear.behaviour) the candidate fails and production passes, each as a reason;
    both reports are logged to the active validate run. `loaded`: models the gate already loaded, by version."""
    import mlflow

    from coinyear.behaviour import behaviour_cases, check_behaviour

    try:
        cases = behaviour_cases(settings.data_dir)
    except (ValueError, FileNotFoundError) as error:  # a collection without OCRE's emperors: nothing to check
        log.warning("behaviour checks not run: %s", error)
        mlflow.set_tag("coinyear.behaviour", f"not run: {error}")
        return []
    reports = {}
    for role, version in (("candidate", candidate_version), ("production", production_version)):
        python_model = (loaded or {}).get(version) or \
            mlflow.pyfunc.load_model(registry.model_uri(settings, version)).unwrap_python_model()
        if not callable(getattr(python_model, "score_tensors", None)):  # not a coinyear model: nothing to hold to
            log.warning("behaviour checks not run: %s v%s is a %s, not a coinyear model", role, version,
                        type(python_model).__name__)
            mlflow.set_tag("coinyear.behaviour", f"not run: {role} v{version} is not a coinyear model")
            return []
        reports[role] = check_behaviour(python_model, cases, settings.retrain_behaviour_tolerance)
        mlflow.log_dict(reports[role].to_dict(), f"behaviour/{role}-v{version}.json")
    return [f"behaviour check broken: {message}"
            for message in reports["candidate"].regressions(reports["production"]).values()]
