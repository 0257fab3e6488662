"""Threshold rules of grad-calibrate (DESIGN.md section 7)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from gradad.calibration.thresholds import (
    binomial_upper_bound,
    far_threshold,
    min_images_for_rate,
    pixel_threshold_good_only,
    rates_at,
    recall_threshold,
)


@pytest.mark.parametrize("k,n", [(0, 10), (0, 299), (1, 100), (5, 200), (3, 3)])
def test_clopper_pearson_upper_bound_matches_beta_quantile(k: int, n: int) -> None:
    expected = 1.0 if k >= n else stats.beta.ppf(0.95, k + 1, n - k)
    assert binomial_upper_bound(k, n) == pytest.approx(expected, abs=1e-6)


def test_min_images_rule_of_three() -> None:
    assert min_images_for_rate(0.01) == 299  # 0 false alarms in 299 -> 95% bound just below 1%
    assert binomial_upper_bound(0, 299) <= 0.01 < binomial_upper_bound(0, 298)


def test_far_threshold_exceeded_by_at_most_rate_of_good() -> None:
    scores = np.arange(1, 201, dtype=float)  # 200 distinct scores
    t, above = far_threshold(scores, 0.01)
    assert above == 2 and t == 198.0
    assert np.mean(scores > t) <= 0.01
    t0, above0 = far_threshold(scores, 0.001)  # floor(0.2) = 0: the maximum itself
    assert above0 == 0 and t0 == 200.0
    with pytest.raises(ValueError):
        far_threshold(np.array([]), 0.01)


def test_recall_threshold_and_rates() -> None:
    defects = np.array([5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0])
    t = recall_threshold(defects, 0.8)  # need 8 of 10 at or above
    assert t == 7.0 and np.mean(defects >= t) >= 0.8
    r = rates_at(6.5, np.array([1.0, 2.0, 7.0]), defects)
    assert r["false_alarm_rate"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(0.8)


def test_pixel_threshold_good_only() -> None:
    maps = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    t = pixel_threshold_good_only(maps, 0.01)
    assert np.mean(maps > t) == pytest.approx(0.01, abs=1e-3)
