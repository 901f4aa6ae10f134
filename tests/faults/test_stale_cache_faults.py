"""A stale image cache: entries decoded by an older preprocessing (another crop, resize or colour conversion) must
not be fed to a model trained or scored with the new one. The cache key carries `data.PREPROCESS_VERSION`."""

from __future__ import annotations

import numpy as np

from coinyear import data
from tests.conftest import coin_image


def test_a_new_preprocessing_version_never_reads_old_entries(tmp_path, monkeypatch):
    photo = tmp_path / "coin.jpg"
    photo.write_bytes(coin_image(3))
    cache = data.ImageCache(tmp_path / "cache", 32, False)
    old = cache.get(photo, "front")
    assert np.array_equal(cache.get(photo, "front"), old)  # a hit: same file, same preprocessing

    # the preprocessing changes (here: inverted pixels) and, as the constant's comment asks, its version with it
    monkeypatch.setattr(data, "preprocess", lambda source, side, size, grayscale: 255 - old)
    monkeypatch.setattr(data, "PREPROCESS_VERSION", getattr(data, "PREPROCESS_VERSION", 0) + 1, raising=False)
    assert np.array_equal(cache.get(photo, "front"), 255 - old), "an entry of the old preprocessing was served"
    tensors = data.tensor_files(_rows(photo), cache, tmp_path / "tensors")
    monkeypatch.setattr(data, "PREPROCESS_VERSION", data.PREPROCESS_VERSION + 1)
    assert data.tensor_files(_rows(photo), cache, tmp_path / "tensors") != tensors  # the tensors follow the key


def _rows(photo):
    import pandas as pd

    return pd.DataFrame({"obverse_path": [str(photo)], "reverse_path": [str(photo)]})
