"""The training recipe, built in one place from Settings: `coinyear train` and the retraining job both call
`recipe_from_settings`, so a model trained by hand and one trained by the job follow the same recipe.

A value given explicitly (a command-line flag) overrides the setting; `None` means "not given". Every value is
checked here: an invalid one (`--lr 0`, `COINYEAR_EPOCHS=0`, ...) is a clear error, never a silent default.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from coinyear.config import Settings

if TYPE_CHECKING:  # torch is imported only when a recipe is built
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig

RECIPE_FIELDS = ("backbone", "mode", "proj_dim", "grayscale", "image_size", "pretrained", "epochs", "batch_size",
                 "lr", "loss", "folds", "seed", "limit", "horizontal_flip", "tta", "ensemble", "aux_weight",
                 "aux_heads", "reshoot", "ruler_statistic")

# (rule, check) per numeric field: what a valid value is, in words, and the test
RULES = {
    "epochs": ("an integer >= 1", lambda v: isinstance(v, int) and v >= 1),
    "batch_size": ("an integer >= 1", lambda v: isinstance(v, int) and v >= 1),
    "image_size": ("an integer >= 32", lambda v: isinstance(v, int) and v >= 32),
    "proj_dim": ("an integer >= 0 (0 = no projection)", lambda v: isinstance(v, int) and v >= 0),
    "folds": ("0 (one grouped hold-out) or an integer >= 2", lambda v: isinstance(v, int) and (v == 0 or v >= 2)),
    "lr": ("a number > 0", lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0),
    "aux_weight": ("a number >= 0", lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0),
    "reshoot": ("a number from 0 to 1", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1),
    "limit": ("none or an integer >= 1", lambda v: v is None or (isinstance(v, int) and v >= 1)),
}


def recipe_values(settings: Settings, **overrides) -> dict:
    """The recipe's values: each override that is not None, else the setting of the same name; checked."""
    unknown = set(overrides) - set(RECIPE_FIELDS)
    if unknown:
        raise TypeError(f"not a recipe field: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {name: getattr(settings, name, None) for name in RECIPE_FIELDS}
    values["limit"] = None  # the coins a run trains on are the caller's choice (a flag), not a setting
    values.update({name: value for name, value in overrides.items() if value is not None})
    for name, (rule, ok) in RULES.items():
        if not ok(values[name]):
            raise ValueError(f"invalid training recipe: {name} must be {rule}, got {values[name]!r}")
    from coinyear.train import AUX_COLUMNS

    unknown_heads = sorted(set(values["aux_heads"]) - set(AUX_COLUMNS))
    if unknown_heads:
        raise ValueError(f"invalid training recipe: aux_heads must name {', '.join(AUX_COLUMNS)}; "
                         f"got {', '.join(unknown_heads)}")
    if values["ensemble"] and values["folds"] < 2:
        raise ValueError("invalid training recipe: ensemble needs folds >= 2 (COINYEAR_FOLDS or --folds)")
    return values


def recipe_from_settings(settings: Settings, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) from `settings`, with `overrides` (None = use the setting); see the module."""
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig

    v = recipe_values(settings, **overrides)
    no_tta: dict[str, Any] = {} if v["tta"] else {"tta_angles": ()}
    model = ModelConfig(backbone=v["backbone"], mode=v["mode"], proj_dim=v["proj_dim"], grayscale=v["grayscale"],
                        image_size=v["image_size"], pretrained=v["pretrained"], ruler_statistic=v["ruler_statistic"])
    train = TrainConfig(model=model, epochs=v["epochs"], batch_size=v["batch_size"], lr=float(v["lr"]),
                        loss=v["loss"], folds=v["folds"], seed=v["seed"], limit=v["limit"],
                        horizontal_flip=v["horizontal_flip"], ensemble=v["ensemble"],
                        aux_weight=float(v["aux_weight"]), aux_heads=tuple(v["aux_heads"]), reshoot=float(v["reshoot"]),
                        **no_tta)
    return model, train
