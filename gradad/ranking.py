"""Image-level ranking metrics (AUROC, average precision, F1): exact, sort-based, numpy only.

Core, because calibration picks thresholds with them and evaluation reports them; the pixel metrics and PRO
build on these in :mod:`gradad.evaluation.metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NAN = float("nan")


def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """1-D floating array (float32 kept as is to save memory, everything else float64); rejects nan."""
    a = np.asarray(scores)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.dtype.kind != "f" or a.dtype.itemsize < 4:
        a = a.astype(np.float64)
    a = a.reshape(-1)
    if a.size and np.isnan(a).any():
        raise ValueError(f"{name} contain NaN values")
    return a


def _as_labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    a = np.asarray(labels).reshape(-1)
    if a.size != n:
        raise ValueError(f"{name} has {a.size} entries but scores has {n}")
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be 0/1 or boolean, got dtype {a.dtype}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 (or booleans)")
    return a.astype(bool)


def _rank_stats(labels: np.ndarray, scores: np.ndarray):
    """Per distinct positive score u_j: count c_j, #neg < u_j, #neg <= u_j; plus P and N.

    Sorts only the negatives (in place on a copy) and the positives; O(n log n), memory ~ one copy of the scores.
    """
    pos = scores[labels]
    neg = scores[~labels]
    neg.sort()
    u, c = np.unique(pos, return_counts=True)
    lt = np.searchsorted(neg, u, side="left").astype(np.int64)
    le = np.searchsorted(neg, u, side="right").astype(np.int64)
    return u, c.astype(np.int64), lt, le, int(pos.size), int(neg.size)


def _auroc_aupr_flat(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if scores.size == 0:
        return _NAN, _NAN
    u, c, lt, le, n_pos, n_neg = _rank_stats(labels, scores)
    if n_pos == 0:
        return _NAN, _NAN
    ap = _ap_from_stats(c, lt, n_pos, n_neg)
    if n_neg == 0:
        return _NAN, ap
    # Mann-Whitney U with ties counted 1/2 == trapezoidal ROC AUC (sklearn); exact integer arithmetic.
    u2 = 2 * int(np.dot(c, lt)) + int(np.dot(c, le - lt))
    return u2 / (2.0 * n_pos * n_neg), ap


def _ap_from_stats(c: np.ndarray, lt: np.ndarray, n_pos: int, n_neg: int) -> float:
    # Thresholds at each distinct positive score u_j (only those change recall): predict score >= u_j.
    tp = np.cumsum(c[::-1])[::-1]  # #pos >= u_j
    fp = n_neg - lt  # #neg >= u_j
    precision = tp / (tp + fp)
    return float(np.sum(c * precision) / n_pos)


def auroc_aupr(labels: Any, scores: Any) -> tuple[float, float]:
    """Image-level (AUROC, average precision) in one pass; see :func:`auroc` and :func:`aupr`."""
    s = _as_scores(scores)
    return _auroc_aupr_flat(_as_labels(labels, s.size), s)


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve, identical to ``sklearn.metrics.roc_auc_score`` (ties count 1/2).

    Returns ``nan`` (rather than raising) when only one class is present, e.g. a class whose test split has no
    defective images; aggregates skip nan.
    """
    return auroc_aupr(labels, scores)[0]


def aupr(labels: Any, scores: Any) -> float:
    """Average precision, identical to ``sklearn.metrics.average_precision_score``.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (no interpolation). Returns ``nan`` when
    there are no positive labels (AP is undefined); with only positives it is 1.0, as in sklearn.
    """
    return auroc_aupr(labels, scores)[1]


def _f1(tp: float, fp: float, fn: float) -> float:
    den = 2 * tp + fp + fn
    return 2 * tp / den if den else 0.0


def f1_at_threshold(labels: Any, scores: Any, threshold: float) -> float:
    """F1 of the rule ``score >= threshold`` → anomalous. 0.0 when undefined (no positives and no predictions),
    as ``sklearn.metrics.f1_score`` with ``zero_division=0``."""
    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    return _f1(tp, fp, fn)


def best_f1(labels: Any, scores: Any) -> tuple[float, float]:
    """Maximum F1 over all thresholds and the threshold achieving it.

    Candidate thresholds are the distinct score values (rule ``score >= threshold``); on ties the highest
    threshold wins (fewest alarms). Returns ``(nan, nan)`` without positive labels or without scores.
    """
    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    n_pos = int(y.sum())
    if s.size == 0 or n_pos == 0:
        return _NAN, _NAN
    order = np.argsort(-s, kind="stable")
    ss, ys = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), ss.size - 1]  # last index of each distinct value (descending)
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    k = int(np.argmax(f1))
    return float(f1[k]), float(ss[last[k]])
