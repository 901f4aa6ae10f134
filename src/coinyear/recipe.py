"""The training recipe, built in one place from Settings: `coinyear train` and the retraining job both call
`recipe_from_settings`, so a model trained by hand and one trained by the job follow the same recipe.

A value given explicitly (a command-line flag) overrides the setting; `None` means "not given". The rules are
the settings' own (`config.Settings`: a COINYEAR_* variable out of bounds is refused when the settings are read),
applied here to each flag too; the rules that span fields are TrainConfig's. An invalid value (`--lr 0`,
`--ensemble` without folds, ...) is a clear error, never a silent default.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import TypeAdapter, ValidationError

from coinyear.config import Settings

if TYPE_CHECKING:  # torch is imported only when a recipe is built
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig

RECIPE_FIELDS = ("backbone", "mode", "proj_dim", "grayscale", "image_size", "pretrained", "epochs", "batch_size",
                 "lr", "loss", "folds", "seed", "limit", "horizontal_flip", "tta", "ensemble", "aux_weight",
                 "aux_heads", "reshoot", "ruler_statistic")


@cache
def _setting_rule(name: str) -> TypeAdapter:
    """The validator of one setting: its type with its constraints (bounds, choices, validators)."""
    info = Settings.model_fields[name]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])  # type: ignore[arg-type]


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
    from coinyear.model import ModelConfig
    from coinyear.train import TrainConfig

    v = recipe_values(settings, **overrides)
    no_tta: dict[str, Any] = {} if v["tta"] else {"tta_angles": ()}
    model = ModelConfig(backbone=v["backbone"], mode=v["mode"], proj_dim=v["proj_dim"], grayscale=v["grayscale"],
                        image_size=v["image_size"], pretrained=v["pretrained"], ruler_statistic=v["ruler_statistic"])
    try:
        train = TrainConfig(model=model, epochs=v["epochs"], batch_size=v["batch_size"], lr=float(v["lr"]),
                            loss=v["loss"], folds=v["folds"], seed=v["seed"], limit=v["limit"],
                            horizontal_flip=v["horizontal_flip"], ensemble=v["ensemble"],
                            aux_weight=float(v["aux_weight"]), aux_heads=tuple(v["aux_heads"]),
                            reshoot=float(v["reshoot"]), **no_tta)
    except ValueError as error:  # a rule across fields (TrainConfig's own checks)
        raise ValueError(f"invalid training recipe: {error}") from None
    return model, train
