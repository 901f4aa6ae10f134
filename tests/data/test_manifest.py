"""Data expectations: every bad row is dropped with its reason, composites are cut, the OCRE data is as
documented, grouped splits never put one coin type on both sides, and the test coin types are the same
whatever the seed, the subset or the row order."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from coinyear.data import (
    ImageCache,
    ImageError,
    decode_side,
    grouped_folds,
    grouped_holdout,
    import_collection,
    read_manifest,
)
from tests.conftest import coin_image


def write_manifest(folder, rows):
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture
def messy_dataset(tmp_path):
    """One good coin and one row for each way a row can be bad."""
    images = tmp_path / "images"
    images.mkdir()
    for name, seed in (("good_f.jpg", 1), ("good_b.jpg", 2)):
        (images / name).write_bytes(coin_image(seed))
    (images / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (images / "truncated.jpg").write_bytes(coin_image(3)[:300])
    good = {"obverse": "images/good_f.jpg", "reverse": "images/good_b.jpg", "year_from": 70, "year_to": 79}
    rows = [
        {"coin_id": 1, **good},
        {"coin_id": 2, **good, "obverse": ""},
        {"coin_id": 3, **good, "reverse": "images/nope.jpg"},
        {"coin_id": 4, **good, "obverse": "images/garbage.jpg"},
        {"coin_id": 5, **good, "reverse": "images/truncated.jpg"},
        {"coin_id": 6, **good, "year_from": 90, "year_to": 80},
        {"coin_id": 7, **good, "year_from": "seventy"},
        {"coin_id": 8, **good, "year_from": 0, "year_to": 5},
        {"coin_id": 9, **good, "year_from": 3000, "year_to": 3001},
        {"coin_id": 1, **good},
        {"coin_id": 10, **good, "year_from": 12.5},
    ]
    return write_manifest(tmp_path, rows)


def test_each_bad_row_is_dropped_with_its_reason(messy_dataset):
    manifest = read_manifest(messy_dataset)
    assert list(manifest.rows["coin_id"]) == [1]
    reasons = dict(zip(manifest.dropped["coin_id"], manifest.dropped["reason"]))
    assert reasons == {2: "missing_side", 3: "missing_file", 4: "unreadable_image", 5: "unreadable_image",
                       6: "impossible_range", 7: "bad_year", 8: "year_out_of_span", 9: "year_out_of_span",
                       1: "duplicate_coin_id", 10: "bad_year"}
    summary = manifest.summary()
    assert summary["rows"] == 11 and summary["valid"] == 1 and summary["dropped"] == 10
    assert "dropped 2 rows: unreadable_image" in manifest.report()


def test_the_kept_row_has_midpoint_and_absolute_paths(messy_dataset):
    row = read_manifest(messy_dataset).rows.iloc[0]
    assert row["year"] == 74.5
    assert row["obverse_path"].startswith(str(messy_dataset))


def test_missing_required_column_is_a_clear_error(tmp_path):
    write_manifest(tmp_path, [{"coin_id": 1, "obverse": "a.jpg", "year_from": 1, "year_to": 2}])
    with pytest.raises(ValueError, match="reverse"):
        read_manifest(tmp_path)


def test_composite_scan_is_cut_to_the_half_of_its_side():
    composite = Image.new("RGB", (300, 150))
    composite.paste((255, 0, 0), (0, 0, 150, 150))   # obverse on the left
    composite.paste((0, 0, 255), (150, 0, 300, 150))  # reverse on the right
    buffer = io.BytesIO()
    composite.save(buffer, "PNG")
    front, back = decode_side(buffer.getvalue(), "front"), decode_side(buffer.getvalue(), "back")
    assert front.size == back.size == (150, 150)
    assert front.getpixel((75, 75)) == (255, 0, 0)
    assert back.getpixel((75, 75)) == (0, 0, 255)


@pytest.mark.parametrize("payload", [b"", b"GIF89a-not-really", coin_image(0)[:200]])
def test_undecodable_bytes_raise_image_error(payload):
    with pytest.raises(ImageError):
        decode_side(payload, "front")


def test_decompression_bomb_is_refused(monkeypatch):
    import coinyear.data as data

    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 64 * 64)
    with pytest.raises(ImageError, match="larger than allowed"):
        decode_side(coin_image(0, size=(128, 128), fmt="PNG"), "front")


def test_cache_returns_the_same_array_and_notices_a_changed_file(tmp_path):
    path = tmp_path / "coin.jpg"
    path.write_bytes(coin_image(1))
    cache = ImageCache(tmp_path / "cache", 32, grayscale=False)
    first = cache.get(path, "front")
    assert first.shape == (3, 32, 32) and first.dtype == np.uint8
    assert len(list(cache.root.rglob("*.npy"))) == 1
    np.testing.assert_array_equal(cache.get(path, "front"), first)
    path.write_bytes(coin_image(2))
    assert not np.array_equal(cache.get(path, "front"), first)
    assert ImageCache(tmp_path / "cache", 32, grayscale=True).get(path, "front").shape == (1, 32, 32)


def test_ocre_manifest_matches_its_readme(ocre_dir):
    manifest = read_manifest(ocre_dir)
    summary = manifest.summary()
    assert summary["rows"] == 2887
    # rows without an obverse are the only ones dropped from the reference data
    assert set(summary["dropped_by_reason"]) == {"missing_side"}
    assert summary["valid"] >= 2860
    assert summary["year_min"] >= -40 and summary["year_max"] <= 140
    assert 100 < summary["composites"] < 400
    assert (manifest.rows["year_from"] <= manifest.rows["year_to"]).all()
    assert (manifest.rows["year_to"] - manifest.rows["year_from"]).max() <= 80


def test_grouped_folds_never_share_a_coin_type(ocre_dir):
    rows = read_manifest(ocre_dir, check_images=False).rows
    folds = grouped_folds(rows, 5, seed=0)
    assert len(folds) == 5
    seen = np.zeros(len(rows), dtype=int)
    for train, val in folds:
        assert not set(rows["group"].iloc[train]) & set(rows["group"].iloc[val])
        seen[val] += 1
    assert (seen == 1).all()
    train, holdout = grouped_holdout(rows, 0.15, seed=0)
    assert not set(rows["group"].iloc[train]) & set(rows["group"].iloc[holdout])
    assert 0.08 < len(holdout) / len(rows) < 0.25


def test_the_test_coin_types_do_not_depend_on_seed_limit_or_row_order(ocre_dir):
    """The one evaluation split is a property of the coin type: the same coins are test coins in the whole
    manifest, in any --limit subset drawn with any seed, and with the rows shuffled; whole types only."""
    from coinyear.data import TEST_PERCENT, choice_splits, is_test_type, split_test

    rows = read_manifest(ocre_dir, check_images=False).rows
    _, test = split_test(rows)
    test_ids = set(rows["coin_id"].iloc[test])
    assert not set(rows["group"].iloc[test]) & set(rows["group"].drop(index=rows.index[test]))
    share = rows["group"].iloc[test].nunique() / rows["group"].nunique()
    assert abs(share - TEST_PERCENT / 100) < 0.05, share
    shuffled = rows.sample(frac=1, random_state=3).reset_index(drop=True)
    assert set(shuffled["coin_id"].iloc[split_test(shuffled)[1]]) == test_ids
    for limit, seed in ((80, 1), (300, 42), (1000, 20250101)):
        subset = read_manifest(ocre_dir, check_images=False, limit=limit, seed=seed).rows
        picked = set(subset["coin_id"].iloc[split_test(subset)[1]])
        assert picked == test_ids & set(subset["coin_id"]) and picked, (limit, seed)
    assert is_test_type(rows["group"].iloc[test]).all() and not is_test_type(rows["group"].iloc[:0]).size
    # the choice splits (folds or validation) never hold a test row, whatever the seed
    for folds, seed in ((0, 1), (0, 42), (5, 0)):
        pairs, held = choice_splits(rows, folds, 0.15, seed)
        assert list(held) == list(test)
        for train, validation in pairs:
            assert not (set(train) | set(validation)) & set(test)
            assert not set(rows["group"].iloc[train]) & set(rows["group"].iloc[validation])


def photo_folder(tmp_path):
    """A collection's photo folder: fronts f0-f2.png and backs b0-b2.png."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"f{i}.png").write_bytes(coin_image(i, fmt="PNG"))
        (photos / f"b{i}.png").write_bytes(coin_image(10 + i, fmt="PNG"))
    return photos


def test_import_collection_builds_a_valid_manifest(tmp_path):
    photos = photo_folder(tmp_path)
    pd.DataFrame({"front": ["f0.png", "f1.png", "f2.png"], "back": ["b0.png", "b1.png", "missing.png"],
                  "year": [-27, 73, 100], "mint": ["Rome", "Rome", "Lyon"]}).to_csv(tmp_path / "mine.csv", index=False)
    manifest = import_collection(photos, tmp_path / "mine.csv", tmp_path / "out")
    assert list(manifest.rows["year"]) == [-27.0, 73.0]
    assert list(manifest.dropped["reason"]) == ["missing_file"]
    again = read_manifest(tmp_path / "out")
    assert len(again.rows) == 2 and "mint" in again.rows.columns


def test_a_photo_over_the_decoding_pixel_cap_is_skipped_with_its_reason(tmp_path):
    """41 MP: under PIL's own refusal (twice its limit) but over the cap `decode_side` applies, so it would pass
    validation and then fail in training."""
    from coinyear.data import MAX_IMAGE_PIXELS

    images = tmp_path / "images"
    images.mkdir()
    (images / "f.jpg").write_bytes(coin_image(1))
    (images / "b.jpg").write_bytes(coin_image(2))
    side = 6400  # 40.96 MP
    assert MAX_IMAGE_PIXELS < side * side < 2 * MAX_IMAGE_PIXELS
    Image.new("L", (side, side)).save(images / "huge.png")
    good = {"obverse": "images/f.jpg", "reverse": "images/b.jpg", "year_from": 70, "year_to": 79}
    manifest = read_manifest(write_manifest(tmp_path, [{"coin_id": 1, **good},
                                                       {"coin_id": 2, **good, "reverse": "images/huge.png"}]))
    assert list(manifest.rows["coin_id"]) == [1]
    (dropped,) = manifest.dropped.to_dict("records")
    assert dropped["coin_id"] == 2 and dropped["reason"] == "image_too_large"
    assert "6400x6400 pixels" in dropped["detail"] and dropped["detail"].startswith("reverse: huge.png")


def test_import_collection_keeps_the_first_of_a_repeated_coin_id_and_reports_the_rest(tmp_path):
    photos = photo_folder(tmp_path)
    pd.DataFrame({"coin_id": ["a", "b", "a"], "front": ["f0.png", "f1.png", "f2.png"],
                  "back": ["b0.png", "b1.png", "b2.png"], "year": [-27, 73, 100]}).to_csv(tmp_path / "mine.csv",
                                                                                        index=False)
    manifest = import_collection(photos, tmp_path / "mine.csv", tmp_path / "out")
    assert list(manifest.rows["coin_id"]) == ["a", "b"] and list(manifest.rows["year"]) == [-27.0, 73.0]
    (dropped,) = manifest.dropped.to_dict("records")
    assert dropped["reason"] == "duplicate_coin_id"
    assert dropped["detail"] == "CSV line 4: coin_id a already on line 2, which is kept"
    written = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert list(written["coin_id"]) == ["a", "b"] and written.loc[0, "obverse"].endswith("f0.png")
    assert len(read_manifest(tmp_path / "out").rows) == 2
