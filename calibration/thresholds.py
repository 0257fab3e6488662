"""Threshold rules of DESIGN.md section 7 (numpy only).

Good images only: the image threshold is the smallest score that at most floor(rate * n) good scores exceed,
reported with the one-sided 95% Clopper-Pearson upper bound of the true false-alarm rate. With labelled
defects, the F1-optimal threshold and the threshold that reaches a target recall are reported as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradad.errors import GradError
from gradad.ranking import best_f1


@dataclass(frozen=True)
class CalibrationConfig:
    """What the user asks of the thresholds."""

    false_alarm_rate: float = 0.01  # target fraction of good parts flagged
    target_recall: float = 0.95  # for the recall rule, when defects are given
    method: str = "far"  # which rule sets the active image threshold: far | f1 | recall
    pixel_false_positive_rate: float = 0.001  # good-only pixel threshold: this fraction of good pixels above
    confidence: float = 0.95


def binomial_upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of p given k successes in n trials."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence

    def cdf(p: float) -> float:  # P(X <= k | n, p)
        total = 0.0
        for i in range(k + 1):
            log_term = (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                        + (i * math.log(p) if i else 0.0) + (n - i) * math.log1p(-p))
            total += math.exp(log_term)
        return total

    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection on the decreasing CDF: find p with cdf(p) = alpha
        mid = (lo + hi) / 2
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def min_images_for_rate(rate: float, confidence: float = 0.95) -> int:
    """Good images needed so that zero false alarms bound the rate by ``rate`` (n >= ln(1-conf)/ln(1-rate))."""
    return int(math.ceil(math.log(1 - confidence) / math.log1p(-rate)))


def far_threshold(good_scores: np.ndarray, rate: float) -> tuple[float, int]:
    """(threshold, k): at most k = floor(rate * n) good scores lie strictly above the threshold."""
    s = np.sort(np.asarray(good_scores, dtype=np.float64))
    n = s.size
    if n == 0:
        raise ValueError("no good scores to calibrate on")
    k = int(math.floor(rate * n))
    k = min(k, n - 1)
    threshold = float(s[n - 1 - k])
    return threshold, int((s > threshold).sum())


#: other false-alarm targets grad-calibrate prints beside the chosen one, so the trade-off is seen before a line runs
OTHER_RATES = (0.01, 0.02, 0.05, 0.1)
#: a good score lies far above the rest when it exceeds median + this many times (90th percentile - median)
OUTLIER_SPREADS = 3.0
#: fewest good scores the outlier rule looks at (a 90th percentile of fewer says little)
OUTLIER_MIN_IMAGES = 20


def far_alternatives(good_scores: np.ndarray, rate: float) -> dict[float, tuple[float, int]]:
    """``{rate: (threshold, good scores above)}`` of :func:`far_threshold` at the other targets of
    :data:`OTHER_RATES` whose threshold differs from ``rate``'s and from each other's."""
    seen = {far_threshold(good_scores, rate)[0]}
    out: dict[float, tuple[float, int]] = {}
    for other in OTHER_RATES:
        threshold, above = far_threshold(good_scores, other)
        if threshold not in seen:  # the first target of each threshold (tied scores give one for several)
            seen.add(threshold)
            out[other] = (threshold, above)
    return out


def outlier_limit(good_scores: np.ndarray) -> float:
    """median + :data:`OUTLIER_SPREADS` x (90th percentile - median) of the good scores (the spread floored at 0.1 %
    of the median, so tied scores do not make every higher one an outlier); inf for fewer than
    :data:`OUTLIER_MIN_IMAGES` scores, whose 90th percentile says little."""
    s = np.asarray(good_scores, dtype=np.float64)
    if s.size < OUTLIER_MIN_IMAGES:
        return math.inf
    median, p90 = np.quantile(s, [0.5, 0.9])
    return float(median + OUTLIER_SPREADS * max(p90 - median, 1e-3 * abs(median)))


def outlying_goods(good_scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices (highest first) of every good score above :func:`outlier_limit` when ``threshold`` lies above it
    too (it is then set by a few unusual images: an exposure the line rarely makes, a defect among the goods, not
    by the good parts' spread); empty when the threshold lies within the spread (outliers it leaves above do not
    set it)."""
    s = np.asarray(good_scores, dtype=np.float64)
    limit = outlier_limit(s)
    if not threshold > limit:
        return np.zeros(0, np.int64)
    idx = np.flatnonzero(s > limit)
    return idx[np.argsort(-s[idx])]


def check_target_recall(target: float) -> float:
    """``target`` when it is a recall in (0, 1]; a percentage (95) or 0 would silently give the lowest or the
    highest defect score as threshold."""
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise GradError(f"--target-recall {target}: must be a fraction in (0, 1], e.g. 0.95")
    return float(target)


def recall_threshold(defect_scores: np.ndarray, target: float) -> float:
    """Largest threshold at which at least ``target`` of the defect scores are >= the threshold."""
    check_target_recall(target)
    s = np.sort(np.asarray(defect_scores, dtype=np.float64))[::-1]
    need = max(1, int(math.ceil(target * s.size)))
    return float(s[need - 1])


def rates_at(threshold: float, good_scores: np.ndarray, defect_scores: np.ndarray | None) -> dict[str, float | None]:
    """False-alarm rate (score > t) on good images and recall (score > t) on defects at ``threshold``."""
    far = float(np.mean(np.asarray(good_scores) > threshold)) if len(good_scores) else None
    recall = None
    if defect_scores is not None and len(defect_scores):
        recall = float(np.mean(np.asarray(defect_scores) > threshold))
    return {"false_alarm_rate": far, "recall": recall}


def pixel_threshold_good_only(good_maps: np.ndarray, rate: float) -> float:
    """Pixel value exceeded by ``rate`` of all good-image pixels."""
    return float(np.quantile(np.asarray(good_maps, dtype=np.float32).ravel(), 1.0 - rate))


def pixel_threshold_f1(maps: np.ndarray, masks: np.ndarray, max_pixels: int = 4_000_000,
                       seed: int = 0) -> tuple[float, float]:
    """(F1-optimal pixel threshold, its F1) over all pixels; subsampled uniformly above ``max_pixels``."""
    values = np.asarray(maps, dtype=np.float32).ravel()
    labels = np.asarray(masks, dtype=bool).ravel()
    if values.size > max_pixels:
        idx = np.random.default_rng(seed).choice(values.size, max_pixels, replace=False)
        values, labels = values[idx], labels[idx]
    f1, threshold = best_f1(labels.astype(np.int64), values)
    return float(threshold), float(f1)
