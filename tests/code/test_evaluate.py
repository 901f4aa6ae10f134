"""Metric functions on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from coinyear.evaluate import (
    decade_confusion,
    decade_of,
    per_decade_mae,
    regression_metrics,
    summarize_folds,
    year_label,
)


def test_point_and_range_metrics():
    metrics = regression_metrics(predicted=[10, 20, 100], year_from=[0, 18, 40], year_to=[10, 22, 60])
    # midpoints 5, 20, 50: errors 5, 0, 50
    assert metrics["mae"] == pytest.approx(55 / 3)
    assert metrics["rmse"] == pytest.approx(np.sqrt((25 + 0 + 2500) / 3))
    assert metrics["within_5y"] == pytest.approx(2 / 3)
    assert metrics["within_10y"] == pytest.approx(2 / 3)
    assert metrics["within_50y"] == pytest.approx(1.0)
    # inside [0, 10] and [18, 22]: no error; 100 is 40 years past 60
    assert metrics["range_mae"] == pytest.approx(40 / 3)


def test_r2_is_one_for_perfect_and_zero_for_the_mean():
    assert regression_metrics([1, 2, 3], [1, 2, 3], [1, 2, 3])["r2"] == pytest.approx(1.0)
    assert regression_metrics([2, 2, 2], [1, 2, 3], [1, 2, 3])["r2"] == pytest.approx(0.0)


def test_decades_floor_bc_years_apart_from_ad():
    assert list(decade_of([73, 70, 9, -1, -27])) == [70, 70, 0, -10, -30]


def test_per_decade_and_confusion():
    table = per_decade_mae([70, 80, 75], [70, 70, 100], [70, 70, 100])
    assert table.set_index("decade").loc[70, "mae"] == pytest.approx(5.0)
    assert table.set_index("decade").loc[100, "count"] == 1
    confusion = decade_confusion([71, 95], [70, 100], [70, 100])
    assert confusion.loc[70, 70] == 1 and confusion.loc[100, 90] == 1
    assert confusion.to_numpy().sum() == 2


def test_confusion_of_a_diverged_model_stays_small():
    confusion = decade_confusion([1e12, -1e12, float("nan")], [70, 80, 90], [70, 80, 90])
    assert confusion.shape[0] <= 30 and confusion.to_numpy().sum() == 3
    assert confusion.loc[70].sum() == 1


@pytest.mark.parametrize("year,label", [(73, "AD 73"), (-27, "27 BC"), (1, "AD 1"), (-1, "1 BC"), (72.6, "AD 73")])
def test_year_label(year, label):
    assert year_label(year) == label


def test_summarize_folds():
    summary = summarize_folds([{"mae": 2.0}, {"mae": 4.0}])
    assert summary == {"cv_mae_mean": 3.0, "cv_mae_std": 1.0}
