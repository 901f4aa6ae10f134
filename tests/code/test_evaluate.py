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


# ------------------------------------------------------------------------------------------- the report
def test_portrait_metrics_count_only_coins_whose_portrait_the_model_names():
    from coinyear.evaluate import portrait_metrics

    classes = ["Augustus", "Nero", "Vespasian", "Titus", "other"]
    truth = ["Augustus", "Nero", "Titus", "Hadrian", "", "other", "Vespasian"]
    ranked = [["Augustus", "Nero", "Titus"],  # right at 1
              ["Titus", "Vespasian", "Nero"],  # right at 3
              ["Nero", "Augustus", "Vespasian"],  # not in the top 3
              ["Augustus", "Nero", "Titus"],  # Hadrian: not a class of the model, left out
              ["Augustus", "Nero", "Titus"],  # no catalogue portrait: left out
              ["other", "Nero", "Titus"],  # the pooled class names nobody: left out
              ["Vespasian", "Titus", "Nero"]]  # right at 1
    midpoint = np.array([0, 60, 80, 120, 50, 90, 70], float)
    predicted = midpoint + np.array([2, 10, 30, 99, 99, 99, 4])
    metrics = portrait_metrics(truth, ranked, predicted, midpoint - 1, midpoint + 1, classes)
    assert metrics["portrait_count"] == 4
    assert metrics["portrait_top1"] == pytest.approx(2 / 4)
    assert metrics["portrait_top3"] == pytest.approx(3 / 4)
    assert metrics["mae_portrait_right"] == pytest.approx((2 + 4) / 2)
    assert metrics["mae_portrait_wrong"] == pytest.approx((10 + 30) / 2)
    assert (metrics["portrait_right_count"], metrics["portrait_wrong_count"]) == (2, 2)


def test_portrait_metrics_without_a_named_coin_are_nan_not_zero():
    from coinyear.evaluate import portrait_metrics

    metrics = portrait_metrics(["Hadrian"], [["Augustus"]], [10.0], [0], [0], ["Augustus", "other"])
    assert metrics["portrait_count"] == 0 and np.isnan(metrics["portrait_top1"])
    assert np.isnan(metrics["mae_portrait_right"]) and np.isnan(metrics["mae_portrait_wrong"])


def test_the_pooled_portrait_class_is_the_trainers():
    from coinyear.evaluate import POOLED
    from coinyear.experiment import OTHER_CLASS

    assert POOLED == OTHER_CLASS


def test_report_metrics_add_range_coverage_width_and_flag_share():
    from coinyear.evaluate import report_metrics

    # midpoints 10, 20, 30, 40: the first three ranges hold theirs, the last one misses (30..38 < 40)
    low, high = np.array([0, 15, 20, 30]), np.array([20, 25, 50, 38])
    metrics = report_metrics([10, 20, 30, 34], [10, 20, 30, 40], [10, 20, 30, 40], low=low, high=high,
                             flagged=[True, False, False, False])
    assert metrics["mae"] == pytest.approx(6 / 4)
    assert metrics["interval90_coverage"] == pytest.approx(3 / 4)
    assert metrics["interval90_median_width"] == pytest.approx(np.median([20, 10, 30, 8]))
    assert metrics["ood_flagged"] == pytest.approx(1 / 4)
    assert "portrait_top1" not in metrics  # no portraits given: no portrait metrics
    plain = report_metrics([10], [10], [10])
    assert "interval90_coverage" not in plain and "ood_flagged" not in plain


def test_table_report_reads_the_ranked_portrait_columns_in_rank_order():
    import pandas as pd

    from coinyear.evaluate import table_report

    # columns out of order: portrait_2 before portrait_1
    table = pd.DataFrame({"predicted": [10.0, 50.0], "year_from": [10, 40], "year_to": [10, 40],
                          "portrait_2": ["Nero", "Augustus"], "portrait_1": ["Augustus", "Titus"],
                          "portrait_3": ["Titus", "Nero"], "portrait": ["Augustus", "Nero"]})
    metrics = table_report(table, ["Augustus", "Nero", "Titus", "other"])
    assert metrics["portrait_top1"] == pytest.approx(0.5) and metrics["portrait_top3"] == pytest.approx(1.0)
    assert metrics["mae_portrait_right"] == 0 and metrics["mae_portrait_wrong"] == pytest.approx(10)


def test_format_report_is_one_readable_line_per_metric():
    from coinyear.evaluate import format_report

    text = format_report({"count": 12.0, "mae": 14.256, "within_10y": 0.5, "portrait_top1": float("nan"),
                          "mae_portrait_right": 9.5, "portrait_right_count": 7.0, "interval90_coverage": None},
                         "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert any("MAE" in line and line.endswith("14.26 years") for line in lines)
    assert any("±10" in line and line.endswith("50.0 %") for line in lines)
    assert any("right (top 1)" in line and line.endswith("-") for line in lines)
    assert any("portrait is right" in line and line.endswith("9.50 years  (7 coins)") for line in lines)
    assert any("range holds" in line and line.endswith("-") for line in lines)
    assert any(line.endswith(" 12") for line in lines)
