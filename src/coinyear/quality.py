"""Quality stage: calibrated date ranges (conformal prediction) and the out-of-distribution flag.

Both are fitted on coins the model did not train on (out-of-fold or validation predictions) and travel with
the logged model as two small files, so every server answers with the same ranges and the same flag. They are
choices, so they are made on validation coins and never on the test coin types (`data.split_test`), which are
kept out of the OOD reference too: the test types' coverage and flag share (`test_interval90_coverage`,
`test_ood_flagged`) then measure them honestly. With one validation hold-out the calibration coins also chose the
early-stopping epoch, which makes their errors a little small and the ranges a little narrow: the test coverage
shows by how much.

* `Conformal` turns a predicted year into an interval with a stated coverage. Scores are the absolute
  errors against the label midpoint, optionally divided by a per-coin difficulty (`Conformal.by`: the
  disagreement of the rotated copies and ensemble members, the portrait mixture's dispersion in time, or both;
  chosen on the validation coins by `calibrate.fit_ranges`), so hard coins get wider ranges. With K-fold out-of-fold
  predictions this is CV+ in its simple form (Barber et al. 2021); with a hold-out it is split conformal.
* `FeatureDistance` scores how far a coin's backbone features lie from the training coins' (mean cosine
  distance to the k nearest, after centring on the training mean; Sun et al. 2022) and flags scores above a
  quantile of the training coins' own scores with their coin type left out, or features far weaker than any
  training coin's (a featureless photo). Its era-shift score (`FeatureDistance.shift_score`) is the signal chosen
  on a coin of a ruler the model never saw (benchmarks/era_shift.py): the mean of two ranks among the
  validation coins', the same distance in the fused embedding the heads read and the portrait head's
  disagreement between the rotated views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coinyear.years import MAX_YEAR, MIN_YEAR

CONFORMAL_FILE = "conformal.json"
OOD_FILE = "ood.npz"


# ------------------------------------------------------------------------------------------- conformal
# What a scaled calibration divides the errors by, per coin (`Conformal.difficulty`): the rotation spread (models
# logged before), the portrait mixture's dispersion (`mixture_dispersion`), or their sum.
SCALES = ("spread", "mixture", "spread+mixture")


def mixture_dispersion(portraits, years) -> np.ndarray:
    """How far the portrait mixture spreads in time, per coin: the expected distance, under the portrait head's
    probabilities [B, C], of the classes' `years` [C] from the mixture's weighted median (0 when the head is sure
    of one portrait; the years of two rival reigns apart when it hesitates between them)."""
    portraits, years = np.asarray(portraits, float), np.asarray(years, float)
    order = np.argsort(years, kind="stable")
    cumulative = np.cumsum(portraits[:, order], axis=1)
    index = np.minimum((cumulative < 0.5 * cumulative[:, -1:]).sum(axis=1), len(years) - 1)
    median = years[order][index]
    return (portraits * np.abs(years[None, :] - median[:, None])).sum(axis=1)


@dataclass
class Conformal:
    """Sorted nonconformity scores of calibration coins; `scaled` when they are divided by a per-coin difficulty,
    which `by` names (one of SCALES)."""

    scores: np.ndarray
    scaled: bool = False
    spread_floor: float = 1.0  # years: keeps a coin whose samples agree from getting a zero-width range
    by: str = "spread"

    @classmethod
    def fit(cls, predicted, year_from, year_to, spread=None, spread_floor: float | None = None,
            by: str = "spread") -> Conformal:
        """Calibrated on these coins' errors; divided by `spread` (their difficulty of kind `by`) when given,
        floored at its median unless `spread_floor` is given."""
        if by not in SCALES:
            raise ValueError(f"a conformal scale is one of {', '.join(SCALES)}, not {by!r}")
        midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
        residual = np.abs(np.asarray(predicted, float) - midpoint)
        if spread is None:
            return cls(np.sort(residual))
        spread = np.asarray(spread, float)
        floor = float(np.median(spread)) if spread_floor is None else float(spread_floor)
        floor = max(floor, 1e-3)
        return cls(np.sort(residual / np.maximum(spread, floor)), scaled=True, spread_floor=floor, by=by)

    @staticmethod
    def difficulty(scored: dict, portrait_years, by: str) -> np.ndarray:
        """Per coin the difficulty of kind `by` (SCALES) from a scoring answer (`spread` and, for the mixture,
        the averaged `portraits` [B, C], whose classes' years are `portrait_years`)."""
        spread = np.asarray(scored["spread"], float)
        if by == "spread":
            return spread
        dispersion = mixture_dispersion(scored["portraits"], portrait_years)
        return dispersion if by == "mixture" else spread + dispersion

    def ranges(self, scored: dict, level: float, portrait_years=None) -> tuple[np.ndarray, np.ndarray]:
        """`interval` of a scoring answer (`year`, `spread`, and `portraits` for a mixture scale): what every
        served range is computed with."""
        scale = self.difficulty(scored, portrait_years, self.by) if self.scaled else None
        return self.interval(scored["year"], level, scale)

    def quantile(self, level: float) -> float:
        """The conformal quantile: the ceil((n+1)·level)-th smallest score (finite-sample valid).

        Infinite when that rank exceeds the n calibration scores: so few coins cannot promise the level, and
        the largest score would under-cover."""
        if not 0 < level < 1:
            raise ValueError(f"interval level must be between 0 and 1, got {level}")
        n = len(self.scores)
        rank = int(np.ceil((n + 1) * level))
        return float("inf") if rank > n else float(self.scores[rank - 1])

    def interval(self, predicted, level: float, spread=None) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per coin, clipped to the span of coinage (an unbounded range reads as "any year")."""
        predicted = np.asarray(predicted, float)
        half = self.quantile(level) * self._scale(predicted, spread)
        return np.maximum(predicted - half, MIN_YEAR), np.minimum(predicted + half, MAX_YEAR)

    def _scale(self, predicted: np.ndarray, spread) -> np.ndarray:
        if not self.scaled:
            return np.ones_like(predicted)
        if spread is None:
            raise ValueError("this calibration divides by the prediction spread: pass `spread`")
        return np.maximum(np.asarray(spread, float), self.spread_floor)

    def to_dict(self) -> dict:
        return {"scores": [round(float(s), 4) for s in self.scores], "scaled": self.scaled,
                "spread_floor": self.spread_floor, "by": self.by}

    @classmethod
    def from_dict(cls, data: dict) -> Conformal:
        # files written before `by` divide by the rotation spread
        return cls(np.asarray(data["scores"], float), bool(data["scaled"]), float(data["spread_floor"]),
                   str(data.get("by", "spread")))


def cross_conformal(predicted, year_from, year_to, fold, level: float = 0.9, spread=None):
    """Honest out-of-fold intervals: each fold's coins get the interval calibrated on the *other* folds.

    Returns (low, high). Coverage measured on these is what a new coin type can expect, since folds are
    grouped by coin type.
    """
    predicted, year_from, year_to, fold = (np.asarray(a) for a in (predicted, year_from, year_to, fold))
    spread = None if spread is None else np.asarray(spread, float)
    low, high = np.empty(len(predicted)), np.empty(len(predicted))
    for k in np.unique(fold):
        here, rest = fold == k, fold != k
        calibration = Conformal.fit(predicted[rest], year_from[rest], year_to[rest],
                                    None if spread is None else spread[rest])
        low[here], high[here] = calibration.interval(predicted[here], level,
                                                     None if spread is None else spread[here])
    return low, high


def interval_metrics(low, high, year_from, year_to) -> dict[str, float]:
    """Coverage (label midpoint inside the interval) and width of intervals."""
    midpoint = (np.asarray(year_from, float) + np.asarray(year_to, float)) / 2
    low, high = np.asarray(low, float), np.asarray(high, float)
    width = high - low
    return {"coverage": float(np.mean((low <= midpoint) & (midpoint <= high))),
            "median_width": float(np.median(width)), "mean_width": float(np.mean(width))}


# ---------------------------------------------------------------------------------- out of distribution
def _unit(features) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _split(features, sides: int) -> list[np.ndarray]:
    return np.split(np.asarray(features, np.float32), sides, axis=1)


def _rank(sorted_reference: np.ndarray, values) -> np.ndarray:
    """Each value's rank among the (sorted) reference values, in [0, 1]: the empirical CDF."""
    return np.searchsorted(sorted_reference, np.asarray(values, float), side="right") / len(sorted_reference)


def nearest_mean(distance: np.ndarray, k: int) -> np.ndarray:
    """The mean of each row's k smallest distances ([B, N] -> [B]); a row with fewer than k finite distances
    counts the rest as 2 (opposite directions)."""
    k = min(k, distance.shape[1])
    nearest = np.partition(distance, k - 1, axis=1)[:, :k]
    return np.where(np.isfinite(nearest), nearest, 2.0).mean(axis=1)


def leave_type_out(distance: np.ndarray, groups, reference_groups) -> np.ndarray:
    """`distance` [B, N] with each row's distances to the reference rows of its own coin type set infinite (a
    coin of a type nobody has seen is scored so)."""
    codes = np.unique(np.r_[np.asarray(groups, str), np.asarray(reference_groups, str)], return_inverse=True)[1]
    codes = codes.ravel()
    mine, theirs = codes[:len(groups)], codes[len(groups):]
    return np.where(mine[:, None] == theirs[None, :], np.inf, distance)


@dataclass
class FeatureDistance:
    """Out-of-distribution test on a coin's backbone features (both sides side by side, [N, sides*D]).

    Two signals, either one flags the coin:
    * direction: the mean cosine distance to the k nearest training coins (each side's features unit-length,
      then centred on the training mean; backbone features are non-negative after ReLU, so uncentred they all
      point roughly the same way) above `threshold`;
    * size: a side whose feature vector is far shorter than any training coin's (below `norm_floor`): a
      featureless photo, such as a blank card, gives an almost-zero vector whose direction means nothing.
    """

    reference: np.ndarray  # [N, sides*D] unit-length, centred training features
    center: np.ndarray  # [sides*D]
    threshold: float = float("inf")
    norm_floor: float = 0.0
    k: int = 10
    sides: int = 2
    # A third signal: the portrait head's top probability (averaged over the rotation TTA) below this flags the
    # coin (`calibrate.fit_levers` sets it on the validation types at a stated false-alarm rate; 0 = off, files
    # written before).
    portrait_floor: float = 0.0
    # A fourth: the portrait head's disagreement between the rotated views (`model.view_disagreement`) above this
    # flags the coin (set on the validation types like the floor; 0 = off, files written before).
    disagreement_ceiling: float = 0.0
    # A fifth, the era-shift score (`shift_score`): the reference coins' fused embeddings (member 0's, unit-length
    # and centred, [N, E]) and their mean; the validation coins' sorted values of the score's two parts [2, V]
    # (the embedding distance, their own type left out, and the view disagreement), which rank a coin's; the
    # mean rank above `shift_ceiling` flags it (0 = off: files written before, or no validation coins).
    embedding_reference: np.ndarray | None = None
    embedding_center: np.ndarray | None = None
    shift_scale: np.ndarray | None = None
    shift_ceiling: float = 0.0

    @classmethod
    def fit(cls, features, groups, k: int = 10, quantile: float = 0.99, sides: int = 2,
            calibration=None) -> FeatureDistance:
        """Reference = the coins given. Threshold = the `quantile` of their scores with their own coin type
        left out (an unseen type is what a genuine new coin looks like), so about 1 - quantile of genuine
        coins are flagged. `calibration` (a boolean mask or row index) limits the threshold to the scores of
        those rows: coins the model never trained on (the validation hold-out), whose features look like a new
        coin's; a trained coin's features are more particular, so scored alone they set the threshold too
        high (benchmarks/era_shift.py: no hold-out coin flagged at 0.99). Norm floor = half the 1% quantile
        of the coins' shorter side."""
        directions = cls._directions(features, sides)
        center = directions.mean(axis=0)
        norms = np.stack([np.linalg.norm(side, axis=1) for side in _split(features, sides)], axis=1).min(axis=1)
        detector = cls(_unit(directions - center), center, norm_floor=0.5 * float(np.quantile(norms, 0.01)),
                       k=max(1, min(k, len(directions) - 1)), sides=sides)
        scores = detector.score(features, groups=groups)
        if calibration is not None:
            scores = scores[np.asarray(calibration)]
        detector.threshold = float(np.quantile(scores, quantile))
        return detector

    @staticmethod
    def _directions(features, sides: int) -> np.ndarray:
        return np.concatenate([_unit(side) for side in _split(features, sides)], axis=1) / sides ** 0.5

    def distances(self, features) -> np.ndarray:
        """Cosine distance of each row of `features` to every reference row: [B, N] (0 = same direction).

        One product with the whole reference (N x sides*D floats, ~29 MB for the OCRE coins): memory-bound, about
        12 ms per call on 2 cores, so a caller that needs both `flag` and `nearest` computes it once for both."""
        return 1 - _unit(self._directions(features, self.sides) - self.center) @ self.reference.T

    def nearest(self, features, k: int, distance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k reference rows nearest to each row of `features` by the distance the flag uses: (row indices,
        distances), both [B, k], nearest first. `distance`: `distances(features)` when already computed."""
        distance = self.distances(features) if distance is None else distance
        k = min(k, distance.shape[1])
        index = np.argpartition(distance, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(distance, index, axis=1), axis=1, kind="stable")
        index = np.take_along_axis(index, order, axis=1)
        return index, np.take_along_axis(distance, index, axis=1)

    def score(self, features, chunk: int = 512, groups=None, reference_groups=None) -> np.ndarray:
        """Direction scores of `features`. With `groups` (each row's coin type) a row is scored without the
        reference rows of its own type, as a coin of an unseen type would be: `reference_groups` are the
        reference rows' types, by default `groups` itself (when `features` are the reference rows)."""
        return self._chunked(self.distances, features, chunk, groups, reference_groups)

    def _chunked(self, distances, rows, chunk: int, groups, reference_groups) -> np.ndarray:
        rows = np.asarray(rows, np.float32)
        reference_groups = groups if reference_groups is None else reference_groups
        out = []
        for start in range(0, len(rows), chunk):
            distance = distances(rows[start:start + chunk])
            if groups is not None:
                distance = leave_type_out(distance, np.asarray(groups)[start:start + chunk], reference_groups)
            out.append(nearest_mean(distance, self.k))
        return np.concatenate(out) if out else np.zeros(0)

    # --------------------------------------------------------------------------------- the era-shift score
    def fit_shift(self, embeddings, groups, calibration, disagreement, rate: float) -> None:
        """Sets the era-shift score from the reference coins' fused `embeddings` [N, E] (the same rows as
        `reference`, of coin types `groups`): the rows `calibration` (coins the model never trained on, whose
        view `disagreement` is given in the same order) give each part's scale, and the score's ceiling is its
        1 - `rate` quantile over them (so `rate` of coins of unseen in-span types are flagged by it; 0: off)."""
        embeddings = np.asarray(embeddings, np.float32)
        self.embedding_center = embeddings.mean(axis=0)
        self.embedding_reference = _unit(embeddings - self.embedding_center)
        calibration = np.asarray(calibration)
        distance = self.embedding_score(embeddings[calibration], groups=np.asarray(groups)[calibration],
                                        reference_groups=groups)
        self.shift_scale = np.stack([np.sort(distance), np.sort(np.asarray(disagreement, float))])
        score = self._mean_rank(distance, disagreement)
        self.shift_ceiling = float(np.quantile(score, 1 - rate)) if rate > 0 else 0.0

    def embedding_score(self, embedding, chunk: int = 512, groups=None, reference_groups=None) -> np.ndarray:
        """The first part of the era-shift score: the mean cosine distance of each fused embedding (centred on
        the reference coins') to its k nearest reference coins'; `groups` as in `score`."""
        assert self.embedding_reference is not None, "fit_shift sets the embedding reference"
        reference, center = self.embedding_reference, self.embedding_center
        return self._chunked(lambda rows: 1 - _unit(rows - center) @ reference.T, embedding, chunk, groups,
                             reference_groups)

    def shift_score(self, embedding, disagreement, groups=None, reference_groups=None) -> np.ndarray:
        """The era-shift score in [0, 1] per coin: the mean of the ranks of its embedding distance
        (`embedding_score`) and its view disagreement among the validation coins' (higher = less like them)."""
        return self._mean_rank(self.embedding_score(embedding, groups=groups, reference_groups=reference_groups),
                               disagreement)

    def _mean_rank(self, distance, disagreement) -> np.ndarray:
        assert self.shift_scale is not None, "fit_shift sets the scales"
        return (_rank(self.shift_scale[0], distance) + _rank(self.shift_scale[1], disagreement)) / 2

    def era_shifted(self, embedding, disagreement) -> np.ndarray:
        """The era-shift signal per row: the score above `shift_ceiling` (never when off)."""
        if self.shift_ceiling <= 0 or self.shift_scale is None:
            return np.zeros(len(np.asarray(disagreement)), bool)
        return self.shift_score(embedding, disagreement) > self.shift_ceiling

    def featureless(self, features) -> np.ndarray:
        norms = np.stack([np.linalg.norm(side, axis=1) for side in _split(features, self.sides)], axis=1)
        return norms.min(axis=1) < self.norm_floor

    def flag(self, features, distance: np.ndarray | None = None, portraits=None, disagreement=None,
             embedding=None) -> np.ndarray:
        """Out of distribution per row; `distance`: `distances(features)` when already computed; `portraits`:
        the portrait head's averaged probabilities [B, C] (the `portrait_floor` signal), `disagreement` its
        disagreement between the rotated views [B] (the `disagreement_ceiling` signal) and with it the fused
        `embedding` [B, E] (the era-shift signal); None: not used."""
        score = self.score(features) if distance is None else nearest_mean(distance, self.k)
        flagged = (score > self.threshold) | self.featureless(features)
        if portraits is not None:
            flagged |= self.unsure_portrait(portraits)
        if disagreement is not None and embedding is not None:
            flagged |= self.era_shifted(embedding, disagreement)
        return flagged if disagreement is None else flagged | self.views_disagree(disagreement)

    def unsure_portrait(self, portraits) -> np.ndarray:
        """The portrait signal per row: the head's top probability below `portrait_floor` (never when off)."""
        portraits = np.asarray(portraits, float)
        if self.portrait_floor <= 0:
            return np.zeros(len(portraits), bool)
        return portraits.max(axis=1) < self.portrait_floor

    def views_disagree(self, disagreement) -> np.ndarray:
        """The view-disagreement signal per row: above `disagreement_ceiling` (never when off)."""
        disagreement = np.asarray(disagreement, float)
        if self.disagreement_ceiling <= 0:
            return np.zeros(len(disagreement), bool)
        return disagreement > self.disagreement_ceiling



# ------------------------------------------------------------------------------------------ persistence
@dataclass
class Quality:
    """What the logged model needs besides its weights: the interval calibration and the OOD detector."""

    conformal: Conformal
    ood: FeatureDistance

    def save(self, folder: str | Path) -> dict[str, str]:
        """Write both files; returns {"conformal": path, "ood": path} (the logged model's artifacts)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFORMAL_FILE).write_text(json.dumps(self.conformal.to_dict()))
        np.savez_compressed(folder / OOD_FILE, reference=self.ood.reference.astype(np.float16),
                            center=self.ood.center.astype(np.float32), threshold=np.float64(self.ood.threshold),
                            norm_floor=np.float64(self.ood.norm_floor), k=np.int64(self.ood.k),
                            sides=np.int64(self.ood.sides), portrait_floor=np.float64(self.ood.portrait_floor),
                            disagreement_ceiling=np.float64(self.ood.disagreement_ceiling),
                            **self._shift_arrays())
        return {"conformal": str(folder / CONFORMAL_FILE), "ood": str(folder / OOD_FILE)}

    def _shift_arrays(self) -> dict[str, Any]:
        ood = self.ood
        if ood.embedding_reference is None or ood.shift_scale is None or ood.embedding_center is None:
            return {}
        return {"embedding_reference": ood.embedding_reference.astype(np.float16),
                "embedding_center": ood.embedding_center.astype(np.float32),
                "shift_scale": ood.shift_scale.astype(np.float32), "shift_ceiling": np.array(ood.shift_ceiling)}

    @classmethod
    def load(cls, conformal_path: str | Path, ood_path: str | Path) -> Quality:
        conformal = Conformal.from_dict(json.loads(Path(conformal_path).read_text()))
        with np.load(ood_path) as data:
            ood = FeatureDistance(data["reference"].astype(np.float32), data["center"].astype(np.float32),
                                  float(data["threshold"]), float(data["norm_floor"]), int(data["k"]),
                                  int(data["sides"]),
                                  float(data["portrait_floor"]) if "portrait_floor" in data else 0.0,
                                  float(data["disagreement_ceiling"]) if "disagreement_ceiling" in data else 0.0)
            if "shift_scale" in data:  # files written before have no era-shift score
                ood.embedding_reference = data["embedding_reference"].astype(np.float32)
                ood.embedding_center = data["embedding_center"].astype(np.float32)
                ood.shift_scale = data["shift_scale"].astype(np.float64)
                ood.shift_ceiling = float(data["shift_ceiling"])
        return cls(conformal, ood)
