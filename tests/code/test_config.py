"""The settings object: one process may build several (tests, the retraining job) without one leaking into the
next through the environment."""

from __future__ import annotations

import os
import re

import mlflow
import pytest

from coinyear.config import Settings, configure_mlflow, ensure_experiment

URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "COINYEAR_TRACKING_URI", "COINYEAR_REGISTRY_URI")


@pytest.fixture
def clean_mlflow(monkeypatch):
    """No MLflow URI in the environment, and MLflow's own URIs put back after the test."""
    for name in URI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry)


def test_a_later_settings_does_not_pick_up_an_earlier_settings_mlflow_uri(tmp_path, clean_mlflow):
    first = Settings(home=tmp_path / "a")
    configure_mlflow(first)
    assert mlflow.get_tracking_uri() == first.mlflow_tracking_uri
    assert mlflow.get_registry_uri() == first.mlflow_registry_uri

    second = Settings(home=tmp_path / "b")
    own = f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"
    assert second.tracking_uri is None
    assert second.mlflow_tracking_uri == own and second.mlflow_registry_uri == own
    configure_mlflow(second)
    assert mlflow.get_tracking_uri() == own and mlflow.get_registry_uri() == own


def test_configuring_mlflow_leaves_a_uri_the_user_set_as_it_was(tmp_path, clean_mlflow, monkeypatch):
    user = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user)
    configure_mlflow(Settings(home=tmp_path / "a", tracking_uri=f"sqlite:///{tmp_path / 'other.db'}"))
    assert os.environ["MLFLOW_TRACKING_URI"] == user
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert Settings(home=tmp_path / "b").mlflow_tracking_uri == user


@pytest.mark.parametrize("store", ["default", "sqlite"])
def test_a_local_tracking_store_keeps_its_artifacts_under_the_home(tmp_path, clean_mlflow, monkeypatch, store):
    """Before: with a tracking URI set (a SQLite file, as the tests and a shared local store set it), MLflow put
    every run's plots and logged models in ./mlruns of the directory the command ran in."""
    monkeypatch.chdir(tmp_path)
    uri = {"default": None, "sqlite": f"sqlite:///{tmp_path / 'other.db'}"}[store]
    settings = Settings(home=tmp_path / "home", tracking_uri=uri)
    experiment = mlflow.get_experiment(ensure_experiment(settings))
    assert experiment.artifact_location == (tmp_path / "home" / "mlartifacts").resolve().as_uri()
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        mlflow.log_text("a plot", "plots/note.txt")
    assert (tmp_path / "home" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("COINYEAR_EPOCHS", "0", "epochs\n  Input should be greater than or equal to 1"),
    ("COINYEAR_LR", "-0.001", "lr\n  Input should be greater than 0"),
    ("COINYEAR_FOLDS", "1", "folds must be 0 (one grouped hold-out) or at least 2"),
    ("COINYEAR_LOSS", "mae", "loss\n  Input should be 'interval' or 'mse'"),
    ("COINYEAR_MODE", "triple", "mode\n  Input should be 'shared' or 'dual'"),
    ("COINYEAR_RESHOOT", "2", "reshoot\n  Input should be less than or equal to 1"),
    ("COINYEAR_AUX_HEADS", "portrait,legend", "aux_heads.1\n  Input should be 'mint', 'denomination' or 'portrait'"),
])
def test_a_setting_out_of_bounds_is_refused_with_its_name(monkeypatch, variable, value, message):
    """Before: COINYEAR_EPOCHS=0 or COINYEAR_LOSS=mae were read as given and failed (or not) deep in training."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings()


def test_tokens_never_show_in_a_repr_or_a_log(monkeypatch):
    monkeypatch.setenv("COINYEAR_API_TOKENS", "ada:ada-secret-1, bare-secret-2")
    monkeypatch.setenv("COINYEAR_API_TOKEN", "ui-secret-3")
    settings = Settings()
    shown = f"{settings!r} {settings} {settings.model_dump()}"
    assert not any(secret in shown for secret in ("ada-secret-1", "bare-secret-2", "ui-secret-3"))
    assert settings.api_token_entries() == ["ada:ada-secret-1", "bare-secret-2"]  # where a token is compared
