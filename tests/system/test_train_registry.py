"""System: a real training run on OCRE coins, tracked in a real MLflow store, registered, promoted, rolled
back, and loaded back through MLflow to answer the API's base64 payload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from coinyear import registry
from coinyear.pyfunc import BACK, FRONT, InvalidCoinInput, encode_file
from tests.conftest import coin_image, make_settings, small_train_config


def test_training_run_logs_everything_and_registers_a_version(trained):
    settings, outcome = trained
    assert outcome.version == "1"
    client = registry.client(settings)
    run = client.get_run(outcome.run_id)
    assert run.data.params["backbone"] == "mobilenet_v3_small"
    assert run.data.params["loss"] == "interval"
    # val_*: the validation coins choices were made on; test_*: the test coin types, never used for a choice
    for key in ("val_mae", "val_rmse", "val_r2", "val_within_5y", "val_within_10y", "val_within_50y",
                "val_range_mae", "train_seconds", "test_mae", "test_within_10y", "test_count",
                "test_interval90_coverage", "test_interval90_median_width", "test_portrait_top1",
                "test_portrait_top3"):
        assert key in run.data.metrics, key
    assert np.isfinite(run.data.metrics["val_mae"]) and np.isfinite(run.data.metrics["test_mae"])
    assert run.data.params["test_split"] == "sha256(coin type) % 100 < 15"
    assert [m.step for m in client.get_metric_history(outcome.run_id, "holdout/train_loss")] == [1]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert artifacts == {"plots/loss_curves.png", "plots/predicted_vs_true.png", "plots/decade_confusion.png",
                         "plots/decade_mae.png", "plots/test_predicted_vs_true.png"}
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="dataset/summary.json",
        tracking_uri=settings.mlflow_tracking_uri)).read_text())
    assert summary["rows"] == 80 and summary["valid"] + summary["dropped"] == 80


def test_logged_model_has_the_api_signature_and_an_input_example(trained):
    settings, _ = trained
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    info = mlflow.models.get_model_info(registry.model_uri(settings, "production"))
    assert [c["name"] for c in info.signature.inputs.to_dict()] == [FRONT, BACK]
    assert info.saved_input_example_info is not None


def test_pyfunc_answers_a_base64_payload(trained, ocre_dir):
    settings, _ = trained
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(registry.model_uri(settings, "production"))
    rows = pd.read_csv(ocre_dir / "manifest.csv").dropna(subset=["obverse"]).head(3)
    frame = pd.DataFrame({FRONT: [encode_file(ocre_dir / p) for p in rows["obverse"]],
                          BACK: [encode_file(ocre_dir / p) for p in rows["reverse"]]})
    years = np.asarray(model.predict(frame))
    assert years.shape == (3,) and np.isfinite(years).all()
    assert years.min() > -200 and years.max() < 400
    # the same coin alone gets the same year as in a batch
    assert np.asarray(model.predict(frame.head(1)))[0] == pytest.approx(years[0], abs=1e-3)


@pytest.mark.parametrize("front,message", [("not base64!!", "not valid base64"),
                                           ("aGVsbG8=", "not a readable image"),
                                           ("", "non-empty")])
def test_pyfunc_names_the_bad_row(trained, front, message):
    import base64

    settings, _ = trained
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(registry.model_uri(settings, "production")).unwrap_python_model()
    good = base64.b64encode(coin_image(1)).decode()
    frame = pd.DataFrame({FRONT: [good, front], BACK: [good, good]})
    with pytest.raises(InvalidCoinInput, match=f"row 1: .*{message}"):
        model.predict(None, frame)


def test_promote_and_repeated_rollback(tmp_path):
    from coinyear.train import run_training

    settings = make_settings(tmp_path / "home")
    config = small_train_config(limit=24, model={"image_size": 32})
    versions = [run_training(settings, config).version for _ in range(3)]
    assert versions == ["1", "2", "3"]
    with pytest.raises(registry.RegistryError, match="no production version"):
        registry.rollback(settings)
    for version in versions:
        registry.promote(settings, version, registry.PRODUCTION)
    registry.promote(settings, "3", registry.STAGING)
    assert registry.version_by_alias(settings, "production") == "3"
    assert registry.rollback(settings) == ("3", "2")
    assert registry.rollback(settings) == ("2", "1")
    assert registry.version_by_alias(settings, "production") == "1"
    with pytest.raises(registry.RegistryError, match="no earlier production"):
        registry.rollback(settings)
    assert registry.version_by_alias(settings, "staging") == "3"
    listed = {v.version: v for v in registry.list_versions(settings)}
    assert listed["1"].aliases == ["production"] and "staging" in listed["3"].aliases
    assert "val_mae" in listed["2"].metrics
    with pytest.raises(registry.RegistryError, match="no version 9"):
        registry.promote(settings, 9, registry.PRODUCTION)


def run_cli(settings, *args, env: dict | None = None):
    # Only COINYEAR_HOME, as a user runs it: every command must find the tracking store and registry from it
    # (no MLFLOW_TRACKING_URI, and a working directory with no store in it).
    env = {"COINYEAR_HOME": str(settings.home), "COINYEAR_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "coinyear.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=settings.home.parent, check=False)


def test_cli_lists_models_and_evaluates_production_on_the_test_coin_types(trained):
    settings, outcome = trained
    listing = run_cli(settings, "models", "list")
    assert listing.returncode == 0, listing.stderr
    assert "production" in listing.stdout and "      1" in listing.stdout
    # the fixture trained on 80 coins drawn with seed 1: --holdout scores the test coin types among them
    config = small_train_config()
    result = run_cli(settings, "evaluate", "--model", "models:/coinyear@production", "--limit", str(config.limit),
                     "--holdout", "--json", env={"COINYEAR_SEED": str(config.seed)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"]["valid"] > 70 and report["data"]["holdout"]
    assert report["data"]["scored"] == report["metrics"]["count"] == outcome.metrics["test_count"]
    assert report["data"]["scored"] < report["data"]["valid"] / 3
    # the registered model, decoded from the photos, scores the test types as training reported it
    metrics = report["metrics"]
    for name in ("mae", "within_10y", "interval90_coverage", "interval90_median_width"):
        assert metrics[name] == pytest.approx(outcome.metrics[f"test_{name}"], abs=0.05), name
    # portraits and the flag: the same up to one coin whose near-tied scores another runtime (ONNX) orders otherwise
    count = metrics["portrait_count"]
    assert count == outcome.metrics["test_portrait_count"]
    for name in ("portrait_top1", "portrait_top3") if count else ():
        assert metrics[name] == pytest.approx(outcome.metrics[f"test_{name}"], abs=1 / count + 1e-9), name
    assert metrics["ood_flagged"] == pytest.approx(outcome.metrics["test_ood_flagged"], abs=1 / metrics["count"] + 1e-9)
    assert {"mae_portrait_right", "mae_portrait_wrong"} <= set(metrics)
    assert set(metrics) >= {"mae", "rmse", "r2", "within_5y", "within_10y", "within_50y", "range_mae"}
    assert report["per_decade"] and "mae" in report["per_decade"][0]
    assert report["portrait_classes"] and report["portrait_classes"][-1] == "other"
    text = run_cli(settings, "evaluate", "--model", "models:/coinyear@production", "--limit", str(config.limit),
                   "--holdout", env={"COINYEAR_SEED": str(config.seed)})
    assert text.returncode == 0, text.stderr
    assert "test coin types" in text.stdout and "portrait right (top 1)" in text.stdout
    assert "90% range holds the year" in text.stdout


def test_cli_reports_a_bad_promotion_without_a_traceback(trained):
    settings, _ = trained
    result = run_cli(settings, "models", "promote", "42", "--to", "production")
    assert result.returncode == 2
    assert "no version 42" in result.stderr and "Traceback" not in result.stderr
