"""Scoring parameters: the counts a scoring call may ask for (`neighbours`, `portraits`), checked in one place.

The packaged model (`coinyear.pyfunc`, for MLflow's and Databricks' scoring servers), the evidence it returns
(`coinyear.neighbours`) and the gateway's request parser (`coinyear.serve.wire`) all take them; this module sits
below all three and imports nothing of coinyear, so none of them imports another just to check a number.
"""

from __future__ import annotations

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
