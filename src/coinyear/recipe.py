"""The training recipe, built in one place from Settings: `coinyear train` and the retraining job both call
`recipe_from_settings`, so a model trained by hand and one trained by the job follow the same recipe.

A value given explicitly (a command-line flag) overrides the setting; `None` means "not given". The rules are
the settings' own (`config.Settings`: a COINYEAR_* variable out of bounds is refused when the settings are read),
applied here to each flag too; the rules that span fields are TrainConfig's. An invalid value (`--lr 0`,
`--ensemble` without folds, ...) is a clear error, never a silent default.

`TrainConfig` is the recipe as the training stage reads it (`coinyear.fit`, `coinyear.experiment`): its fields
that are settings take the settings' defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from coinyear.config import AUX_COLUMNS, LOSSES, Settings, setting_default
from coinyear.model import ModelConfig

# Rotation TTA measured in benchmarks/quality.py: -0.7 years MAE, and its spread makes the conformal ranges
# adaptive (median 90% width 35 instead of 60 years at the same coverage). Costs 5 forward passes per coin.
TTA_ANGLES = (-20.0, -10.0, 0.0, 10.0, 20.0)


@dataclass
class TrainConfig:
    """How a model is trained. The fields that are settings take the settings' defaults (`config.Settings`, the
    one home of the recipe's defaults); the rest are fixed choices, each with its reason."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = setting_default("epochs")
    batch_size: int = setting_default("batch_size")
    lr: float = setting_default("lr")
    weight_decay: float = 1e-4
    loss: str = setting_default("loss")
    patience: int = 3
    # Keep the epoch with the best validation MAE and stop when it stalls. Off = fixed epochs, last weights.
    # The epoch is chosen on validation coins, never on the test coin types (`data.split_test`), so the test
    # score is not flattered by the choice; the `val_*` metrics are.
    early_stopping: bool = True
    folds: int = setting_default("folds")
    # Without folds: the share of the non-test rows (whole coin types, seeded) held out for validation.
    holdout_fraction: float = 0.15
    # Progressive resizing: every epoch but the last `full_size_epochs` sees the photos downscaled by
    # `early_scale` (a fraction of the cost per step); those and every validation are at the served size.
    early_scale: float = setting_default("early_scale")
    full_size_epochs: int = setting_default("full_size_epochs")
    # The backbone's stem and first `frozen_blocks` stages keep their ImageNet weights (`backbones.early_stages`);
    # `ema_decay` > 0 validates, keeps and returns the weights' moving average instead of the weights as trained.
    frozen_blocks: int = setting_default("frozen_blocks")
    ema_decay: float = setting_default("ema_decay")
    rotation_degrees: float = 20.0
    color_jitter: float = 0.2
    horizontal_flip: bool = setting_default("horizontal_flip")
    reshoot: float = setting_default("reshoot")
    seed: int = setting_default("seed")
    limit: int | None = None
    # Rotation test-time augmentation: the served year is the mean over these rotations of both photos.
    tta_angles: tuple[float, ...] = TTA_ANGLES
    ensemble: bool = setting_default("ensemble")
    aux_weight: float = setting_default("aux_weight")
    aux_heads: tuple[str, ...] = tuple(setting_default("aux_heads"))
    # Classes beyond the most common `aux_top` of each auxiliary column share one "other" class.
    aux_top: int = 20
    # Conformal scores divided by the spread of the rotated predictions (needs >= 2 TTA angles).
    conformal_scaled: bool = True
    # Share of coins of unseen types (in the training span) the out-of-distribution flag may wrongly flag
    # is 1 - ood_quantile; benchmarks/era_shift.py measures what it then catches. 2.5%: the era-shift score below
    # takes a further 5%.
    ood_quantile: float = 0.975
    # Fit the post-hoc levers on the validation coins at the end of training (`coinyear.calibrate`): the portrait
    # temperature, the ruler mixture's pooling and weight, the range's scale and the portrait flag. Off: the
    # network serves as trained, the ranges divide by the rotation spread, no portrait flag.
    calibrate: bool = True
    # Whether the levers also choose the ruler mixture's weight (`Settings.ruler_blend` = "fit"); else the
    # network's `ModelConfig.ruler_blend`, fixed by the recipe, is served.
    fit_ruler_blend: bool = setting_default("ruler_blend") == "fit"
    # Share of validation coins (unseen in-span types) the portrait flag may flag (`calibrate.portrait_floor`;
    # 0 = no portrait flag): a false-alarm rate stated in advance, on top of the feature distance's. Off: it lost
    # on benchmarks/era_shift.py (portrait-levers: AUROC 0.568; at 5% it flagged 13.6% of in-span test types and
    # 11.9% of the out-of-span coins).
    portrait_flag_rate: float = 0.0
    # Share of validation coins the view flag may flag (`calibrate.disagreement_ceiling`; 0 = none): the portrait
    # head's disagreement between the rotated views of a coin (`model.view_disagreement`; AUROC 0.745 and 0.644
    # over two seeds on benchmarks/era_shift.py). Off: the era-shift score below reads it with the embedding
    # distance, and ranks better.
    view_flag_rate: float = 0.0
    # Share of validation coins the era-shift score may flag (`quality.FeatureDistance.fit_shift`; 0 = none): the
    # mean rank of the fused embedding's distance to the training coins and of the view disagreement, the best
    # signal on the choice set of benchmarks/era_shift.py (`--cutoff 98`).
    shift_flag_rate: float = 0.05
    device: str = "auto"  # "auto": CUDA when present, else CPU

    def __post_init__(self):
        """The checks that span fields or that a hand-built config needs (the settings check each value)."""
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        self.tta_angles = tuple(float(a) for a in self.tta_angles)
        if self.ensemble and self.folds < 2:
            raise ValueError("ensemble needs folds >= 2 (COINYEAR_FOLDS or --folds)")
        self.aux_heads = tuple(self.aux_heads)
        unknown = sorted(set(self.aux_heads) - set(AUX_COLUMNS))
        if unknown:
            raise ValueError(f"unknown auxiliary column(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(AUX_COLUMNS)}")

    def early_size(self, epoch: int, epochs: int) -> int | None:
        """The image size epoch `epoch` (from 1) of `epochs` trains at when progressive resizing shrinks it, else
        None (the served size)."""
        if self.early_scale >= 1 or epoch > epochs - self.full_size_epochs:
            return None
        return max(32, round(self.model.image_size * self.early_scale))

    def flat(self) -> dict:
        params = {k: v for k, v in asdict(self).items() if k != "model"}
        params.update(self.model.to_dict())
        return params


RECIPE_FIELDS = ("backbone", "mode", "proj_dim", "grayscale", "image_size", "pretrained", "epochs", "batch_size",
                 "lr", "loss", "folds", "seed", "limit", "horizontal_flip", "tta", "ensemble", "aux_weight",
                 "aux_heads", "reshoot", "ruler_statistic", "early_scale", "full_size_epochs",
                 "frozen_blocks", "ema_decay", "portrait_input", "ruler_blend")


@cache
def _setting_rule(name: str) -> TypeAdapter:
    """The validator of one setting: its type with its constraints (bounds, choices, validators)."""
    return TypeAdapter(Settings.model_fields[name].rebuild_annotation())


def _checked(name: str, value: Any) -> Any:
    if name == "limit":  # the coins a run trains on are the caller's choice (a flag), not a setting
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"invalid training recipe: limit must be none or an integer >= 1, got {value!r}")
        return value
    try:
        return _setting_rule(name).validate_python(value)
    except ValidationError as error:
        raise ValueError(f"invalid training recipe: {name}: {error.errors()[0]['msg']}, got {value!r}") from None


def recipe_values(settings: Settings, **overrides) -> dict:
    """The recipe's values: each override that is not None (checked by its setting's rules), else the setting of
    the same name."""
    unknown = set(overrides) - set(RECIPE_FIELDS)
    if unknown:
        raise TypeError(f"not a recipe field: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {name: getattr(settings, name, None) for name in RECIPE_FIELDS}
    values.update({name: _checked(name, value) for name, value in overrides.items() if value is not None})
    return values


def recipe_from_settings(settings: Settings, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) from `settings`, with `overrides` (None = use the setting); see the module."""
    v = recipe_values(settings, **overrides)
    no_tta: dict[str, Any] = {} if v["tta"] else {"tta_angles": ()}
    fit_blend = v["ruler_blend"] == "fit"
    # a fitted weight starts at the network's default until the levers are fitted; a fixed one is served as given
    blend: dict[str, Any] = {} if fit_blend else {"ruler_blend": float(v["ruler_blend"])}
    model = ModelConfig(backbone=v["backbone"], mode=v["mode"], proj_dim=v["proj_dim"], grayscale=v["grayscale"],
                        image_size=v["image_size"], pretrained=v["pretrained"], ruler_statistic=v["ruler_statistic"],
                        portrait_input=v["portrait_input"], **blend)
    try:
        train = TrainConfig(model=model, epochs=v["epochs"], batch_size=v["batch_size"], lr=float(v["lr"]),
                            loss=v["loss"], folds=v["folds"], seed=v["seed"], limit=v["limit"],
                            horizontal_flip=v["horizontal_flip"], ensemble=v["ensemble"],
                            aux_weight=float(v["aux_weight"]), aux_heads=tuple(v["aux_heads"]),
                            reshoot=float(v["reshoot"]), early_scale=float(v["early_scale"]),
                            full_size_epochs=v["full_size_epochs"], frozen_blocks=v["frozen_blocks"],
                            ema_decay=float(v["ema_decay"]), fit_ruler_blend=fit_blend, **no_tta)
    except ValueError as error:  # a rule across fields (TrainConfig's own checks)
        raise ValueError(f"invalid training recipe: {error}") from None
    return model, train
