"""The main job on the embedded defaults, as `make demo` runs it: the reference data, training with MLflow
tracking, registration and promotion to production, then the production model scored from the photos on the test
coin types (`data.split_test`: no model trained, stopped early or calibrated on them). It prints its steps as it
goes and ends with a summary: the time of each step and the model's figures.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# the figures the summary shows, in order: (metric key of evaluate.table_report, label, kind)
SUMMARY_FIGURES = (
    ("mae", "year MAE (to the catalogue range's midpoint)", "years"),
    ("within_10y", "within ±10 years", "share"),
    ("portrait_top1", "portrait named right (top-1)", "share"),
    ("portrait_top3", "right portrait among the top 3", "share"),
    ("interval90_coverage", "90% range holds the catalogue date", "share"),
    ("interval90_median_width", "90% range, median width", "years"),
)


@dataclass
class DemoSummary:
    """What the demo did: seconds per step (in order), the version it promoted and its test-type figures."""

    seconds: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    version: str | None = None
    data: str = ""
    test_coins: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        """The closing summary a person reads."""
        width = max(len(label) for _, label, _ in SUMMARY_FIGURES)
        lines = ["", "Summary", "  time per step:"]
        lines += [f"    {step:<13} {_duration(seconds)}" for step, seconds in self.seconds.items()]
        lines.append(f"    {'total':<13} {_duration(sum(self.seconds.values()))}")
        lines.append(f"  data: {self.data}")
        lines.append(f"  model: {self.model_name} version {self.version} (alias production)")
        lines.append(f"  on the {self.test_coins} coins of the test coin types (never trained, stopped or "
                     "calibrated on):")
        for key, label, kind in SUMMARY_FIGURES:
            value = self.metrics.get(key)
            if value is None or value != value:  # absent, or NaN: nothing to measure it on
                continue
            shown = f"{100 * value:.1f}%" if kind == "share" else f"{value:.1f} years"
            lines.append(f"    {label:<{width}}  {shown}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _step(name: str, summary: DemoSummary, work: Callable[[], T]) -> T:
    """Run one step, announce it and record its time."""
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    result = work()
    summary.seconds[name] = summary.seconds.get(name, 0.0) + time.perf_counter() - started
    return result


def run_demo(settings, source: str | None = None, setup_seconds: float | None = None,
             limit: int | None = None) -> DemoSummary:
    """Fetch (or find) the reference data, train and register the default recipe, promote it to production and
    score it on the test coin types; returns the summary. `setup_seconds` is the virtual environment's set-up
    time as measured by `make demo` (shown first in the summary); `limit` trains on a random subset of that many
    coins (a quick look, and the tests)."""
    from coinyear import reference, registry
    from coinyear.config import configure_mlflow, set_torch_threads
    from coinyear.data import read_manifest, split_test
    from coinyear.evaluate import evaluate_model, format_report
    from coinyear.recipe import recipe_from_settings
    from coinyear.train import run_training

    summary = DemoSummary(model_name=settings.model_name)
    if setup_seconds is not None:
        summary.seconds["set-up"] = setup_seconds
    # one line per epoch (coinyear.fit) and per fold: the long step shows progress
    for stage in ("coinyear.train", "coinyear.experiment", "coinyear.fit"):
        logging.getLogger(stage).setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    # the demo prints its own steps: MLflow's database set-up lines and its schema hints are not for this reader
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")

    def data():
        fetched = reference.fetch(settings.data_dir, settings.home, source=source,
                                  fallback_source=settings.data_source)
        print(fetched.message)
        return fetched.path

    data_dir = _step("data", summary, data)
    settings = settings.model_copy(update={"data_dir": data_dir})
    set_torch_threads(settings)
    _, config = recipe_from_settings(settings, limit=limit)
    manifest = read_manifest(data_dir, settings.min_year, settings.max_year, limit=config.limit, seed=config.seed)
    summary.data = f"{len(manifest.rows):,} coins from {data_dir}"

    started = time.perf_counter()
    outcome = _step("training and registration", summary,
                    lambda: run_training(settings, config, manifest, register=True))
    # run_training trains, then logs and registers the model (the ONNX export and its checks): split the time
    elapsed = summary.seconds.pop("training and registration")
    trained = min(outcome.metrics.get("train_seconds", elapsed), elapsed)
    summary.seconds["training"], summary.seconds["registration"] = trained, elapsed - trained
    if outcome.version is None:
        raise RuntimeError(f"run {outcome.run_id} registered no model version")
    summary.version = outcome.version
    registry.promote(settings, outcome.version, registry.PRODUCTION)
    summary.seconds["registration"] += time.perf_counter() - started - elapsed
    print(f"registered {settings.model_name} version {outcome.version}; alias {registry.PRODUCTION} -> it")

    def evaluation():
        configure_mlflow(settings)
        rows = manifest.rows.iloc[split_test(manifest.rows)[1]].reset_index(drop=True)
        report = evaluate_model(f"models:/{settings.model_name}@{registry.PRODUCTION}", rows, progress=True)
        print(format_report(report["metrics"], f"version {outcome.version} on the {len(rows)} test-type coins:"))
        return rows, report

    rows, report = _step("evaluation", summary, evaluation)
    summary.test_coins, summary.metrics = len(rows), report["metrics"]
    print(summary.report())
    return summary
