"""The settings object: one process may build several (tests, the retraining job) without one leaking into the
next through the environment."""

from __future__ import annotations

import os

import mlflow
import pytest

from coinyear.config import Settings, configure_mlflow

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
