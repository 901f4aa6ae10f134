"""The ruler mixture's median (ModelConfig.ruler_statistic = "median"): the right year per row, served by the
network itself, and the same in the ONNX graph that ONNX Runtime and OpenVINO serve; and a portrait head that
reads the obverse alone (ModelConfig.portrait_input = "obverse"), served alike."""

import pytest
import torch

from coinyear.model import CoinEnsemble, ModelConfig, build_model, mixture_median
from coinyear.runtime import export_checked


def test_the_median_is_the_year_where_the_probability_reaches_one_half():
    years = torch.tensor([100.0, -20.0, 50.0])
    probabilities = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0],
                                  [0.45, 0.55, 0.0]])
    assert mixture_median(probabilities, years).tolist() == [50.0, 100.0, 50.0, 50.0, -20.0]
    # between two likely portraits the mean dates the coin between their reigns; the median picks one of them
    assert float(probabilities[4] @ years) == pytest.approx(34.0)


def portrait_model(statistic: str, portrait_input: str = "fused", backbone: str = "mobilenet_v3_small"):
    config = ModelConfig(backbone=backbone, image_size=64, proj_dim=16, pretrained=False,
                         aux_classes={"portrait": 3}, aux_names={"portrait": ["A", "B", "other"]},
                         ruler_statistic=statistic, portrait_input=portrait_input)
    torch.manual_seed(0)
    model = build_model(config, year_center=50.0, year_scale=40.0)
    model.portrait_years.copy_(torch.tensor([10.0, 120.0, 60.0]))
    return model.eval()


def test_the_served_year_blends_the_median_not_the_mean():
    front, back = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    model = portrait_model("median")
    with torch.no_grad():
        features = model.features(front, back)
        regression, p = model.regression_year(features), model.portrait_probabilities(front, back)
        expected = 0.5 * regression + 0.5 * mixture_median(p, model.portrait_years)
        assert torch.allclose(model(front, back), expected)
        model.config.ruler_statistic = "mean"
        assert torch.allclose(model(front, back), 0.5 * regression + 0.5 * (p @ model.portrait_years))


def test_an_unknown_statistic_is_refused():
    with pytest.raises(ValueError, match="ruler_statistic"):
        ModelConfig(ruler_statistic="mode")


def test_the_onnx_graph_serves_the_median(tmp_path):
    model = CoinEnsemble([portrait_model("median")], (0.0, 90.0))
    front, back = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    path, check, reason, openvino = export_checked(model, front, back, tmp_path)
    assert path is not None and check is not None and check.passed, reason
    assert openvino is None or openvino.passed


def test_an_obverse_portrait_head_reads_the_obverse_alone():
    """Its logits move with the obverse photo and not with the reverse; the regression head still reads both.
    (resnet18: an untrained mobilenet_v3_small in eval mode maps every photo to nearly the same features.)"""
    model = portrait_model("median", "obverse", "resnet18")
    assert model.aux_heads["portrait"][1].in_features != model.head[1].in_features  # backbone width, not fused
    torch.manual_seed(1)
    front, back, other_back = (torch.rand(2, 3, 64, 64) for _ in range(3))
    with torch.no_grad():
        regression, logits = model.forward_with_aux(front, back)
        regression_other, logits_other = model.forward_with_aux(front, other_back)
        _, logits_new_front = model.forward_with_aux(torch.rand(2, 3, 64, 64), back)
    torch.testing.assert_close(logits["portrait"], logits_other["portrait"])
    assert not torch.allclose(logits["portrait"], logits_new_front["portrait"])
    assert not torch.allclose(regression, regression_other)


def test_an_obverse_portrait_head_is_served_alike_by_network_ensemble_and_onnx(tmp_path):
    model = portrait_model("median", "obverse", "resnet18")  # features that differ per photo (see above)
    front, back = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(CoinEnsemble([model], (0.0,))(front, back), model(front, back))
    path, check, reason, openvino = export_checked(CoinEnsemble([model], (0.0, 90.0)), front[:1], back[:1], tmp_path)
    assert path is not None and check is not None and check.passed, reason
    assert openvino is None or openvino.passed


def test_an_unknown_portrait_input_is_refused():
    with pytest.raises(ValueError, match="portrait_input"):
        ModelConfig(portrait_input="reverse")
