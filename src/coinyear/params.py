"""Scoring parameters: what a scoring call may ask for beyond the years (`interval`, `neighbours`, `portraits`),
parsed and checked in one place.

The packaged model (`coinyear.pyfunc`, for MLflow's and Databricks' scoring servers) and the gateway's request
parser (`coinyear.serve.wire`, then `coinyear.serve.local` for what the served version can give) both take them:
`parse_params` is their one parser, `unsupported` their one check against what a model version was logged with,
and each turns the ValueError or the reason into its own error (InvalidCoinInput, or a 400 ApiError). This module
sits below them and imports nothing of coinyear.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MAX_NEIGHBOURS = 20  # nearest training coins per answer
MAX_PORTRAITS = 5  # likeliest portraits per answer


def whole_count(name: str, value, maximum: int) -> int:
    """A count parameter `name`: 0 (none) or a whole number 1..`maximum`; ValueError with what is accepted
    otherwise (`neighbours`, `portraits`)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be a whole number from 0 (none) to {maximum}, got {value!r}")
    return int(value)


def neighbour_count(value) -> int:
    """0 (no neighbours) or a whole number 1..MAX_NEIGHBOURS; ValueError with what is accepted otherwise."""
    return whole_count("neighbours", value, MAX_NEIGHBOURS)


def portrait_count(value) -> int:
    """0 (no portraits) or a whole number 1..MAX_PORTRAITS; ValueError with what is accepted otherwise."""
    return whole_count("portraits", value, MAX_PORTRAITS)


def interval_level(value) -> float:
    """0.0 (no interval: absent, null or 0) or a coverage level strictly between 0 and 1; ValueError otherwise."""
    if not value:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 < value < 1:
        raise ValueError("interval must be a coverage level between 0 and 1 (e.g. 0.9)")
    return float(value)


@dataclass(frozen=True)
class ScoringParams:
    """What one scoring call asks for besides the years: a coverage level (0: none) and how many nearest training
    coins and likeliest portraits per coin (0: none)."""

    interval: float = 0.0
    neighbours: int = 0
    portraits: int = 0


def parse_params(params: Mapping) -> ScoringParams:
    """`interval`, `neighbours` and `portraits` of a scoring call's params, each absent or null for none;
    ValueError naming the first that is not acceptable (in that order)."""
    def count(name: str):
        return 0 if params.get(name) is None else params[name]

    return ScoringParams(interval_level(params.get("interval")), neighbour_count(count("neighbours")),
                         portrait_count(count("portraits")))


def unsupported(asked: ScoringParams, *, intervals: bool, references: bool, portraits: bool) -> str | None:
    """Why a model version cannot answer `asked`, given whether it was logged with interval calibration, with its
    reference coins and with a named portrait head: the end of a sentence about the version (the first parameter
    it cannot give, in the order interval, neighbours, portraits); None when it can answer."""
    if asked.interval and not intervals:
        return "was logged without interval calibration; call it without `interval`"
    if asked.neighbours and not references:
        return "was logged without its reference coins; call it without `neighbours`"
    if asked.portraits and not portraits:
        return "was trained without a named portrait head; call it without `portraits`"
    return None
