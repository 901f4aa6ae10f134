"""The ONNX runtime logged with the model (coinyear.runtime): on real OCRE coins OpenVINO and ONNX Runtime answer
what PyTorch answers, the graph is only attached when it matched at logging time, OpenVINO serves when it is there
and ONNX Runtime when it is not, and a model without the graph (or without either runtime) still answers with
PyTorch. Also: the batched rotation TTA gives the years of the per-angle loop it replaced.

The model is the default architecture (efficientnet_lite0, shared backbone, 5-angle rotation TTA) trained for one
epoch on 40 coins at 64 px: its years respond to the photo and to the rotation (the session's mobilenet_v3_small
from scratch answers one year for every coin after one epoch, which any runtime would match trivially).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from coinyear.model import CoinEnsemble, infer, save_checkpoint
from coinyear.pyfunc import BACK, FRONT, ONNX, decode_pair, encode_file, log_model
from coinyear.runtime import TOLERANCE_YEARS
from tests.conftest import make_settings, small_train_config

COINS = 24


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """(settings, outcome) of the default architecture trained briefly and registered in a home of its own.

    Without the post-hoc levers (`calibrate=False`): on 40 coins the fitted ruler blend can reach 1 with the pooled
    mixture, whose years do not move with a rotation, and these tests are about the rotations and the graph; the
    levers' own path through the ONNX graph is tests/model/test_levers.py's."""
    from coinyear.train import run_training

    settings = make_settings(tmp_path_factory.mktemp("lite") / "home")
    config = small_train_config(model={"backbone": "efficientnet_lite0"}, limit=40, calibrate=False)
    assert len(config.tta_angles) == 5
    return settings, run_training(settings, config)


def _use_registry(settings) -> None:
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri if settings else None)
    mlflow.set_registry_uri(settings.mlflow_registry_uri if settings else None)


def _load(settings, uri: str):
    _use_registry(settings)
    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model()
    finally:
        _use_registry(None)


@pytest.fixture(scope="module")
def served(lite):
    """The registered version as any server loads it."""
    settings, outcome = lite
    return _load(settings, f"models:/{settings.model_name}/{outcome.version}")


@pytest.fixture(scope="module")
def coins(ocre_dir) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """The last COINS coins of the manifest (the training slice takes the first ones), at 64 px as served."""
    rows = pd.read_csv(ocre_dir / "manifest.csv").tail(COINS)
    pairs = [decode_pair((ocre_dir / row.obverse).read_bytes(), (ocre_dir / row.reverse).read_bytes(), 64, False)
             for row in rows.itertuples()]
    fronts = torch.from_numpy(np.stack([front for front, _ in pairs])).float() / 255
    backs = torch.from_numpy(np.stack([back for _, back in pairs])).float() / 255
    frame = pd.DataFrame({FRONT: [encode_file(ocre_dir / path) for path in rows.obverse],
                          BACK: [encode_file(ocre_dir / path) for path in rows.reverse]})
    return fronts, backs, frame


def test_onnx_answers_like_pytorch_on_real_coins(served, coins):
    fronts, backs, frame = coins
    assert served.engine == "openvino" and served.onnx is not None
    assert isinstance(served.model, CoinEnsemble) and len(served.model.tta_angles) == 5
    onnx = served.score_tensors(fronts, backs, with_features=True, batch_size=8)
    plain = {key: value.numpy() for key, value in infer(served.model, fronts, backs, True).items()}
    assert plain["year"].std() > 1 and (plain["spread"] > 0.01).all(), "years must respond to photo and rotation"
    difference = np.abs(onnx["year"] - plain["year"]).max()
    assert difference < TOLERANCE_YEARS
    assert np.abs(onnx["spread"] - plain["spread"]).max() < TOLERANCE_YEARS
    np.testing.assert_allclose(onnx["features"], plain["features"], rtol=1e-3, atol=1e-3)
    # the fused embedding the era-shift score compares comes out of the same graph
    assert onnx["embedding"].shape == plain["embedding"].shape and onnx["embedding"].shape[0] == COINS
    np.testing.assert_allclose(onnx["embedding"], plain["embedding"], rtol=1e-3, atol=1e-3)
    # the MLflow interface (decoding, batching, intervals) on the ONNX path
    assert np.abs(served.predict(None, frame) - plain["year"]).max() < TOLERANCE_YEARS
    ranged = served.predict(None, frame, params={"interval": 0.9, "batch_size": 5})
    assert np.abs(ranged["year"].to_numpy() - plain["year"]).max() < TOLERANCE_YEARS
    assert (ranged["low"] <= ranged["year"]).all() and (ranged["year"] <= ranged["high"]).all()
    # the portrait head's probabilities come out of the same graph, averaged over the rotations like PyTorch's
    assert onnx["portraits"].shape == plain["portraits"].shape == (COINS, len(served.portraits))
    np.testing.assert_allclose(onnx["portraits"], plain["portraits"], atol=1e-3)
    np.testing.assert_allclose(onnx["portraits"].sum(axis=1), 1, atol=1e-4)
    named = served.predict(None, frame, params={"portraits": 3, "interval": 0.9})
    names = [name for name, _ in served.portraits]
    assert list(named.columns) == ["year", "portraits", "low", "high", "out_of_distribution"]
    for row, listed in zip(plain["portraits"], named["portraits"]):
        assert [entry["portrait"] for entry in listed] == [names[c] for c in np.argsort(-row, kind="stable")[:3]]
        probabilities = [entry["probability"] for entry in listed]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-3
        assert all(entry["year"] == pytest.approx(dict(served.portraits)[entry["portrait"]], abs=0.05)
                   for entry in listed)
    print(f"ONNX vs PyTorch on {COINS} real coins: max |year difference| {difference:.2e} years")


def test_the_served_flag_reads_the_era_shift_score(served, coins):
    """The MLflow interface passes the graph's fused embedding and view disagreement to the flag: with an
    era-shift score whose ceiling flags most calibration coins, the served answer flags what
    `FeatureDistance.flag` says from the same outputs, and more coins than without the score."""
    fronts, backs, frame = coins
    scored = served.score_tensors(fronts, backs, with_features=True, batch_size=8)
    original = served.quality
    ood = replace(original.ood)
    ood.fit_shift(scored["embedding"], np.arange(COINS), np.arange(COINS), scored["disagreement"], rate=0.9)
    served.quality = replace(original, ood=ood)
    try:
        answered = served.predict(None, frame, params={"interval": 0.9})["out_of_distribution"].to_numpy(bool)
    finally:
        served.quality = original
    expected = ood.flag(scored["features"], None, scored.get("portraits"), scored["disagreement"], scored["embedding"])
    without = original.ood.flag(scored["features"], None, scored.get("portraits"), scored["disagreement"])
    assert answered.tolist() == expected.tolist()
    assert expected.sum() > without.sum()


def test_batched_tta_gives_the_years_of_one_rotation_per_call(served, coins):
    """One grid_sample over all angles and one forward pass per member == torchvision's rotate per angle, and the
    fused OOD features and embedding == a separate unrotated pass."""
    ensemble = served.model
    fronts, backs = (images[:8] for images in coins[:2])  # the per-angle reference is slow: 8 coins suffice
    with torch.inference_mode():
        per_angle = []
        for angle in ensemble.tta_angles:
            rotated = [F.rotate(x, angle, interpolation=F.InterpolationMode.BILINEAR) if angle else x
                       for x in (fronts, backs)]
            per_angle.append(torch.stack([member(*rotated) for member in ensemble.members], dim=1))
        expected = torch.stack(per_angle, dim=2)
        samples = ensemble.year_samples(fronts, backs)
        separate = ensemble.ood_features(fronts, backs)
        fused = ensemble.features(fronts, backs)
    assert samples.shape == expected.shape == (8, 1, 5)
    assert (samples - expected).abs().max() < 1e-4
    assert (expected.std(dim=2) > 0.01).all()
    out = infer(ensemble, fronts, backs, with_features=True)
    assert torch.allclose(out["year"], expected.mean(dim=(1, 2)), atol=1e-4)
    assert torch.allclose(out["features"], separate, atol=1e-5)
    assert torch.allclose(out["embedding"], fused, atol=1e-5)


def test_logged_model_carries_the_checked_onnx_graph(lite):
    from importlib.metadata import version

    settings, outcome = lite
    run = mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(outcome.run_id)
    assert run.data.tags["coinyear.runtime"] == "openvino"
    assert "matches PyTorch" in run.data.tags["coinyear.onnx_check"]
    assert 0 <= run.data.metrics["onnx_max_abs_diff_years"] < TOLERANCE_YEARS
    assert 0 <= run.data.metrics["openvino_max_abs_diff_years"] < TOLERANCE_YEARS
    _use_registry(settings)
    try:
        files = Path(mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}/{outcome.version}"))
    finally:
        _use_registry(None)
    requirements = (files / "requirements.txt").read_text().splitlines()
    assert f"onnxruntime=={version('onnxruntime')}" in requirements
    assert f"openvino=={version('openvino').split('+')[0]}" in requirements
    assert json.loads((files / "artifacts" / "runtimes.json").read_text()) == ["openvino", "onnxruntime"]
    assert (files / "artifacts" / "model.onnx").stat().st_size > 1_000_000  # the weights are inside


def test_without_openvino_onnx_runtime_serves_the_same_years(lite, served, coins, monkeypatch):
    settings, outcome = lite
    fronts, backs, _ = coins
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    fallback = _load(settings, f"models:/{settings.model_name}/{outcome.version}")
    assert fallback.engine == "onnxruntime" and fallback.onnx is not None
    theirs = fallback.score_tensors(fronts, backs, with_features=True, batch_size=8)
    ours = served.score_tensors(fronts, backs, with_features=True, batch_size=8)
    assert np.abs(theirs["year"] - ours["year"]).max() < TOLERANCE_YEARS
    np.testing.assert_allclose(theirs["features"], ours["features"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(theirs["portraits"], ours["portraits"], atol=1e-3)


def test_without_either_runtime_the_same_model_answers_with_pytorch(lite, served, coins, monkeypatch):
    settings, outcome = lite
    _, _, frame = coins
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    fallback = _load(settings, f"models:/{settings.model_name}/{outcome.version}")
    assert fallback.engine == "pytorch" and fallback.onnx is None
    assert np.abs(fallback.predict(None, frame) - served.predict(None, frame)).max() < TOLERANCE_YEARS


def _log(folder: Path, checkpoint: Path, frame: pd.DataFrame, **kwargs):
    """log_model in a run of a store of its own; (run, model info)."""
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("runtime", artifact_location=str(folder / "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_model(checkpoint, frame.head(1), **kwargs)
        return mlflow.MlflowClient().get_run(run.info.run_id), info
    finally:
        mlflow.set_tracking_uri(None)


def _files(info, folder: Path) -> Path:
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        return Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder / "model")))
    finally:
        mlflow.set_tracking_uri(None)


def test_a_model_logged_without_the_graph_answers_with_pytorch(served, coins, tmp_path):
    _, _, frame = coins
    save_checkpoint(served.model, tmp_path / "model.pt")
    run, info = _log(tmp_path, tmp_path / "model.pt", frame, onnx=False)
    files = _files(info, tmp_path)
    assert "onnxruntime" not in (files / "requirements.txt").read_text()
    assert not (files / "artifacts" / "model.onnx").exists()
    assert "coinyear.runtime" not in run.data.tags
    plain = mlflow.pyfunc.load_model(str(files)).unwrap_python_model()
    assert plain.engine == "pytorch" and plain.onnx is None
    assert np.abs(plain.predict(None, frame) - served.predict(None, frame)).max() < TOLERANCE_YEARS


def test_a_graph_that_does_not_match_is_not_attached(served, coins, tmp_path, monkeypatch):
    """The check is real: with a tolerance nothing can meet, the model logs without the graph (served by
    PyTorch, no onnxruntime requirement) and the run records the difference."""
    import coinyear.runtime

    _, _, frame = coins
    save_checkpoint(served.model, tmp_path / "model.pt")
    monkeypatch.setattr(coinyear.runtime, "TOLERANCE_YEARS", -1.0)
    run, info = _log(tmp_path, tmp_path / "model.pt", frame)
    assert run.data.tags["coinyear.runtime"] == "pytorch"
    assert "differs from PyTorch" in run.data.tags["coinyear.onnx_check"]
    assert 0 <= run.data.metrics["onnx_max_abs_diff_years"] < TOLERANCE_YEARS
    files = _files(info, tmp_path)
    assert "onnxruntime" not in (files / "requirements.txt").read_text()
    assert "openvino" not in (files / "requirements.txt").read_text()
    from mlflow.models import Model

    assert ONNX not in Model.load(str(files)).flavors["python_function"].get("artifacts", {})
    loaded = mlflow.pyfunc.load_model(str(files)).unwrap_python_model()
    assert loaded.engine == "pytorch"
    assert np.isfinite(loaded.predict(None, frame.head(2))).all()
