"""Training stage, the tracked run: `run_training` is what `coinyear train` calls. It validates the data, logs
the dataset, runs one training experiment (`experiment.train_on_manifest`: test coin types set aside, grouped
K-fold or a grouped hold-out, the model to serve fitted, calibrated and scored once on the test types), and logs
everything to MLflow (params, per-epoch and per-fold metrics, plots, dataset summary, the pyfunc model with
signature and input example) and registers a new model version.

The stage's other modules, lowest first: `recipe` (TrainConfig and its one builder), `augment`, `fit` (dataset,
loss, the epoch loop), `experiment` (splits, folds, calibration, test scores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coinyear import evaluate
from coinyear.data import Manifest
from coinyear.experiment import TrainingResult, train_on_manifest
from coinyear.recipe import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_id: str
    version: str | None
    metrics: dict[str, float]


def _log_plots(result: TrainingResult) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    table = result.predictions
    figures = {
        "plots/loss_curves.png": evaluate.plot_loss_curves(result.histories),
        "plots/predicted_vs_true.png": evaluate.plot_predicted_vs_true(table["predicted"], table["year_from"],
                                                                       table["year_to"]),
        "plots/decade_confusion.png": evaluate.plot_decade_confusion(
            evaluate.decade_confusion(table["predicted"], table["year_from"], table["year_to"])),
        "plots/decade_mae.png": evaluate.plot_decade_mae(
            evaluate.per_decade_mae(table["predicted"], table["year_from"], table["year_to"])),
    }
    for path, figure in figures.items():
        mlflow.log_figure(figure, path)
        plt.close(figure)
    mlflow.log_table(evaluate.per_decade_mae(table["predicted"], table["year_from"], table["year_to"]),
                     "evaluation/decade_mae.json")
    mlflow.log_text(table.to_csv(index=False), "evaluation/predictions.csv")
    test = result.test_predictions
    if len(test):  # the served model on the test coin types: what the test_* metrics were computed from
        figure = evaluate.plot_predicted_vs_true(test["predicted"], test["year_from"], test["year_to"],
                                                 title="test coin types: predicted vs true")
        mlflow.log_figure(figure, "plots/test_predicted_vs_true.png")
        plt.close(figure)
        mlflow.log_text(test.to_csv(index=False), "evaluation/test_predictions.csv")


def run_training(settings, config: TrainConfig, manifest: Manifest | None = None, register: bool = True,
                 run_name: str | None = None, tags: dict | None = None, tensor_dir: Path | None = None,
                 trace: list | None = None) -> RunOutcome:
    """Validate the data, train, and log the whole run to MLflow; register a new model version.

    Under TorchDistributor this is what rank 0 runs (`coinyear.distributed`), the other ranks running only
    `train_on_manifest`; `tensor_dir` and `trace` are passed on to it."""
    import tempfile

    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    from coinyear.config import ensure_experiment
    from coinyear.data import TEST_SPLIT_RULE, read_manifest, split_test
    from coinyear.neighbours import reference_file
    from coinyear.pyfunc import input_example, log_model

    experiment_id = ensure_experiment(settings)
    if manifest is None:
        manifest = read_manifest(settings.data_dir, settings.min_year, settings.max_year,
                                 limit=config.limit, seed=config.seed)
    log.info(manifest.report())
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({**config.flat(), "test_split": TEST_SPLIT_RULE})
        summary = manifest.summary()
        mlflow.log_params({f"data_{k}": v for k, v in summary.items() if not isinstance(v, dict)})
        mlflow.log_dict(summary, "dataset/summary.json")
        if len(manifest.dropped):
            mlflow.log_text(manifest.dropped.to_csv(index=False), "dataset/dropped_rows.csv")
        columns = [c for c in ("coin_id", "year_from", "year_to", "group") if c in manifest.rows.columns]
        usable, test_index = split_test(manifest.rows)
        logged = manifest.rows[columns].assign(test=np.isin(np.arange(len(manifest.rows)), test_index))
        mlflow.log_input(from_pandas(logged, source=str(manifest.source), name="coins"), context="training")

        result = train_on_manifest(manifest, config, settings.cache_dir,
                                   on_metrics=lambda metrics, step=None: mlflow.log_metrics(metrics, step=step),
                                   tensor_dir=tensor_dir, trace=trace)
        model, quality = result.model, result.quality
        assert model is not None and quality is not None, "train_on_manifest gives rank 0 the served model"
        mlflow.set_tag("pretrained_weights", str(model.pretrained_loaded))
        _log_plots(result)
        with tempfile.TemporaryDirectory() as folder:
            from coinyear.model import save_checkpoint

            checkpoint = Path(folder) / "model.pt"
            save_checkpoint(model, checkpoint)
            info = log_model(checkpoint, input_example(manifest.rows),
                             registered_model_name=settings.model_name if register else None,
                             quality={**quality.save(Path(folder) / "quality"),
                                      # the OOD reference's coins, in its order: the non-test rows
                                      **reference_file(manifest.rows.iloc[usable], settings.cache_dir,
                                                       Path(folder) / "quality")},
                             torch_index=settings.model_torch_index)
        version = str(info.registered_model_version) if register and info.registered_model_version else None
        return RunOutcome(run.info.run_id, version, result.metrics)
