"""Model behaviour: every backbone/mode/colour combination has the right shapes and wiring, weights load
strictly, and predictions do not depend on what else is in the batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coinyear.backbones import BACKBONES, efficientnet_lite0_weights_path, load_by_position
from coinyear.model import ModelConfig, build_model, count_parameters, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["shared", "dual"])
@pytest.mark.parametrize("grayscale", [False, True])
def test_every_configuration_maps_two_images_to_one_year(backbone, mode, grayscale):
    config = ModelConfig(backbone=backbone, mode=mode, grayscale=grayscale, image_size=64,
                         proj_dim=16 if mode == "dual" else 0, pretrained=False)
    model = build_model(config, year_center=80, year_scale=30).eval()
    channels = 1 if grayscale else 3
    front, back = torch.rand(3, channels, 64, 64), torch.rand(3, channels, 64, 64)
    with torch.no_grad():
        years = model(front, back)
    assert years.shape == (3,)
    assert torch.isfinite(years).all()
    first_conv = next(m for m in model.front_net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == channels
    assert (model.back_net is model.front_net) == (mode == "shared")


def test_dual_mode_has_twice_the_backbone_parameters():
    shared = build_model(ModelConfig(backbone="mobilenet_v3_small", mode="shared", proj_dim=0, pretrained=False))
    dual = build_model(ModelConfig(backbone="mobilenet_v3_small", mode="dual", proj_dim=0, pretrained=False))
    head = sum(p.numel() for p in shared.head.parameters())
    assert count_parameters(dual) - head == 2 * (count_parameters(shared) - head)


def test_projection_layer_sets_the_embedding_width():
    model = build_model(ModelConfig(backbone="mobilenet_v3_small", proj_dim=24, pretrained=False)).eval()
    with torch.no_grad():
        assert model.features(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)).shape == (2, 24)


@pytest.mark.parametrize("mode", ["shared", "dual"])
def test_each_side_reaches_its_own_half_of_the_features(mode):
    """The fused features keep the sides apart, front half then back half, so the head can learn what each side
    tells. (This replaces "a swap changes the answer": on a random head a swap always changes it, whatever the
    wiring.) A fusion that mixes the sides, or a side that gets the other photo, fails here."""
    # pretrained features: a randomly initialised backbone in eval mode maps every image to ~0
    model = build_model(ModelConfig(backbone="efficientnet_lite0", mode=mode, proj_dim=0)).eval()
    a, b, c = (torch.rand(1, 3, 64, 64) for _ in range(3))
    with torch.no_grad():
        ab, ac, ba = model.features(a, b), model.features(a, c), model.features(b, a)
    half = ab.shape[1] // 2
    assert torch.allclose(ab[:, :half], ac[:, :half], atol=1e-5)  # the front half is the front photo's alone
    assert not torch.allclose(ab[:, half:], ac[:, half:], atol=1e-3)  # the back half follows the back photo
    # swapped photos swap the halves (both sides start from the same ImageNet weights, in dual mode too)
    assert torch.allclose(ba, torch.cat([ab[:, half:], ab[:, :half]], dim=1), atol=1e-5)


def test_efficientnet_lite0_loads_the_shipped_imagenet_weights():
    assert efficientnet_lite0_weights_path().is_file()
    model = build_model(ModelConfig(backbone="efficientnet_lite0", pretrained=True))
    assert model.pretrained_loaded
    shipped = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.front_net.conv_stem.weight, shipped["_conv_stem.weight"])


def test_grayscale_stem_sums_the_pretrained_rgb_filters():
    model = build_model(ModelConfig(backbone="efficientnet_lite0", grayscale=True, pretrained=True))
    shipped = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert torch.allclose(model.front_net.conv_stem.weight, shipped["_conv_stem.weight"].sum(1, keepdim=True))


def test_position_loading_refuses_a_shape_mismatch():
    target = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_by_position(target, {"w": torch.zeros(2, 4), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match="tensors"):
        load_by_position(target, {"w": torch.zeros(2, 3)})


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub cache of the test's own: whether this machine has ImageNet weights cached is no input."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def test_missing_torchvision_weights_train_from_scratch_with_a_warning(hub_dir, caplog):
    model = build_model(ModelConfig(backbone="resnet18", pretrained=True))
    assert not model.pretrained_loaded
    assert "no local ImageNet weights for resnet18 (nothing is downloaded): training from scratch" in caplog.text


def test_torchvision_weights_in_the_hub_cache_are_loaded(hub_dir, caplog):
    import torchvision

    weights = torchvision.models.resnet18(weights=None).state_dict()  # stand-in for the ImageNet file (offline)
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(weights, hub_dir / "checkpoints" / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=True))
    assert model.pretrained_loaded and "training from scratch" not in caplog.text
    assert torch.equal(model.front_net.conv1.weight, weights["conv1.weight"])


def test_prediction_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="efficientnet_lite0"), 80, 30).eval()
    fronts, backs = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        batch = model(fronts, backs)
        alone = torch.stack([model(fronts[i:i + 1], backs[i:i + 1])[0] for i in range(4)])
    assert torch.allclose(batch, alone, atol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    model = build_model(ModelConfig(backbone="mobilenet_v3_small", pretrained=False), 80, 30).eval()
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x, x), loaded(x, x))
    assert float(loaded.year_center) == 80
