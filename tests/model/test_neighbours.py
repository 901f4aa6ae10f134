"""Similar coins as evidence: the session-trained model, loaded as any MLflow client loads it, names a training
coin itself as the nearest reference coin to its own photos (distance ~0), with the catalogue fields and
thumbnails of the reference table, with and without `interval`; bad `neighbours` values are refused."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from coinyear.neighbours import FIELDS, THUMBNAIL_PX
from coinyear.pyfunc import BACK, FRONT, encode_file
from coinyear.rulers import portrait
from tests.conftest import small_train_config


@pytest.fixture(scope="module")
def served(trained):
    """(the production model as MLflow loads it, the manifest rows it was trained on)."""
    import mlflow

    from coinyear.config import configure_mlflow
    from coinyear.data import read_manifest

    settings, _ = trained
    configure_mlflow(settings)
    config = small_train_config()
    rows = read_manifest(settings.data_dir, settings.min_year, settings.max_year, limit=config.limit,
                         seed=config.seed).rows
    return mlflow.pyfunc.load_model(f"models:/{settings.model_name}@production"), rows


def _frame(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({FRONT: [encode_file(p) for p in rows["obverse_path"]],
                         BACK: [encode_file(p) for p in rows["reverse_path"]]})


def _jpeg_size(url: str) -> tuple[int, int]:
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        assert image.format == "JPEG"
        return image.size


def test_a_training_coin_is_its_own_nearest_neighbour(served):
    model, rows = served
    picked = rows.iloc[[0, 17, 42]]
    answer = model.predict(_frame(picked), params={"neighbours": 4})
    assert list(answer.columns) == ["year", "neighbours"]
    plain = model.predict(_frame(picked))
    np.testing.assert_allclose(answer["year"], plain, atol=1e-4)
    for coin, found in zip(picked.itertuples(), answer["neighbours"]):
        assert len(found) == 4
        first = found[0]
        assert first["coin_id"] == str(coin.coin_id)
        # ~0: float16 reference rows, and the ONNX graph's features differ from PyTorch's by ~1e-3 (relative),
        # which the centring turns into ~0.01; the next coin lies at ~0.5
        distances = [n["distance"] for n in found]
        assert 0 <= first["distance"] < 0.05 < distances[1] and distances == sorted(distances)
        assert (first["year_from"], first["year_to"]) == (coin.year_from, coin.year_to)
        assert (first["date_text"], first["denomination"], first["mint"]) == (coin.date_text, coin.denomination,
                                                                                coin.mint)
        assert first["portrait"] == portrait(coin.obverse_desc)
        assert set(first) == {*FIELDS, "distance", "thumbnail", "thumbnail_back"}
        assert _jpeg_size(first["thumbnail"]) == _jpeg_size(first["thumbnail_back"]) == (THUMBNAIL_PX, THUMBNAIL_PX)


def test_neighbours_come_with_the_interval_and_bad_counts_are_refused(served):
    model, rows = served
    frame = _frame(rows.iloc[[5]])
    both = model.predict(frame, params={"interval": 0.9, "neighbours": 2})
    assert list(both.columns) == ["year", "low", "high", "out_of_distribution", "neighbours"]
    interval = model.predict(frame, params={"interval": 0.9})
    assert both[["year", "low", "high"]].to_numpy() == pytest.approx(interval[["year", "low", "high"]].to_numpy())
    assert both["neighbours"][0][0]["coin_id"] == str(rows["coin_id"].iloc[5])
    assert model.predict(frame, params={"neighbours": 0}).shape == (1,)  # 0 = off: the bare years
    for bad in (-1, 21):
        with pytest.raises(MlflowException, match="neighbours must be a whole number from 0"):
            model.predict(frame, params={"neighbours": bad})
