"""Behaviour checks on a trained model (the Made-With-ML pattern), run on any registered version.

Three kinds of expectation, each on real OCRE coins:
- invariance: the year barely moves when the photos are rotated within the TTA range, re-encoded as JPEG or
  made brighter or darker (how collectors' photos differ, not what dates a coin);
- minimum functionality: coins of emperors a century or more apart are dated in the right order;
- directional: the mean year of each emperor's coins follows the order of their reigns across eras.

`check_behaviour` returns a report with every measured value and the failed expectations; `pytest
tests/model/test_trained_behaviour.py --model-uri models:/coinyear@staging` runs it as tests, and the retraining
gate can reject a candidate that fails it.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from coinyear.data import decode_side, read_manifest
from coinyear.pyfunc import decode_pair, pair_tensors
from coinyear.rulers import portrait_labels

# Emperors whose portraits are common in OCRE, in the order of their reigns, with a century or more between the
# first and the last: the minimum-functionality pairs are (Augustus, Hadrian) and (Augustus, Trajan).
ERAS = ("Augustus", "Nero", "Vespasian", "Domitian", "Trajan", "Hadrian")
FAR_APART = (("Augustus", "Trajan"), ("Augustus", "Hadrian"), ("Nero", "Hadrian"))

Perturbation = Callable[[Image.Image], bytes]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _rotated(angle: float) -> Perturbation:
    def rotate(image: Image.Image) -> bytes:
        corner = image.convert("RGB").getpixel((0, 0))  # fill with the photo's own background, not black
        return _png(image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=corner))
    return rotate


def _brightness(factor: float) -> Perturbation:
    return lambda image: _png(ImageEnhance.Brightness(image).enhance(factor))


PERTURBATIONS: dict[str, Perturbation] = {
    "rotate_+8deg": _rotated(8.0),
    "rotate_-8deg": _rotated(-8.0),
    "jpeg_q50": lambda image: _jpeg(image, 50),
    "brighter_15pct": _brightness(1.15),
    "darker_15pct": _brightness(0.85),
}


@dataclass
class BehaviourReport:
    """Measured values and failed expectations (empty `failures` = the model behaves)."""

    invariance: dict[str, dict[str, float]] = field(default_factory=dict)  # perturbation -> mean/max |Δ year|
    era_means: dict[str, float] = field(default_factory=dict)  # emperor -> mean predicted year of his cases
    failed: dict[str, str] = field(default_factory=dict)  # check name -> what went wrong

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def failures(self) -> list[str]:
        return list(self.failed.values())

    def regressions(self, baseline: BehaviourReport) -> dict[str, str]:
        """The checks this model fails that `baseline` (e.g. production) passes."""
        return {name: message for name, message in self.failed.items() if name not in baseline.failed}

    def to_dict(self) -> dict:
        return {"passed": self.passed, "invariance": self.invariance, "era_means": self.era_means,
                "failed": self.failed}


def behaviour_cases(data_dir: str | Path, per_emperor: int = 4) -> pd.DataFrame:
    """Well-known coins: for each emperor in ERAS, the `per_emperor` coins dated nearest his coins' median year
    (typical, not edge, issues). Deterministic for a given manifest; ValueError when an emperor has no coin."""
    rows = read_manifest(data_dir, check_images=False).rows
    if "obverse_desc" not in rows.columns:
        raise ValueError(f"the manifest in {data_dir} has no obverse_desc column: no portrait to pick cases by")
    rows = rows.assign(portrait=portrait_labels(rows["obverse_desc"]).to_numpy())
    picked = []
    for name in ERAS:
        coins = rows[rows["portrait"] == name]
        if coins.empty:
            raise ValueError(f"no coin with a portrait of {name} in {data_dir}: the behaviour cases need each of "
                             f"{', '.join(ERAS)}")
        distance = (coins["year"] - coins["year"].median()).abs()
        picked.append(coins.assign(distance=distance).sort_values(["distance", "coin_id"]).head(per_emperor))
    return pd.concat(picked, ignore_index=True)


def _years(python_model, pairs: list[tuple[bytes, bytes]]) -> np.ndarray:
    arrays = [decode_pair(front, back, python_model.size, python_model.grayscale) for front, back in pairs]
    return python_model.score_tensors(*pair_tensors(arrays))["year"]


def check_behaviour(python_model, cases: pd.DataFrame, tolerance_years: float = 5.0,
                    min_era_gap_years: float = 30.0) -> BehaviourReport:
    """Run every expectation on `cases` (from `behaviour_cases`) with a loaded `CoinYearModel`.

    Invariance fails when the mean |Δ year| over the cases exceeds `tolerance_years`; minimum functionality
    fails when an emperor of FAR_APART is not dated at least `min_era_gap_years` after the earlier one;
    direction fails when the mean years of ERAS are out of order by more than `tolerance_years`.
    """
    sides = [(decode_side(front, "front"), decode_side(back, "back"))
             for front, back in zip(cases["obverse_path"], cases["reverse_path"])]
    base = _years(python_model, [(_png(front), _png(back)) for front, back in sides])
    report = BehaviourReport()
    for name, perturb in PERTURBATIONS.items():
        moved = np.abs(_years(python_model, [(perturb(front), perturb(back)) for front, back in sides]) - base)
        report.invariance[name] = {"mean_abs_change": float(moved.mean()), "max_abs_change": float(moved.max())}
        if moved.mean() > tolerance_years:
            report.failed[f"invariance:{name}"] = (
                f"invariance {name}: the year moves {moved.mean():.1f} years on average "
                f"(tolerance {tolerance_years:g})")
    report.era_means = {name: float(base[(cases["portrait"] == name).to_numpy()].mean()) for name in ERAS}
    for early, late in FAR_APART:
        gap = report.era_means[late] - report.era_means[early]
        if gap < min_era_gap_years:
            report.failed[f"minimum:{early}-{late}"] = (
                f"minimum functionality: {late}'s coins dated only {gap:.1f} years after {early}'s "
                f"(at least {min_era_gap_years:g} expected)")
    for earlier, later in itertools.pairwise(ERAS):
        if report.era_means[later] < report.era_means[earlier] - tolerance_years:
            report.failed[f"direction:{earlier}-{later}"] = (
                f"direction: {later}'s coins dated before {earlier}'s "
                f"({report.era_means[later]:.1f} < {report.era_means[earlier]:.1f})")
    return report
