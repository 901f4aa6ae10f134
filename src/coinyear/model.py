"""Model stage: the dual-input coin regressor, its heads, the rotation ensemble and checkpoints.

`DualImageRegressor` takes the front and the back photo (float tensors in [0, 1], [B, C, H, W]) and returns
the year (negative = BC). Each side goes through a CNN backbone, one shared by both sides (`shared`) or one
per side (`dual`); the two feature vectors are concatenated, optionally projected, and a small head
regresses the year. Normalisation lives inside the model so that every caller feeds the same [0, 1] input.
The backbones themselves, their weights and input scaling, are in `coinyear.backbones`. The rest stays one
module (a little over 400 lines): the config, the network and its heads, and the checkpoint format that saves
and rebuilds them change together.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from coinyear.backbones import (
    BACKBONES,
    EFFICIENTNET_LITE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    build_backbone,
)

log = logging.getLogger(__name__)

MODES = ("shared", "dual")
PORTRAIT_INPUTS = ("fused", "obverse")


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    mode: str = "shared"
    proj_dim: int = 256
    grayscale: bool = False
    image_size: int = 128
    pretrained: bool = True
    dropout: float = 0.2
    # Auxiliary classification heads trained alongside the year (multi-task), e.g. {"portrait": 21}.
    aux_classes: dict[str, int] = field(default_factory=dict)
    # Each auxiliary head's class names in class order, the last "other" (set by the trainer; checkpoints from
    # before have none). The served answer names the portrait by it (`params.portraits`).
    aux_names: dict[str, list[str]] = field(default_factory=dict)
    # With a portrait head, the served year is (1 - w) x the regression head's + w x the ruler mixture (the sum
    # over portraits of p(portrait) x that portrait's median training year): the hierarchy a numismatist uses.
    # benchmarks/ruler_head.py: 15.15 years hold-out MAE at w = 0.5 against 16.34 for the regression alone.
    ruler_blend: float = 0.5
    # Which year of the ruler mixture: "mean" (sum of p x year; checkpoints from before) or "median" (the year at
    # which the portraits' probability, years in order, reaches one half: it minimises the expected absolute
    # error, and a coin between two likely portraits is not dated between their reigns).
    ruler_statistic: str = "mean"
    # Where the ruler mixture is taken: False = on each rotation's (and member's) probabilities, then the years
    # averaged (checkpoints from before); True = once, on the probabilities averaged over members and rotations
    # (benchmarks/levers.py: the averaged probabilities are the better evidence, one rotation's are noisy).
    ruler_pooled: bool = False
    # The portrait head's logits are divided by this before the softmax (temperature scaling, fitted on the
    # validation coin types by `calibrate.fit_levers`; 1 = as trained, checkpoints from before).
    portrait_temperature: float = 1.0
    # What the portrait head reads: "fused" (both sides' fused embedding, checkpoints from before) or "obverse"
    # (the obverse's pooled backbone features alone). The portrait is on the obverse; a coin of an unseen type
    # shows a reverse no training coin had, which a head reading both sides has learned to lean on.
    portrait_input: str = "fused"
    # What the model was trained on (`years.training_span`, set by the trainer; checkpoints from before have
    # none): served in /version and the MLmodel metadata, and said in words when the OOD flag is up.
    span: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {', '.join(BACKBONES)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.ruler_statistic not in ("mean", "median"):
            raise ValueError(f"ruler_statistic is 'mean' or 'median', not {self.ruler_statistic!r}")
        if self.portrait_input not in PORTRAIT_INPUTS:
            raise ValueError(f"portrait_input is one of {', '.join(PORTRAIT_INPUTS)}, not {self.portrait_input!r}")
        if not self.portrait_temperature > 0:
            raise ValueError(f"portrait_temperature must be > 0, not {self.portrait_temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- model
class DualImageRegressor(nn.Module):
    """Front + back photo -> year."""

    # buffers (register_buffer), typed for the checker
    mean: torch.Tensor
    std: torch.Tensor
    year_center: torch.Tensor
    year_scale: torch.Tensor
    portrait_years: torch.Tensor

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
        mean: tuple[float, ...]
        std: tuple[float, ...]
        mean, std = (LITE_MEAN, LITE_STD) if config.backbone in EFFICIENTNET_LITE else (IMAGENET_MEAN, IMAGENET_STD)
        if config.grayscale:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        self.register_buffer("mean", torch.tensor(mean).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, channels, 1, 1))
        self.register_buffer("year_center", torch.tensor(float(year_center)))
        self.register_buffer("year_scale", torch.tensor(float(year_scale)))
        fused = 2 * dim
        self.fusion: nn.Module
        if config.proj_dim:
            self.fusion = nn.Sequential(nn.Linear(fused, config.proj_dim), nn.ReLU(inplace=True))
            fused = config.proj_dim
        else:
            self.fusion = nn.Identity()
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(fused, 1))
        self.aux_heads = nn.ModuleDict({
            name: nn.Sequential(nn.Dropout(config.dropout),
                                nn.Linear(dim if self._reads_obverse(name) else fused, count))
            for name, count in config.aux_classes.items()})
        # each portrait class's median year (set by the trainer from its training coins; saved with the weights)
        self.register_buffer("portrait_years", torch.zeros(config.aux_classes.get("portrait", 0)))

    def backbone_features(self, front: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each side's pooled backbone features, ([B, D], [B, D])."""
        front = (front - self.mean) / self.std
        back = (back - self.mean) / self.std
        if self.config.mode == "shared":
            return self.front_net(torch.cat([front, back])).chunk(2)
        return self.front_net(front), self.back_net(back)

    def features(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """The fused embedding of a coin, [B, proj_dim or 2*D]."""
        return self.fuse(*self.backbone_features(front, back))

    def fuse(self, front_features: torch.Tensor, back_features: torch.Tensor) -> torch.Tensor:
        """The fused embedding from both sides' pooled backbone features ([B, D] each)."""
        return self.fusion(torch.cat([front_features, back_features], dim=1))

    def ood_features(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """What the out-of-distribution score compares: both sides' pooled backbone features, [B, 2*D].
        Backbone features (not the year-trained fusion) keep what makes a photo look like a coin, and their
        size matters: a featureless photo (a blank card) gives a near-zero vector."""
        return torch.cat(self.backbone_features(front, back), dim=1)

    def forward(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """The served year of one unrotated pass, [B]: the regression head's, blended with the ruler mixture when
        there is a portrait head (`blend_rulers`, the function the ensemble serves with)."""
        regression, logits = self.forward_with_aux(front, back)
        portrait = logits["portrait"].unsqueeze(1).unsqueeze(1) if "portrait" in logits else None
        return blend_rulers(regression.view(-1, 1, 1), portrait, self.portrait_years.unsqueeze(0),
                            self.config)[0].view(-1)

    def regression_year(self, features: torch.Tensor) -> torch.Tensor:
        """The regression head's year of fused embeddings: it predicts a standardised year, rescaled here."""
        return self.head(features).squeeze(1) * self.year_scale + self.year_center

    def _reads_obverse(self, head: str) -> bool:
        return head == "portrait" and self.config.portrait_input == "obverse"

    def aux_logits(self, front_features: torch.Tensor, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each auxiliary head's logits, from the obverse's pooled features `front_features` [B, D] or the fused
        embedding [B, F], whichever it reads (`ModelConfig.portrait_input`)."""
        return {name: head(front_features if self._reads_obverse(name) else fused)
                for name, head in self.aux_heads.items()}

    def portrait_probabilities(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """The portrait head's class probabilities of one unrotated pass, [B, classes] (needs a portrait head), at
        the model's `portrait_temperature`."""
        return torch.softmax(self.forward_with_aux(front, back)[1]["portrait"] / self.config.portrait_temperature,
                             dim=1)

    def forward_with_aux(self, front: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The regression head's years (what the year loss trains) and the auxiliary heads' logits."""
        front_features, back_features = self.backbone_features(front, back)
        fused = self.fuse(front_features, back_features)
        return self.regression_year(fused), self.aux_logits(front_features, fused)


def ruler_year(probabilities: torch.Tensor, years: torch.Tensor, statistic: str) -> torch.Tensor:
    """The ruler mixture's year per row of `probabilities` [B, C] over the classes' `years` [C]: its weighted
    median or its mean (`ModelConfig.ruler_statistic`)."""
    return mixture_median(probabilities, years) if statistic == "median" else probabilities @ years


def blend_rulers(regression: torch.Tensor, logits: torch.Tensor | None, years: torch.Tensor,
                 config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The served years and portrait probabilities from the heads' raw outputs: the one function the network,
    its ONNX graph and the post-hoc calibration (`coinyear.calibrate`) compute them with.

    `regression`: the regression head's years per coin, member and rotation [B, M, A]; `logits`: the portrait
    head's [B, M, A, C] or None; `years`: each member's portrait years [M, C]. Returns (years [B, M, A]: (1 - w) x
    regression + w x the ruler mixture, w = `ruler_blend`; the portrait probabilities at `portrait_temperature`
    averaged over members and rotations [B, C], or None). With `ruler_pooled` the mixture is taken once, on
    those averaged probabilities (over the members' mean years), else on each rotation's own."""
    if logits is None:
        return regression, None
    probabilities = torch.softmax(logits / config.portrait_temperature, dim=-1)
    pooled = probabilities.mean(dim=(1, 2))
    blend = config.ruler_blend
    if blend <= 0:
        return regression, pooled
    if config.ruler_pooled:
        ruler = ruler_year(pooled, years.mean(dim=0), config.ruler_statistic).view(-1, 1, 1)
    else:
        batch, members, angles, classes = probabilities.shape
        ruler = torch.stack([ruler_year(probabilities[:, m].reshape(batch * angles, classes), years[m],
                                        config.ruler_statistic).view(batch, angles)
                             for m in range(members)], dim=1)
    return (1 - blend) * regression + blend * ruler, pooled


def mixture_median(probabilities: torch.Tensor, years: torch.Tensor) -> torch.Tensor:
    """Per row of class `probabilities` [B, C], the weighted median of the classes' `years` [C]: the smallest
    year whose cumulative probability, years in order, reaches half the row's total (ONNX-exportable: sort,
    cumulative sum, count, gather)."""
    order = torch.argsort(years)
    cumulative = torch.cumsum(probabilities[:, order], dim=1)
    index = (cumulative < 0.5 * cumulative[:, -1:]).sum(dim=1).clamp(max=years.shape[0] - 1)
    return years[order][index]


def rotation_grid(height: int, width: int, angles: tuple[float, ...]) -> torch.Tensor:
    """Sampling grids, [angles, H, W, 2], that rotate an image counter-clockwise by each angle (degrees) about its
    centre: the grid torchvision's `rotate` builds (bilinear, zeros outside), for every angle at once."""
    radians = torch.tensor(angles, dtype=torch.float64).deg2rad()
    cos, sin = radians.cos(), radians.sin()
    # inverse map, output pixel -> input pixel, in pixel units about the centre (as torchvision's _affine_grid)
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1).to(torch.float32)
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).view(1, height * width, 2)
    scale = torch.tensor([0.5 * width, 0.5 * height])
    return base.expand(len(angles), -1, -1).bmm(theta.transpose(1, 2).div(scale)).view(len(angles), height, width, 2)


def rotate_stack(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Every image rotated by every grid of `rotation_grid` in one `grid_sample`: [N, C, H, W] -> [A*N, C, H, W],
    angle-major."""
    count, (n, c, h, w) = grid.shape[0], images.shape
    stacked = images.unsqueeze(0).expand(count, n, c, h, w).reshape(count * n, c, h, w)
    grids = grid.to(images.dtype).unsqueeze(1).expand(count, n, h, w, 2).reshape(count * n, h, w, 2)
    return nn.functional.grid_sample(stacked, grids, mode="bilinear", padding_mode="zeros", align_corners=False)


class CoinEnsemble(nn.Module):
    """What is served: the mean year of one or more regressors (e.g. the K fold models) over rotated copies
    of both photos (test-time augmentation; coins are photographed at any angle).

    All rotations of both photos go through each member in one forward pass (rotated with one fixed sampling
    grid, built once per image size), and the unrotated pass of member 0 also gives the out-of-distribution
    features, so asking for them costs nothing. Exposes `config` and `pretrained_loaded` like a single
    regressor, so every caller treats both alike.
    """

    def __init__(self, members: list[DualImageRegressor], tta_angles: tuple[float, ...] = (0.0,)):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.tta_angles = tuple(float(a) for a in tta_angles) or (0.0,)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}  # (H, W) -> grid of the non-zero angles

    @property
    def regressors(self) -> list[DualImageRegressor]:
        """The members as what they are (nn.ModuleList items are typed as any Module)."""
        return cast(list[DualImageRegressor], list(self.members))

    @property
    def config(self) -> ModelConfig:
        return self.regressors[0].config

    @property
    def pretrained_loaded(self) -> bool:
        return all(m.pretrained_loaded for m in self.regressors)

    def rotated(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [angles*B, C, H, W] in `tta_angles` order; angle 0 is the photo itself, not resampled."""
        turned = [angle for angle in self.tta_angles if angle % 360 != 0]
        if not turned:
            return images.repeat(len(self.tta_angles), 1, 1, 1)
        height, width = images.shape[-2:]
        size = (height, width)
        if size not in self._grids:
            self._grids[size] = rotation_grid(height, width, tuple(turned))
        stack = rotate_stack(images, self._grids[size].to(images.device)).unflatten(0, (len(turned), -1))
        parts, index = [], 0
        for angle in self.tta_angles:  # assembles views already computed; no model call per angle
            if angle % 360 == 0:
                parts.append(images)
            else:
                parts.append(stack[index])
                index += 1
        return torch.cat(parts)

    @property
    def has_portraits(self) -> bool:
        """Whether the members have a portrait head whose classes are named (the answer can name the portrait)."""
        return all("portrait" in member.aux_heads for member in self.regressors) \
            and len(self.config.aux_names.get("portrait", ())) == self.config.aux_classes.get("portrait", -1)

    def portrait_classes(self) -> list[tuple[str, float]]:
        """(name, median training year) of each portrait class in class order ([] without a named head); the
        year is the members' mean (each member set it from its own training coins)."""
        if not self.has_portraits:
            return []
        years = torch.stack([member.portrait_years for member in self.regressors]).mean(dim=0)
        return list(zip(self.config.aux_names["portrait"], years.tolist()))

    def heads(self, front: torch.Tensor, back: torch.Tensor, with_features: bool = False,
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The heads' raw outputs, before any blend: (the regression head's year of every member on every
        rotation [B, members, angles], the portrait head's logits [B, members, angles, classes] or None without a
        portrait head, and, `with_features`, member 0's out-of-distribution features [B, 2*D] and fused embedding
        [B, E] of the unrotated photos, else None and None)."""
        batch, angles = front.shape[0], len(self.tta_angles)
        fronts, backs = self.rotated(front), self.rotated(back)
        unrotated = next((i for i, angle in enumerate(self.tta_angles) if angle % 360 == 0), None)
        years, features, embedding, logits = [], None, None, []
        for index, member in enumerate(self.regressors):
            front_features, back_features = member.backbone_features(fronts, backs)
            both = torch.cat([front_features, back_features], dim=1)
            fused = member.fusion(both)
            years.append(member.regression_year(fused).view(angles, batch))
            if "portrait" in member.aux_heads:
                logits.append(member.aux_logits(front_features, fused)["portrait"].view(angles, batch, -1))
            if index == 0 and with_features:
                if unrotated is not None:
                    features = both.view(angles, batch, -1)[unrotated]
                    embedding = fused.view(angles, batch, -1)[unrotated]
                else:
                    features, embedding = member.ood_features(front, back), member.features(front, back)
        stacked = torch.stack(logits).permute(2, 0, 1, 3) if len(logits) == len(years) else None
        return torch.stack(years).permute(2, 0, 1), stacked, features, embedding

    def portrait_years(self) -> torch.Tensor:
        """Each member's portrait years, [members, classes]."""
        return torch.stack([member.portrait_years for member in self.regressors])

    def scores(self, front: torch.Tensor, back: torch.Tensor, with_features: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(every member's served year on every rotation [B, members, angles] (`blend_rulers`), member 0's
        out-of-distribution features of the unrotated photos [B, 2*D] or None, and with the features the portrait
        probabilities [B, classes] averaged over members and rotations, or None without a named portrait head)."""
        regression, logits, features, _ = self.heads(front, back, with_features)
        return self.served(regression, logits, features, with_features)

    def served(self, regression: torch.Tensor, logits: torch.Tensor | None, features: torch.Tensor | None,
               with_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`scores` from the outputs of `heads`."""
        samples, portraits = blend_rulers(regression, logits, self.portrait_years(), self.config)
        return samples, features, portraits if with_features and self.has_portraits else None

    def year_samples(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """Every member's year on every rotation, [B, members, angles]."""
        return self.scores(front, back)[0]

    def forward(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        return self.year_samples(front, back).mean(dim=(1, 2))

    def features(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """The first member's fused embedding."""
        return self.regressors[0].features(front, back)

    def ood_features(self, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """The first member's (members share their training coins' look; one keeps the reference small)."""
        return self.regressors[0].ood_features(front, back)


def rotation_spread(samples: torch.Tensor) -> torch.Tensor:
    """How much the year moves when the photos are rotated: std over angles, averaged over members.
    [B, members, angles] -> [B]; zero with a single angle."""
    if samples.shape[2] < 2:
        return torch.zeros(samples.shape[0], device=samples.device)
    return samples.std(dim=2).mean(dim=1)


def view_disagreement(logits: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """How much the portrait head changes its mind between the rotated views (and members) of a coin: the mutual
    information between the portrait and the view, i.e. the entropy of the averaged probabilities minus the views'
    mean entropy, at `portrait_temperature`. [B, members, angles, classes] logits -> [B], in nats; zero when every
    view says the same. An out-of-distribution signal: on coins of a ruler training never saw, it separated them
    from unseen in-span types better than any other signal tried (benchmarks/era_shift.py)."""
    views = torch.softmax(logits / config.portrait_temperature, dim=-1).flatten(1, 2)
    entropy = lambda p: -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)  # noqa: E731
    return (entropy(views.mean(dim=1)) - entropy(views).mean(dim=1)).clamp_min(0)


def as_ensemble(model: DualImageRegressor | CoinEnsemble) -> CoinEnsemble:
    """A single regressor as a one-member ensemble without rotations (same years): one scoring path for both."""
    return model if isinstance(model, CoinEnsemble) else CoinEnsemble([model], (0.0,))


@torch.inference_mode()
def infer(model: DualImageRegressor | CoinEnsemble, front: torch.Tensor, back: torch.Tensor,
          with_features: bool = False, with_heads: bool = False) -> dict[str, torch.Tensor]:
    """One batch: {"year": [B], "spread": [B] (rotation spread, zero without TTA), "features": [B, D] (the
    out-of-distribution features, from the same forward pass), "embedding" [B, E] (member 0's fused embedding of
    the unrotated photos, which the era-shift score compares) and, with a named portrait head, "portraits"
    [B, classes] (its probabilities, averaged over members and rotations) and "disagreement" [B]
    (`view_disagreement`)}; the last four `with_features`. With
    `with_heads` also the heads' raw outputs of `CoinEnsemble.heads`: "regression" [B, members, angles] and,
    with a portrait head, "logits" [B, members, angles, classes] (what `coinyear.calibrate` fits on)."""
    ensemble = as_ensemble(model)
    regression, logits, features, embedding = ensemble.heads(front, back, with_features)
    samples, features, portraits = ensemble.served(regression, logits, features, with_features)
    out = {"year": samples.mean(dim=(1, 2)), "spread": rotation_spread(samples)}
    if with_heads:
        out["regression"] = regression
        if logits is not None:
            out["logits"] = logits
    if with_features:
        assert features is not None, "scores() gives the features when asked for them"
        out["features"] = features
        if embedding is not None:
            out["embedding"] = embedding
        if portraits is not None and logits is not None:
            out["portraits"] = portraits
            out["disagreement"] = view_disagreement(logits, ensemble.config)
    return out


def build_model(config: ModelConfig, year_center: float = 0.0, year_scale: float = 1.0) -> DualImageRegressor:
    return DualImageRegressor(config, year_center, year_scale)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: DualImageRegressor | CoinEnsemble, path: str | Path) -> None:
    if isinstance(model, CoinEnsemble):
        torch.save({"config": model.config.to_dict(), "tta_angles": list(model.tta_angles),
                    "members": [m.state_dict() for m in model.members]}, path)
    else:
        torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path: str | Path) -> DualImageRegressor | CoinEnsemble:
    """A single regressor, or an ensemble when the checkpoint holds several members or rotation angles."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = ModelConfig(**{**checkpoint["config"], "pretrained": False})

    def regressor(state: dict) -> DualImageRegressor:
        model = DualImageRegressor(config)
        model.load_state_dict(state)
        return model

    if "members" in checkpoint:
        return CoinEnsemble([regressor(s) for s in checkpoint["members"]], tuple(checkpoint["tta_angles"])).eval()
    return regressor(checkpoint["state_dict"]).eval()
