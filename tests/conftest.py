"""Shared fixtures: an isolated COINYEAR_HOME per test session, the OCRE data in place, small made-up
images, and one small trained + registered model that system tests reuse."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from coinyear.config import Settings

REPO = Path(__file__).resolve().parents[1]
# Where the settings find the reference data (COINYEAR_DATA_DIR, else ../shared/data/ocre, else what `coinyear data
# fetch` put in COINYEAR_HOME/data/ocre), seen from the repository root as `make test` runs.
OCRE = Settings().data_dir.resolve()
# Every command a test starts reads that copy too, whatever its own COINYEAR_HOME or working directory.
os.environ.setdefault("COINYEAR_DATA_DIR", str(OCRE))


def pytest_addoption(parser):
    parser.addoption("--model-uri", default=None,
                     help="behaviour tests (tests/model/test_trained_behaviour.py) on this MLflow model URI, e.g. "
                          "models:/coinyear@staging, instead of a small model trained for the test session")
    parser.addoption("--behaviour-tolerance", type=float, default=5.0,
                     help="years the answer may move under an invariance perturbation (mean over the cases)")


def coin_image(seed: int = 0, size: tuple[int, int] = (96, 96), fmt: str = "JPEG") -> bytes:
    """A small synthetic 'coin': a disc with a few random marks, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (30, 30, 30))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((4, 4, w - 4, h - 4), fill=tuple(int(c) for c in rng.integers(100, 220, 3)))
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(10, min(w, h) - 20, 2))
        draw.rectangle((x, y, x + 8, y + 8), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def send_json(handler, status: int, payload, headers: dict | None = None) -> None:
    """Answer a request of an `http.server` handler (the tests' stand-ins for remote services) with JSON."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def require_tool(found, message: str):
    """`found` (a tool's path), or the test stops: it fails under CI=true (.ci/run installs every tool the tests
    need, so a missing one is a broken set-up) and skips elsewhere."""
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def ocre_dir() -> Path:
    if not (OCRE / "manifest.csv").is_file():
        pytest.fail(f"reference data not found at {OCRE}: run `make data` (coinyear data fetch) or set "
                    "COINYEAR_DATA_DIR")
    return OCRE


def make_settings(home: Path, **overrides):
    return Settings(home=home, data_dir=OCRE, tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                    registry_uri=f"sqlite:///{home / 'mlflow.db'}", **overrides)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "home")


def small_train_config(**overrides):
    """A training recipe that runs in seconds on 2 CPU cores (tests only)."""
    from coinyear.model import ModelConfig
    from coinyear.recipe import TrainConfig

    model = ModelConfig(**{"backbone": "mobilenet_v3_small", "mode": "shared", "image_size": 64, "proj_dim": 32,
                           **overrides.pop("model", {})})
    return TrainConfig(**{"model": model, "epochs": 1, "batch_size": 16, "limit": 80, "seed": 1, **overrides})


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One small model trained on real OCRE coins, registered as version 1 and promoted to production.

    Returns (settings, outcome). Tests that change the registry must use their own home, not this one.
    """
    from coinyear import registry
    from coinyear.train import run_training

    home = tmp_path_factory.mktemp("trained") / "home"
    settings = make_settings(home)
    outcome = run_training(settings, small_train_config())
    registry.promote(settings, outcome.version, registry.PRODUCTION)
    return settings, outcome


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """One local PySpark session (Java 17) for every Spark test of this pytest process.

    A missing Java or pyspark fails under CI=true (the project's set-up installs both) and skips elsewhere."""
    import shutil

    require_tool(shutil.which("java"), "java is missing: .ci/run installs openjdk-17-jre-headless for the Spark tests")
    from coinyear.spark import spark_session

    session = spark_session("coinyear-tests", master="local[2]",
                            warehouse_dir=tmp_path_factory.mktemp("spark") / "warehouse")
    yield session
    session.stop()
