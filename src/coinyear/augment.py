"""Augmentation: what the training photos go through before the network sees them (re-shooting as a collector
would, rotation, colour jitter, flips when asked). The rotations the served model averages over at test time are
`recipe.TTA_ANGLES`."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from coinyear.recipe import TrainConfig


class Reshoot(nn.Module):
    """The same coin photographed by a collector instead of a museum, for a share `p` of the photos.

    OCRE's photos show the coin filling a white frame under even light; people photograph theirs smaller in the
    frame, on whatever lies under it, under a warm or cold lamp, not quite in focus. Each change is drawn at
    random: scale 0.6-1 of the frame (on the white background), the white background replaced by a random
    colour with noise (half the time), gamma 0.75-1.35 and each channel's gain 0.82-1.15, a Gaussian blur of
    sigma 0.3-1.6 px (40% of the time) and JPEG re-encoding at quality 40-95 (half the time). uint8 [C, H, W]
    in and out, before the rotation (whose black corners stay what the rotation TTA sees).
    benchmarks/photo_shift.py measures what it buys.
    """

    WHITE = 235  # OCRE backgrounds are brighter than this in every channel

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image
        channels = image.shape[0]
        x = image.float().unsqueeze(0)
        scale = float(torch.empty(()).uniform_(0.6, 1.0))
        if scale < 0.97:
            x = shrink_in_frame(x, scale, 255.0)
        if torch.rand(()) < 0.5:
            background = (x > self.WHITE).all(dim=1, keepdim=True)
            colour = torch.rand(1, channels, 1, 1) * 255 * torch.empty(()).uniform_(0.1, 1.0)
            cloth = colour + torch.randn_like(x) * float(torch.empty(()).uniform_(0, 12))
            x = torch.where(background, cloth, x)
        gamma = float(torch.empty(()).uniform_(0.75, 1.35))
        gains = torch.empty(1, channels, 1, 1).uniform_(0.82, 1.15)
        x = 255 * ((x.clamp(0, 255) / 255) ** gamma) * gains
        if torch.rand(()) < 0.4:
            x = v2.functional.gaussian_blur(x, kernel_size=[5, 5], sigma=[float(torch.empty(()).uniform_(0.3, 1.6))])
        photo = x.squeeze(0).round().clamp(0, 255).to(torch.uint8)
        if torch.rand(()) < 0.5:
            photo = v2.functional.jpeg(photo, int(torch.randint(40, 96, ())))
        return photo


def shrink_in_frame(images: torch.Tensor, scale: float, fill: float) -> torch.Tensor:
    """Float images [N, C, H, W] with the picture shrunk to `scale` of the frame, centred on `fill` (the white
    of the photo's own background): a coin photographed from further away."""
    height, width = images.shape[-2:]
    inner_h, inner_w = round(height * scale), round(width * scale)
    shrunk = nn.functional.interpolate(images, size=(inner_h, inner_w), mode="bilinear", antialias=True)
    top, left = (height - inner_h) // 2, (width - inner_w) // 2
    out = torch.full_like(images, fill)
    out[..., top:top + inner_h, left:left + inner_w] = shrunk
    return out


def make_augmentation(config: TrainConfig) -> v2.Compose:
    """Collector-style re-shooting (`Reshoot`), rotation (coins are photographed at any angle) and light colour
    jitter; flips only when asked."""
    steps: list[nn.Module] = [Reshoot(config.reshoot)] if config.reshoot else []
    steps.append(v2.RandomRotation(config.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR))
    if config.color_jitter:
        jitter = config.color_jitter
        if config.model.grayscale:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter))
        else:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if config.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)

