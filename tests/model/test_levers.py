"""The post-hoc levers (coinyear.calibrate): the ruler mixture of the rotation-averaged probabilities, the portrait
head's temperature, the range scaled by the portrait mixture's dispersion and the portrait flag. Each is served by
the one scoring path (`model.blend_rulers`, the network and its ONNX graph), fitted on validation coins only, and
absent (as trained) for models logged before."""

import json

import numpy as np
import pytest
import torch

from coinyear.calibrate import Heads, disagreement_ceiling, fit_levers, fit_ranges, portrait_floor
from coinyear.model import CoinEnsemble, ModelConfig, build_model, infer, mixture_median, view_disagreement
from coinyear.quality import Conformal, FeatureDistance, Quality, mixture_dispersion
from coinyear.runtime import export_checked

ANGLES = (-20.0, 0.0, 20.0)


def portrait_ensemble(**config) -> CoinEnsemble:
    model_config = ModelConfig(backbone="mobilenet_v3_small", image_size=64, proj_dim=16, pretrained=False,
                               aux_classes={"portrait": 3}, aux_names={"portrait": ["A", "B", "other"]},
                               ruler_statistic="median", **config)
    torch.manual_seed(0)
    model = build_model(model_config, year_center=50.0, year_scale=40.0)
    model.portrait_years.copy_(torch.tensor([10.0, 120.0, 60.0]))
    return CoinEnsemble([model], ANGLES).eval()


def per_rotation(ensemble: CoinEnsemble, front, back, temperature: float = 1.0):
    """The regression years [B, A] and portrait probabilities [B, A, C] of each rotation, computed by hand."""
    member = ensemble.regressors[0]
    with torch.no_grad():
        fused = member.features(ensemble.rotated(front), ensemble.rotated(back))
        regression = member.regression_year(fused).view(len(ANGLES), -1).T
        p = torch.softmax(member.aux_heads["portrait"](fused) / temperature, dim=1)
    return regression, p.view(len(ANGLES), len(front), -1).transpose(0, 1)


def test_as_trained_the_ruler_median_is_taken_per_rotation_then_averaged():
    """ruler_pooled False (models logged before): each rotation's year blends that rotation's median."""
    ensemble = portrait_ensemble()
    front, back = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    regression, p = per_rotation(ensemble, front, back)
    years = ensemble.regressors[0].portrait_years
    medians = torch.stack([mixture_median(p[:, a], years) for a in range(len(ANGLES))], dim=1)
    expected = (0.5 * regression + 0.5 * medians).mean(dim=1)
    torch.testing.assert_close(infer(ensemble, front, back)["year"], expected)


def test_pooled_the_served_year_blends_the_median_of_the_rotation_averaged_probabilities():
    ensemble = portrait_ensemble(ruler_pooled=True, ruler_blend=0.7)
    front, back = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    regression, p = per_rotation(ensemble, front, back)
    median = mixture_median(p.mean(dim=1), ensemble.regressors[0].portrait_years)
    answer = infer(ensemble, front, back, with_features=True)
    torch.testing.assert_close(answer["year"], 0.3 * regression.mean(dim=1) + 0.7 * median)
    torch.testing.assert_close(answer["portraits"], p.mean(dim=1))
    # the ruler part is the same on every rotation: the spread is the regression head's alone, shrunk by 1 - w
    torch.testing.assert_close(answer["spread"], 0.3 * regression.std(dim=1))


def test_the_temperature_softens_the_served_portrait_probabilities():
    cold, warm = portrait_ensemble(), portrait_ensemble(portrait_temperature=3.0)
    front, back = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    _, p = per_rotation(warm, front, back, temperature=3.0)
    served = infer(warm, front, back, with_features=True)["portraits"]
    torch.testing.assert_close(served, p.mean(dim=1))
    as_trained = infer(cold, front, back, with_features=True)["portraits"]
    assert (served.max(dim=1).values < as_trained.max(dim=1).values).all()
    with pytest.raises(ValueError, match="portrait_temperature"):
        ModelConfig(portrait_temperature=0.0)


def test_the_onnx_graph_serves_the_levers(tmp_path):
    model = portrait_ensemble(ruler_pooled=True, portrait_temperature=2.0, ruler_blend=0.8)
    front, back = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    path, check, reason, openvino = export_checked(model, front, back, tmp_path)
    assert path is not None and check is not None and check.passed, reason
    assert openvino is None or openvino.passed


def synthetic_heads(seed: int, n: int = 600, sure: float = 4.0) -> Heads:
    """Coins of three portraits whose years are the portraits' years; the regression head is noisy (sd 25), the
    portrait head right on average, its logits noisy per coin and per rotation, and over-confident by `sure`."""
    rng = np.random.default_rng(seed)
    years = np.array([10.0, 120.0, 60.0])
    labels = rng.integers(0, 3, n)
    truth = years[labels]
    regression = truth[:, None, None] + rng.normal(0, 25, (n, 1, 1)) + rng.normal(0, 3, (n, 1, 5))
    logits = np.zeros((n, 1, 5, 3))
    logits[np.arange(n), :, :, labels] = 1.0
    # a coin's photos mislead every rotation alike (over-confident when wrong), and each rotation a little more
    logits = sure * (logits + rng.normal(0, 0.8, (n, 1, 1, 3)) + rng.normal(0, 0.4, logits.shape))
    return Heads(regression, logits, years[None, :], labels, truth - 2, truth + 2)


def test_the_levers_are_fitted_on_validation_coins_and_win_on_fresh_ones():
    """Over-confident, rotation-noisy portraits and a noisy regression head: the fit cools the head (T > 1), and
    the fitted levers date fresh coins (another draw) better than the model as trained."""
    config = ModelConfig(ruler_statistic="median", ruler_blend=0.5)
    levers = fit_levers([synthetic_heads(0)], config)
    assert levers.temperature > 1.5
    assert levers.validation["val_mae_levers"] < levers.validation["val_mae_as_trained"]
    fresh = synthetic_heads(1)
    fitted = ModelConfig(ruler_statistic="median", ruler_blend=0.5)
    levers.apply(fitted)
    error = {name: np.mean(np.abs(fresh.served(c)["year"] - (fresh.year_from + fresh.year_to) / 2))
             for name, c in (("as trained", config), ("levers", fitted))}
    assert error["levers"] < error["as trained"]


def test_even_when_the_rulers_alone_date_best_the_served_year_still_moves_with_a_rotation():
    """A useless regression head: the rulers alone date best, pooled. Offered blend 1 (as before), the fit takes
    it, and the pooled year is the same on every rotation: the rotation spread (a range scale and an
    out-of-distribution signal) is zero for every coin. The blends offered stop short of 1."""
    heads = synthetic_heads(0)
    heads.regression = heads.regression + np.random.default_rng(5).normal(0, 200, heads.regression.shape)
    up_to_one = ModelConfig(ruler_statistic="median")
    fit_levers([heads], up_to_one, blends=tuple(round(0.1 * i, 1) for i in range(11))).apply(up_to_one)
    assert (up_to_one.ruler_pooled, up_to_one.ruler_blend) == (True, 1.0)
    assert (heads.served(up_to_one)["spread"] == 0).all()
    config = ModelConfig(ruler_statistic="median")
    fit_levers([heads], config).apply(config)
    assert 0.8 <= config.ruler_blend < 1.0 and (heads.served(config)["spread"] > 0).all()

def test_without_labels_the_temperature_stays_as_trained():
    heads = synthetic_heads(0, n=50)
    heads.labels[:] = -100
    assert fit_levers([heads], ModelConfig(portrait_temperature=1.0)).temperature == 1.0


def test_the_range_scaled_by_the_portrait_mixture_is_narrower_and_still_covers():
    """Errors that grow with the portrait head's hesitation: the mixture scale is chosen, its median range is
    narrower than the spread's, and it covers ~90% of fresh coins."""
    def draw(seed, n=4000):
        rng = np.random.default_rng(seed)
        years = np.array([0.0, 100.0, 200.0])
        p = rng.dirichlet([0.3, 0.3, 0.3], n)
        dispersion = mixture_dispersion(p, years)
        truth = rng.uniform(0, 200, n)
        predicted = truth + rng.normal(0, 1 + 0.3 * dispersion)
        return {"year": predicted, "spread": rng.uniform(1, 3, n), "portraits": p}, truth, years

    scored, truth, years = draw(0)
    conformal, widths = fit_ranges(scored, years, truth, truth)
    assert conformal.by == "mixture" and conformal.scaled
    assert widths["val_interval90_width_mixture"] < 0.8 * widths["val_interval90_width_spread"]
    fresh, fresh_truth, _ = draw(1)
    low, high = conformal.ranges(fresh, 0.9, years)
    assert 0.87 <= np.mean((low <= fresh_truth) & (fresh_truth <= high)) <= 0.93
    # saved and read back, the scale travels with the model; files written before divide by the spread
    again = Conformal.from_dict(json.loads(json.dumps(conformal.to_dict())))
    assert again.by == "mixture"
    assert Conformal.from_dict({"scores": [1.0], "scaled": True, "spread_floor": 1.0}).by == "spread"
    with pytest.raises(ValueError, match="conformal scale"):
        Conformal.fit([1.0], [1.0], [1.0], [1.0], by="mode")


def test_mixture_dispersion_is_zero_when_sure_and_the_gap_when_torn():
    years = np.array([0.0, 100.0, 40.0])
    p = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    assert mixture_dispersion(p, years).tolist() == pytest.approx([0.0, 50.0, 0.2 * 40 + 0.2 * 60])


def test_the_portrait_flag_fires_below_the_floor_fitted_at_the_stated_rate(tmp_path):
    rng = np.random.default_rng(0)
    validation = rng.dirichlet(np.ones(5) * 0.5, 1000)
    floor = portrait_floor(validation, 0.10)
    assert portrait_floor(validation, 0.0) == 0.0
    features = np.abs(rng.normal(size=(40, 8)))
    ood = FeatureDistance.fit(features, np.arange(40) // 2, k=3)
    ood.portrait_floor = floor
    fresh = rng.dirichlet(np.ones(5) * 0.5, 4000)
    assert 0.08 <= ood.unsure_portrait(fresh).mean() <= 0.12
    unsure = np.full((1, 5), 0.2)  # a coin the head cannot place: 20% on each portrait
    assert ood.flag(features[:1], portraits=unsure)[0]
    assert not ood.flag(features[:1])[0]  # without the portraits, the features alone
    # stored with the model; files written before have no portrait flag
    saved = Quality(Conformal.fit([1.0, 2.0], [1.0, 2.0], [1.0, 2.0]), ood).save(tmp_path / "q")
    assert Quality.load(saved["conformal"], saved["ood"]).ood.portrait_floor == pytest.approx(floor)
    with np.load(saved["ood"]) as data:
        old = {key: data[key] for key in data.files if key != "portrait_floor"}
    np.savez(tmp_path / "old.npz", **old)
    assert Quality.load(saved["conformal"], tmp_path / "old.npz").ood.portrait_floor == 0.0


def test_view_disagreement_is_zero_when_the_views_agree_and_grows_as_they_part():
    config = ModelConfig(backbone="mobilenet_v3_small", pretrained=False)
    same = torch.tensor([2.0, 0.0, -1.0]).expand(1, 1, 4, 3)
    parted = torch.tensor([[[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]]])
    split = torch.tensor([[[[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]]])
    agree, apart, mostly = view_disagreement(torch.cat([same, parted, split]), config).tolist()
    assert agree == pytest.approx(0.0, abs=1e-6)
    assert apart > mostly > 0.1  # half the views against the other half part more than one against three
    assert apart < np.log(2) + 1e-6  # never above the entropy of a two-way split


def test_the_view_flag_fires_above_the_ceiling_fitted_at_the_stated_rate_and_is_served_by_the_graph(tmp_path):
    """The ceiling flags `rate` of the validation coins; the network, its ONNX graph and the saved quality files
    carry it; files written before have none."""
    rng = np.random.default_rng(1)
    validation = rng.gamma(1.0, 0.1, 2000)
    ceiling = disagreement_ceiling(validation, 0.05)
    assert disagreement_ceiling(validation, 0.0) == 0.0
    features = np.abs(rng.normal(size=(40, 8)))
    ood = FeatureDistance.fit(features, np.arange(40) // 2, k=3)
    assert not ood.views_disagree([10.0])[0]  # off until fitted
    ood.disagreement_ceiling = ceiling
    assert 0.035 <= ood.views_disagree(rng.gamma(1.0, 0.1, 4000)).mean() <= 0.065
    assert ood.flag(features[:1], disagreement=[ceiling * 2])[0]
    assert not ood.flag(features[:1], disagreement=[ceiling / 2])[0]
    saved = Quality(Conformal.fit([1.0, 2.0], [1.0, 2.0], [1.0, 2.0]), ood).save(tmp_path / "q")
    assert Quality.load(saved["conformal"], saved["ood"]).ood.disagreement_ceiling == pytest.approx(ceiling)
    with np.load(saved["ood"]) as data:
        np.savez(tmp_path / "old.npz", **{key: data[key] for key in data.files if key != "disagreement_ceiling"})
    assert Quality.load(saved["conformal"], tmp_path / "old.npz").ood.disagreement_ceiling == 0.0

    # an untrained resnet18's head changes its mind a little with the rotation (mobilenet's pooled features hardly
    # move); without its bias, no class swamps the others
    config = ModelConfig(backbone="resnet18", image_size=64, proj_dim=16, pretrained=False,
                         aux_classes={"portrait": 3}, aux_names={"portrait": ["A", "B", "other"]})
    torch.manual_seed(0)
    ensemble = CoinEnsemble([build_model(config, year_center=50.0, year_scale=40.0)], ANGLES).eval()
    head = ensemble.regressors[0].aux_heads["portrait"][1]
    with torch.no_grad():
        head.bias.zero_()
        head.weight.mul_(3)
    front = torch.zeros(3, 3, 64, 64)
    front[:, :, 5:30, 10:60] = 1.0
    front[1:, :, 30:60, 20:30] = 0.5
    front[2, 1] = torch.rand(64, 64, generator=torch.Generator().manual_seed(1))
    back = front.flip(-2)
    answer = infer(ensemble, front, back, with_features=True, with_heads=True)
    assert torch.allclose(answer["disagreement"], view_disagreement(answer["logits"], ensemble.config))
    assert (answer["disagreement"] > 1e-4).all()
    path, check, why, _ = export_checked(ensemble, front[:1], back[:1], tmp_path)
    assert path is not None and check is not None and check.passed, why
    from coinyear.runtime import OnnxScorer

    graph = OnnxScorer(path).infer(front, back, with_features=True)
    torch.testing.assert_close(graph["disagreement"], answer["disagreement"], atol=2e-5, rtol=1e-2)


def test_the_served_answer_uses_the_fitted_range_scale_and_the_portrait_flag():
    """The pyfunc's `answers` (every served range and flag): a mixture-scaled calibration widens the range of the
    coin whose portraits are torn between reigns, and the portrait floor flags the coin the head cannot place."""
    from coinyear.pyfunc import CoinYearModel

    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(40, 8)))
    ood = FeatureDistance.fit(features, np.arange(40) // 2, k=3)
    ood.portrait_floor = 0.5
    conformal = Conformal.fit([5.0, 10.0, 3.0, 7.0], [-4, -8, -2, -6], [4, 8, 2, 6], [10.0, 20.0, 5.0, 15.0],
                              spread_floor=1.0, by="mixture")
    served = CoinYearModel()
    served.quality, served.references = Quality(conformal, ood), None
    served.portraits = [("A", 0.0), ("B", 100.0), ("other", 50.0)]
    scored = {"year": np.array([50.0, 50.0]), "spread": np.array([3.0, 3.0]), "features": features[:2],
              "portraits": np.array([[0.9, 0.05, 0.05], [0.45, 0.45, 0.1]])}
    answer = served.answers(scored, 0.5)
    width = (answer["high"] - answer["low"]).to_numpy()
    dispersion = mixture_dispersion(scored["portraits"], [0.0, 100.0, 50.0])
    assert width == pytest.approx(2 * conformal.quantile(0.5) * np.maximum(dispersion, 1.0))
    assert width[1] > 5 * width[0]
    assert answer["out_of_distribution"].tolist() == [False, True]
