"""The pieces of the similar-coins evidence: nearest reference rows by the OOD distance, the count check, and the
reference table (catalogue fields, portraits, thumbnails) written and read back as the logged artifact."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from coinyear.neighbours import References, build_table
from coinyear.params import MAX_NEIGHBOURS, neighbour_count
from coinyear.quality import FeatureDistance


def test_nearest_is_sorted_and_agrees_with_the_distance_the_flag_scores():
    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(60, 16))).astype(np.float32)
    detector = FeatureDistance.fit(features, groups=np.arange(60) // 3, k=4)
    queries = np.abs(rng.normal(size=(5, 16))).astype(np.float32)
    index, distance = detector.nearest(queries, 7)
    assert index.shape == distance.shape == (5, 7)
    assert (np.diff(distance, axis=1) >= 0).all()
    everything = detector.distances(queries)
    np.testing.assert_allclose(distance, np.sort(everything, axis=1)[:, :7], atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(everything, index, axis=1), distance, atol=1e-6)
    # the flag's score is the mean of the k nearest distances: the same distance, by construction
    np.testing.assert_allclose(detector.score(queries), detector.nearest(queries, 4)[1].mean(axis=1), atol=1e-5)
    own, gap = detector.nearest(features[:3], 1)
    assert own[:, 0].tolist() == [0, 1, 2] and (gap < 1e-3).all()  # float16 reference rows


@pytest.mark.parametrize("value", [-1, MAX_NEIGHBOURS + 1, 2.0, "3", True, None])
def test_a_neighbour_count_is_a_whole_number_from_0_to_20(value):
    with pytest.raises(ValueError, match="whole number from 0"):
        neighbour_count(value)


def test_neighbour_count_accepts_0_to_20():
    assert [neighbour_count(k) for k in (0, 1, MAX_NEIGHBOURS, np.int64(5))] == [0, 1, MAX_NEIGHBOURS, 5]


def test_reference_table_round_trips_with_catalogue_fields_and_thumbnails(tmp_path):
    rows = pd.DataFrame({"coin_id": [7, 8], "year_from": [69, -27], "year_to": [79, -23],
                         "date_text": ["AD 69 - AD 79", "27 BC - 23 BC"], "denomination": ["Denarius", None],
                         "mint": ["Rome", "Emerita"],
                         "obverse_desc": ["IMP CAESAR VESPASIANVS AVG: Head of Vespasian, laureate, right",
                                          "Legend in wreath"]})
    fronts = np.random.default_rng(1).integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    backs = np.random.default_rng(2).integers(0, 255, (2, 1, 64, 64), dtype=np.uint8)  # grayscale side
    references = References.load(References(build_table(rows, fronts, backs)).save(tmp_path))
    found = references.describe(np.array([[1, 0]]), np.array([[0.25, 0.5]]))
    assert len(found) == 1 and [coin["coin_id"] for coin in found[0]] == ["8", "7"]
    assert found[0][1] == {**found[0][1], "coin_id": "7", "year_from": 69, "year_to": 79, "date_text": "AD 69 - AD 79",
                           "denomination": "Denarius", "mint": "Rome", "portrait": "Vespasian", "distance": 0.5}
    assert found[0][0]["portrait"] is None and found[0][0]["denomination"] is None
    assert type(found[0][1]["year_from"]) is int  # JSON-ready, not numpy
    for url in (found[0][0]["thumbnail"], found[0][0]["thumbnail_back"]):
        with Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/jpeg;base64,")))) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
    with pytest.raises(ValueError, match="2 rows but 1 fronts"):
        build_table(rows, fronts[:1], backs)


def test_the_flag_from_shared_distances_equals_the_flag_alone():
    rng = np.random.default_rng(3)
    features = np.abs(rng.normal(size=(40, 8))).astype(np.float32)
    detector = FeatureDistance.fit(features, groups=np.arange(40) // 2, k=3, quantile=0.5)
    queries = np.abs(rng.normal(size=(9, 8))).astype(np.float32) * np.linspace(0.5, 3, 9)[:, None]
    flagged = detector.flag(queries)
    assert 0 < flagged.sum() < 9  # both answers occur, so the comparison can fail
    np.testing.assert_array_equal(detector.flag(queries, detector.distances(queries)), flagged)
