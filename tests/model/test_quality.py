"""Quality: conformal intervals hold their coverage, the out-of-distribution score separates what is far
from what is near, rotation TTA and fold ensembles are well-shaped and deterministic, and a logged model
answers `{"interval": 0.9}` through `mlflow.pyfunc.load_model` with year, range and OOD flag."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from coinyear.model import CoinEnsemble, ModelConfig, build_model, infer, load_checkpoint, save_checkpoint
from coinyear.quality import Conformal, FeatureDistance, Quality, cross_conformal, interval_metrics
from coinyear.years import MAX_YEAR, MIN_YEAR


# ------------------------------------------------------------------------------------------- conformal
def test_conformal_interval_covers_new_residuals_at_the_stated_level():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-30, 140, 2000)
    calibration = Conformal.fit(truth + rng.standard_t(3, 2000) * 8, truth, truth)
    new_truth = rng.uniform(-30, 140, 50_000)
    predicted = new_truth + rng.standard_t(3, 50_000) * 8
    for level in (0.5, 0.8, 0.9):
        low, high = calibration.interval(predicted, level)
        coverage = interval_metrics(low, high, new_truth, new_truth)["coverage"]
        assert level - 0.02 <= coverage <= level + 0.02, (level, coverage)


def test_scaled_conformal_gives_hard_coins_wider_ranges_and_keeps_coverage():
    rng = np.random.default_rng(1)
    spread = rng.uniform(1, 20, 22_000)  # a per-coin difficulty the model can see
    truth = rng.uniform(0, 140, 22_000)
    predicted = truth + rng.normal(0, 1, 22_000) * spread
    calibration = Conformal.fit(predicted[:2000], truth[:2000], truth[:2000], spread[:2000], spread_floor=1.0)
    low, high = calibration.interval(predicted[2000:], 0.9, spread[2000:])
    assert 0.88 <= interval_metrics(low, high, truth[2000:], truth[2000:])["coverage"] <= 0.92
    width = high - low
    hard, easy = spread[2000:] > 15, spread[2000:] < 5
    assert width[hard].mean() > 3 * width[easy].mean()
    with pytest.raises(ValueError, match="spread"):
        calibration.interval(predicted[:3], 0.9)
    # by default the floor is the median spread: agreeing samples never make a range implausibly narrow
    assert Conformal.fit(predicted, truth, truth, spread).spread_floor == pytest.approx(np.median(spread))


def test_conformal_quantile_is_the_finite_sample_rank_and_rejects_bad_levels():
    calibration = Conformal.fit(np.arange(1.0, 10.0), np.zeros(9), np.zeros(9))  # scores 1..9
    assert calibration.quantile(0.5) == 5.0  # ceil(10 * 0.5) = 5th smallest
    assert calibration.quantile(0.9) == 9.0  # ceil(10 * 0.9) = 9th: the largest
    # ceil(10 * 0.95) = 10th of 9 scores: nine coins cannot promise 95%; the largest score would under-cover
    assert calibration.quantile(0.95) == float("inf")
    low, high = calibration.interval([100.0], 0.95)
    assert (low[0], high[0]) == (MIN_YEAR, MAX_YEAR)
    for level in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            calibration.quantile(level)


def test_label_midpoint_is_the_target_of_the_residuals():
    calibration = Conformal.fit([10.0, 10.0, 10.0], [0, 8, 20], [10, 12, 40])  # midpoints 5, 10, 30
    assert list(calibration.scores) == [0.0, 5.0, 20.0]


def test_cross_conformal_calibrates_each_fold_on_the_other_folds():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0, 100, 3000)
    fold = np.repeat([1, 2, 3], 1000)
    # fold 3 is much harder: calibrated on folds 1-2 only, its intervals must under-cover
    predicted = truth + rng.normal(0, 1, 3000) * np.where(fold == 3, 10.0, 2.0)
    low, high = cross_conformal(predicted, truth, truth, fold, 0.9)
    covered = (low <= truth) & (truth <= high)
    assert covered[fold == 3].mean() < 0.6
    assert covered[fold == 1].mean() > 0.9


# ---------------------------------------------------------------------------------------- OOD distance
def _clusters(rng, count=200, dim=16):
    centres = rng.normal(0, 1, (4, dim))
    groups = rng.integers(0, 40, count)
    features = centres[groups % 4] + rng.normal(0, 0.15, (count, dim))
    return features, groups, centres


def test_feature_distance_flags_far_points_and_passes_near_ones():
    rng = np.random.default_rng(3)
    features, groups, centres = _clusters(rng)
    detector = FeatureDistance.fit(features, groups, k=5, quantile=0.99)
    near = centres[rng.integers(0, 4, 50)] + rng.normal(0, 0.15, (50, 16))
    far = rng.normal(0, 1, (50, 16))
    assert detector.flag(near).mean() <= 0.1
    assert detector.flag(far).mean() >= 0.9


def test_a_featureless_side_is_flagged_whatever_its_direction():
    rng = np.random.default_rng(6)
    features, groups, _ = _clusters(rng)
    detector = FeatureDistance.fit(features + 3.0, groups)  # both halves (sides) well away from zero
    probe = features[:2] + 3.0
    probe[1, 8:] *= 0.01  # the back side gives almost nothing: a blank card
    assert list(detector.featureless(probe)) == [False, True]
    assert detector.flag(probe)[1]


def test_feature_distance_threshold_leaves_out_each_coins_own_type():
    # every coin has 4 identical copies of its own type: without leaving the type out its score would be 0
    rng = np.random.default_rng(4)
    base = rng.normal(0, 1, (50, 8))
    features, groups = np.repeat(base, 4, axis=0), np.repeat(np.arange(50), 4)
    detector = FeatureDistance.fit(features, groups, k=3)
    assert detector.threshold > 0.05
    assert np.allclose(detector.score(features[:4]), 0, atol=1e-5)


def test_a_subset_is_scored_without_the_reference_coins_of_its_own_type():
    # how a held-out coin, which is in the reference, is scored as a coin of a type nobody has seen
    rng = np.random.default_rng(6)
    features, groups = np.repeat(rng.normal(0, 1, (50, 8)), 4, axis=0), np.repeat(np.arange(50), 4)
    detector = FeatureDistance.fit(features, groups, k=3)
    subset = np.arange(8, 16)
    alone = detector.score(features[subset], groups=groups[subset], reference_groups=groups)
    assert np.allclose(alone, detector.score(features, groups=groups)[subset])
    assert alone.min() > 0.05 and np.allclose(detector.score(features[subset]), 0, atol=1e-5)


def test_quality_files_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    features, groups, _ = _clusters(rng)
    quality = Quality(Conformal.fit(rng.normal(0, 5, 100), np.zeros(100), np.zeros(100), rng.uniform(1, 3, 100)),
                      FeatureDistance.fit(features, groups))
    files = quality.save(tmp_path)
    loaded = Quality.load(files["conformal"], files["ood"])
    assert loaded.conformal.scaled
    assert loaded.conformal.quantile(0.9) == pytest.approx(quality.conformal.quantile(0.9), abs=1e-3)
    assert loaded.ood.threshold == quality.ood.threshold
    probe = rng.normal(0, 1, (10, 16))
    assert np.allclose(loaded.ood.score(probe), quality.ood.score(probe), atol=2e-3)
    assert loaded.ood.shift_ceiling == 0 and not loaded.ood.era_shifted(probe, np.ones(10)).any()  # none fitted
    # with the era-shift score: its reference, scales and ceiling travel too
    embeddings = features[:, :8] + rng.normal(0, 0.1, (len(features), 8))
    disagreement = rng.gamma(1.0, 0.1, 50)
    quality.ood.fit_shift(embeddings, groups, np.arange(50), disagreement, rate=0.1)
    files = quality.save(tmp_path)
    loaded = Quality.load(files["conformal"], files["ood"])
    assert loaded.ood.shift_ceiling == pytest.approx(quality.ood.shift_ceiling)
    probe_embedding, probe_disagreement = rng.normal(0, 1, (10, 8)), rng.gamma(1.0, 0.1, 10)
    assert np.allclose(loaded.ood.shift_score(probe_embedding, probe_disagreement),
                       quality.ood.shift_score(probe_embedding, probe_disagreement), atol=0.02)


def test_the_era_shift_score_ranks_far_embeddings_and_disagreeing_views_above_the_validation_coins():
    """Both parts move the score: an embedding far from every reference coin's and a portrait head whose rotated
    views disagree each raise it, and the ceiling flags the stated share of the calibration coins."""
    rng = np.random.default_rng(8)
    features, groups, _ = _clusters(rng)
    embeddings = features[:, :8]
    detector = FeatureDistance.fit(features, groups)
    calibration = np.arange(0, len(features), 2)
    disagreement = rng.gamma(1.0, 0.1, len(calibration))
    detector.fit_shift(embeddings, groups, calibration, disagreement, rate=0.1)
    assert 0 < detector.shift_ceiling < 1
    near, far = embeddings[:20], rng.normal(0, 1, (20, 8)) * 3
    calm, torn = np.full(20, np.median(disagreement)), np.full(20, disagreement.max() + 1)
    assert (detector.shift_score(far, calm) > detector.shift_score(near, calm)).mean() >= 0.9
    assert (detector.shift_score(near, torn) > detector.shift_score(near, calm)).all()
    assert detector.era_shifted(far, torn).all() and not detector.era_shifted(near, calm).any()
    own = detector.shift_score(embeddings[calibration], disagreement, groups=groups[calibration],
                               reference_groups=groups)
    assert (own > detector.shift_ceiling).mean() == pytest.approx(0.1, abs=0.02)
    # switched off (rate 0): never flags
    detector.fit_shift(embeddings, groups, calibration, disagreement, rate=0.0)
    assert not detector.era_shifted(far, torn).any()


# ------------------------------------------------------------------------------------- TTA and ensembles
@pytest.fixture(scope="module")
def members():
    # pretrained features: a randomly initialised backbone in eval mode maps every image to ~the same year
    torch.manual_seed(0)
    config = ModelConfig(backbone="efficientnet_lite0", image_size=64, proj_dim=16)
    return [build_model(config, 80, 30).eval() for _ in range(3)]


def test_ensemble_averages_members_over_rotations(members):
    ensemble = CoinEnsemble(members, (-10.0, 0.0, 10.0)).eval()
    fronts, backs = torch.rand(5, 3, 64, 64), torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        samples = ensemble.year_samples(fronts, backs)
        years = ensemble(fronts, backs)
    assert samples.shape == (5, 3, 3) and years.shape == (5,)
    assert torch.allclose(years, samples.mean(dim=(1, 2)))
    with torch.no_grad():  # the unrotated sample of member 2 is member 2's own answer
        assert torch.allclose(samples[:, 2, 1], members[2](fronts, backs), atol=1e-5)
    out = infer(ensemble, fronts, backs, with_features=True)
    assert out["spread"].shape == (5,) and (out["spread"] > 0).all()
    assert out["features"].shape[0] == 5


def test_tta_is_deterministic_and_independent_of_the_batch(members):
    ensemble = CoinEnsemble(members[:1], (-20.0, 0.0, 20.0)).eval()
    fronts, backs = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        first, second = ensemble(fronts, backs), ensemble(fronts, backs)
        alone = torch.stack([ensemble(fronts[i:i + 1], backs[i:i + 1])[0] for i in range(4)])
    assert torch.equal(first, second)
    assert torch.allclose(first, alone, atol=1e-4)


def test_single_regressor_has_zero_spread(members):
    out = infer(members[0], torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert torch.equal(out["spread"], torch.zeros(2))


def test_ensemble_checkpoint_round_trip(tmp_path, members):
    ensemble = CoinEnsemble(members[:2], (-10.0, 0.0, 10.0)).eval()
    save_checkpoint(ensemble, tmp_path / "ensemble.pt")
    loaded = load_checkpoint(tmp_path / "ensemble.pt")
    assert isinstance(loaded, CoinEnsemble) and loaded.tta_angles == (-10.0, 0.0, 10.0)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ensemble(x, x), loaded(x, x), atol=1e-5)


# ------------------------------------------------------------------------ the logged model's interval API
@pytest.fixture(scope="module")
def interval_model(tmp_path_factory):
    """A small efficientnet_lite0 (pretrained features) with rotation TTA, trained, logged and registered."""
    from coinyear.train import run_training
    from tests.conftest import make_settings, small_train_config

    settings = make_settings(tmp_path_factory.mktemp("quality") / "home")
    config = small_train_config(model={"backbone": "efficientnet_lite0"}, tta_angles=(-15, 0, 15), limit=90)
    outcome = run_training(settings, config)
    return settings, outcome


def _frame(fronts: list[bytes], backs: list[bytes]) -> pd.DataFrame:
    import base64

    from coinyear.pyfunc import BACK, FRONT

    encode = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    return pd.DataFrame({FRONT: [encode(f) for f in fronts], BACK: [encode(b) for b in backs]})


def _unseen_coins(ocre_dir, count):
    """OCRE coins of types the small model never saw (it trained on the `limit=90, seed=1` subset)."""
    from coinyear.data import read_manifest

    trained = read_manifest(ocre_dir, limit=90, seed=1).rows
    rows = read_manifest(ocre_dir, limit=400, seed=7).rows
    rows = rows[~rows["coin_id"].isin(trained["coin_id"]) & ~rows["group"].isin(trained["group"])].head(count)
    return [open(p, "rb").read() for p in rows["obverse_path"]], [open(p, "rb").read() for p in rows["reverse_path"]]


def test_interval_parameter_returns_year_range_and_ood_flag(interval_model, ocre_dir):
    import mlflow
    from mlflow.exceptions import MlflowException

    from coinyear import registry

    settings, outcome = interval_model
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    uri = registry.model_uri(settings, outcome.version)
    info = mlflow.models.get_model_info(uri)
    assert "interval" in [p.name for p in info.signature.params.params]
    model = mlflow.pyfunc.load_model(uri)
    fronts, backs = _unseen_coins(ocre_dir, 6)
    frame = _frame(fronts, backs)

    years = np.asarray(model.predict(frame))  # default: the API is unchanged, one year per row
    assert years.shape == (6,)
    answer = model.predict(frame, params={"interval": 0.9})
    assert list(answer.columns) == ["year", "low", "high", "out_of_distribution"]
    assert np.allclose(answer["year"], years, atol=1e-3)
    assert (answer["low"] < answer["year"]).all() and (answer["year"] < answer["high"]).all()
    narrow = model.predict(frame, params={"interval": 0.5})
    assert ((narrow["high"] - narrow["low"]) <= (answer["high"] - answer["low"]) + 1e-9).all()
    assert answer["out_of_distribution"].dtype == bool
    for bad in (1.5, -0.2):
        with pytest.raises(MlflowException, match="interval"):
            model.predict(frame, params={"interval": bad})


def test_ood_flag_fires_on_noise_and_blank_photos_not_on_real_coins(interval_model, ocre_dir):
    import io

    import mlflow
    from PIL import Image

    from coinyear import registry

    settings, outcome = interval_model
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(registry.model_uri(settings, outcome.version))

    def jpeg(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array.astype(np.uint8)).save(buffer, "JPEG")
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    noise = [jpeg(rng.integers(0, 256, (120, 120, 3))) for _ in range(3)]
    blank = [jpeg(np.full((120, 120, 3), value)) for value in (255, 128, 0)]
    fakes = model.predict(_frame(noise + blank, noise[::-1] + blank), params={"interval": 0.9})
    assert fakes["out_of_distribution"].all(), fakes
    fronts, backs = _unseen_coins(ocre_dir, 10)
    real = model.predict(_frame(fronts, backs), params={"interval": 0.9})
    assert real["out_of_distribution"].mean() <= 0.2, real


def test_fold_ensemble_serves_the_k_fold_models_with_a_calibration(ocre_dir, tmp_path):
    from coinyear.data import read_manifest, split_test
    from coinyear.experiment import train_on_manifest
    from tests.conftest import small_train_config

    config = small_train_config(folds=2, ensemble=True, tta_angles=(-10, 0, 10), limit=40)
    manifest = read_manifest(ocre_dir, limit=40, seed=1)
    result = train_on_manifest(manifest, config, tmp_path / "cache")
    assert isinstance(result.model, CoinEnsemble) and len(result.model.members) == 2
    assert result.model.members[0] is result.fold_models[0] and "final" not in result.histories
    usable = len(split_test(manifest.rows)[0])  # the test coin types are in no fold
    assert len(result.predictions) == usable < len(manifest.rows)
    assert result.predictions["predicted_no_tta"].notna().all()
    # the reported coverage is the cross-conformal one on these out-of-fold predictions (each fold calibrated on
    # the other), near its 90% level: 40 coins allow about +-8 points (binomial, 2 sigma)
    table = result.predictions
    low, high = cross_conformal(table["predicted"], table["year_from"], table["year_to"], table["fold"], 0.9,
                                table["spread"])
    coverage = result.metrics["val_interval90_coverage"]
    assert coverage == interval_metrics(low, high, table["year_from"], table["year_to"])["coverage"]
    assert 0.78 <= coverage <= 1.0, coverage
    assert result.quality.conformal.scaled and len(result.quality.conformal.scores) == usable
    with pytest.raises(ValueError, match="folds"):
        small_train_config(ensemble=True)
