"""Calibration stage: the post-hoc levers of a trained network, fitted on the validation coin types.

None of them changes a weight: they are choices on what the heads already say, so one pass of the trained model
over the validation coins (`model.infer(with_heads=True)`: the regression head's years and the portrait head's
logits per member and rotation) is all they cost. Training fits them at its end (`train.train_on_manifest`) and
benchmarks/levers.py applies the same functions to a model already registered. They are:

* the portrait head's temperature (`ModelConfig.portrait_temperature`): the one that minimises the negative
  log-likelihood of the catalogue portraits of the validation coins, on the probabilities averaged over the
  rotations (what the served answer and the ruler mixture read);
* where the ruler mixture is taken (`ModelConfig.ruler_pooled`: on each rotation, or once on the averaged
  probabilities) and, when the recipe says `fit` (`Settings.ruler_blend`), its weight in the served year
  (`ModelConfig.ruler_blend`): the pair with the lowest validation MAE (else the recipe's weight, fixed);
* what the 90% range's conformal scores are divided by (`quality.Conformal.by`: the rotation spread, the portrait
  mixture's dispersion, or both): the one whose calibrated ranges are narrowest on the validation coins;
* the portrait flag (`quality.FeatureDistance.portrait_floor`): the top portrait probability below which a coin
  is flagged out of distribution, the `rate` quantile of the validation coins' (so that share of coins of unseen
  in-span types are flagged by it), and the view flag (`disagreement_ceiling`): the portrait head's disagreement
  between the rotated views above which a coin is flagged, likewise.

Every served year is computed by `model.blend_rulers`, here as in the network and its ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from coinyear.model import ModelConfig, blend_rulers, rotation_spread, view_disagreement
from coinyear.quality import SCALES, Conformal

TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 8.0, 31))
# never the ruler mixture alone: pooled, it does not move with a rotation, and the rotation spread (a range
# scale and an out-of-distribution signal) would carry nothing
BLENDS = tuple(round(0.1 * i, 1) for i in range(10))
LEVEL = 0.9  # the range level the scale is chosen for (the one every report states)


@dataclass
class Heads:
    """One model's raw head outputs on some coins, with their labels: `regression` [N, M, A], `logits`
    [N, M, A, C], `years` [M, C] (each member's portrait years), `labels` [N] (portrait class, -100 unknown),
    `year_from`, `year_to` [N]."""

    regression: np.ndarray
    logits: np.ndarray
    years: np.ndarray
    labels: np.ndarray
    year_from: np.ndarray
    year_to: np.ndarray

    def served(self, config: ModelConfig) -> dict[str, np.ndarray]:
        """What the network serves for these coins under `config`: year, spread, averaged portraits and the
        views' disagreement."""
        logits = torch.as_tensor(self.logits, dtype=torch.float32)
        samples, portraits = blend_rulers(torch.as_tensor(self.regression, dtype=torch.float32), logits,
                                          torch.as_tensor(self.years, dtype=torch.float32), config)
        assert portraits is not None, "a Heads always has logits"
        return {"year": samples.mean(dim=(1, 2)).numpy().astype(float),
                "spread": rotation_spread(samples).numpy().astype(float), "portraits": portraits.numpy(),
                "disagreement": view_disagreement(logits, config).numpy().astype(float)}


@dataclass
class Levers:
    """The fitted choices and the validation figures they were chosen on."""

    temperature: float = 1.0
    ruler_pooled: bool = False
    ruler_blend: float = 0.5
    validation: dict[str, float] = field(default_factory=dict)

    def apply(self, config: ModelConfig) -> None:
        """Set the network's levers in place (every member of a model shares its config)."""
        config.portrait_temperature = self.temperature
        config.ruler_pooled = self.ruler_pooled
        config.ruler_blend = self.ruler_blend


def _mae(parts: list[Heads], config: ModelConfig) -> float:
    errors = []
    for part in parts:
        year = part.served(config)["year"]
        errors.append(np.abs(year - (part.year_from + part.year_to) / 2))
    return float(np.mean(np.concatenate(errors)))


def _nll(parts: list[Heads], config: ModelConfig) -> float:
    losses = []
    for part in parts:
        known = part.labels >= 0
        if known.any():
            portraits = part.served(config)["portraits"][known]
            losses.append(-np.log(np.maximum(portraits[np.arange(len(portraits)), part.labels[known]], 1e-12)))
    return float(np.mean(np.concatenate(losses))) if losses else float("nan")


def fit_levers(parts: list[Heads], config: ModelConfig, temperatures=TEMPERATURES, blends=BLENDS) -> Levers:
    """The temperature (lowest portrait NLL), then the ruler mixture's pooling and weight (lowest MAE) on the
    validation coins of `parts` (one per fold model, each with its own portrait years); `config` is the
    model's as trained (its `ruler_statistic` is kept)."""
    base = replace(config, ruler_blend=0.0)  # the portraits alone: the temperature does not depend on the blend
    nll = {t: _nll(parts, replace(base, portrait_temperature=t)) for t in temperatures}
    if all(np.isnan(v) for v in nll.values()):
        temperature = config.portrait_temperature
    else:
        temperature = min(nll, key=lambda t: (nll[t], abs(np.log(t))))
    scored = {(pooled, w): _mae(parts, replace(config, portrait_temperature=temperature, ruler_pooled=pooled,
                                                ruler_blend=w))
              for pooled in (False, True) for w in blends}
    pooled, blend = min(scored, key=lambda key: (scored[key], key))
    as_trained = _mae(parts, config)
    return Levers(temperature, pooled, blend,
                  {"val_mae_as_trained": as_trained, "val_mae_levers": scored[(pooled, blend)],
                   "val_portrait_nll_as_trained": _nll(parts, replace(base, portrait_temperature=1.0)),
                   "val_portrait_nll_levers": nll.get(temperature, float("nan"))})


def fit_ranges(scored: dict[str, np.ndarray], portrait_years, year_from, year_to,
               scales: tuple[str, ...] = SCALES, level: float = LEVEL) -> tuple[Conformal, dict[str, float]]:
    """The conformal calibration on the validation coins' served answers (`year`, `spread`, `portraits`)
    whose scale gives the narrowest median range at `level`, and each scale's median width."""
    if "portraits" not in scored:
        scales = ("spread",)
    widths, fitted = {}, {}
    for by in scales:
        difficulty = Conformal.difficulty(scored, portrait_years, by)
        fitted[by] = Conformal.fit(scored["year"], year_from, year_to, difficulty, by=by)
        low, high = fitted[by].interval(scored["year"], level, difficulty)
        widths[by] = float(np.median(high - low))
    best = min(widths, key=lambda by: (widths[by], scales.index(by)))
    return fitted[best], {f"val_interval90_width_{by}": width for by, width in widths.items()}


def disagreement_ceiling(disagreement, rate: float) -> float:
    """The view disagreement (`model.view_disagreement`) above which `rate` of these (validation) coins lie: the
    view flag's threshold at that false-alarm rate on unseen in-span types (0: off)."""
    if rate <= 0 or len(disagreement) == 0:
        return 0.0
    return float(np.quantile(np.asarray(disagreement, float), 1 - rate))


def portrait_floor(portraits, rate: float) -> float:
    """The top portrait probability below which `rate` of these (validation) coins fall: the portrait flag's
    threshold at that false-alarm rate on unseen in-span types (0: off)."""
    if rate <= 0 or len(portraits) == 0:
        return 0.0
    return float(np.quantile(np.asarray(portraits, float).max(axis=1), rate))
