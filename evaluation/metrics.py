"""Anomaly-detection metrics: image/pixel AUROC and AUPR, PRO (AUPRO to 30% FPR), F1.

numpy + OpenCV only (no torch, sklearn or scipy) so that the lean runtime can import this module.

Conventions
-----------
* ``labels`` / ``masks``: 1 (True) = anomalous, 0 (False) = normal. ``scores`` / ``maps``: higher = more anomalous.
* A metric that is undefined because only one class is present (no anomalous images of a class in a test split,
  no defect pixels, no normal pixels, no ground-truth regions) returns ``nan`` instead of raising; aggregates
  (:func:`per_class_metrics`) skip nan values. Non-finite scores (nan/inf… nan only) raise ``ValueError``.
* AUROC/AUPR are exact (no subsampling, no binning) and match ``sklearn.metrics.roc_auc_score`` and
  ``sklearn.metrics.average_precision_score`` including ties (to floating-point summation order, ~1e-12).
* PRO is exact too (every distinct map value a threshold, :func:`pro_points`); an evenly spaced grid of
  thresholds (:func:`pro_curve`) is available for comparison with tools that use one.
* Pixel metrics pool all pixels of all images. They accept an (N,H,W) array or a sequence of 2-D maps (sizes may
  differ between images); a mask entry may be ``None`` for an image without defects.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

# The image-level ranking metrics are core (calibration uses them too); re-exported here with the pixel metrics.
from gradad.ranking import (_NAN, _as_labels, _as_scores, _auroc_aupr_flat, _rank_stats, aupr, auroc,  # noqa: F401
                            auroc_aupr, best_f1, f1_at_threshold)

__all__ = [
    "auroc",
    "aupr",
    "auroc_aupr",
    "pixel_auroc",
    "pixel_aupr",
    "pixel_auroc_aupr",
    "pro_curve",
    "pro_points",
    "pro_auc",
    "f1_at_threshold",
    "best_f1",
    "compute_metrics",
    "per_class_metrics",
    "METRIC_KEYS",
]

#: Metric keys produced by :func:`compute_metrics` (in report order); counts are extra.
METRIC_KEYS: tuple[str, ...] = ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "pro")



# --------------------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------------------
def _per_image(arr: np.ndarray) -> np.ndarray:
    """(N,H,W), (N,1,H,W) or one (H,W) array -> (N,H,W) (other shapes pass through for the caller to judge)."""
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    return arr[None] if arr.ndim == 2 else arr


def _pixel_pairs(masks: Any, maps: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """List of (mask bool 2-D, map float 2-D) per image; maps may be (N,H,W), (N,1,H,W) or a list of 2-D arrays."""
    if isinstance(maps, np.ndarray):
        arr = _per_image(maps)
        if arr.ndim != 3:
            raise ValueError(f"maps must be (N,H,W) or (N,1,H,W), got shape {maps.shape}")
        map_list: list[np.ndarray] = list(arr)
    else:
        map_list = [np.squeeze(np.asarray(m)) for m in maps]
    n = len(map_list)
    if masks is None:
        raise ValueError("masks is None")
    mask_list: list[Any] = list(_per_image(masks) if isinstance(masks, np.ndarray) else masks)
    if len(mask_list) != n:
        raise ValueError(f"{len(mask_list)} masks but {n} anomaly maps")
    pairs = []
    for i, (m, a) in enumerate(zip(mask_list, map_list)):
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"anomaly map {i} must be 2-D, got shape {a.shape}")
        if a.dtype.kind != "f" or a.dtype.itemsize < 4:
            a = a.astype(np.float64)
        if m is None:
            m = np.zeros(a.shape, dtype=bool)
        else:
            m = np.squeeze(np.asarray(m))
            if m.shape != a.shape:
                raise ValueError(f"mask {i} has shape {m.shape} but its anomaly map has shape {a.shape}")
            m = m.astype(bool) if m.dtype != np.bool_ else m
        pairs.append((m, a))
    return pairs


def _flat_pixels(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(labels bool 1-D, scores 1-D) over all pixels; avoids copies for a contiguous (N,H,W) array."""
    if (isinstance(maps, np.ndarray) and isinstance(masks, np.ndarray)
            and _per_image(masks).shape == _per_image(maps).shape):  # equal sizes alone let (H, W) vs (W, H) pass
        m = masks.reshape(-1)
        labels = m if m.dtype == np.bool_ else m.astype(bool)
        return labels, _as_scores(maps, "maps")
    pairs = _pixel_pairs(masks, maps)
    if not pairs:
        return np.zeros(0, bool), np.zeros(0, np.float64)
    labels = np.concatenate([m.reshape(-1) for m, _ in pairs])
    scores = np.concatenate([a.reshape(-1) for _, a in pairs])
    return labels, _as_scores(scores, "maps")


# --------------------------------------------------------------------------------------------------------------
# ranking metrics
# --------------------------------------------------------------------------------------------------------------
def pixel_auroc_aupr(masks: Any, maps: Any) -> tuple[float, float]:
    """Pixel-level (AUROC, AP) pooled over all pixels of all images (exact, sort-based, no subsampling).

    ``masks``: (N,H,W) bool (or a sequence of 2-D masks / ``None`` for defect-free images);
    ``maps``: (N,H,W) float anomaly maps of the same size. float32 maps stay float32 (≈20M pixels sort in ~1-2 s
    with ~2 extra copies of the data).
    """
    labels, scores = _flat_pixels(masks, maps)
    if labels.size != scores.size:
        raise ValueError(f"masks have {labels.size} pixels but maps have {scores.size}")
    return _auroc_aupr_flat(labels, scores)


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level AUROC pooled over all images (see :func:`pixel_auroc_aupr`)."""
    return pixel_auroc_aupr(masks, maps)[0]


def pixel_aupr(masks: Any, maps: Any) -> float:
    """Pixel-level average precision pooled over all images (see :func:`pixel_auroc_aupr`)."""
    return pixel_auroc_aupr(masks, maps)[1]


# --------------------------------------------------------------------------------------------------------------
# PRO
# --------------------------------------------------------------------------------------------------------------
def _defect_regions(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of ground-truth regions, each defect pixel's region label 1..n in flat order) of one image's mask:
    8-connected components, as MVTec AD's PRO counts them."""
    n_lab, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return n_lab - 1, lab.reshape(-1)[mask.reshape(-1)]


def pro_curve(masks: Any, maps: Any, num_thresholds: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region-overlap curve at ``num_thresholds`` thresholds evenly spaced in [min(maps), max(maps)].

    A pixel is predicted anomalous when ``map >= threshold``. Ground-truth regions are the 8-connected components
    (``cv2.connectedComponents``) of each image's mask; images with empty masks contribute no regions.
    PRO(t) = mean over all regions of all images of (region pixels >= t) / (region size), each region weighted
    equally; FPR(t) = (normal pixels >= t) / (all normal pixels of all images).

    Exact counting per threshold through one ``searchsorted`` + ``bincount`` pass per image (no per-threshold
    loop over pixels). Returns ``(thresholds, fpr, pro)`` with thresholds ascending (so fpr/pro non-increasing);
    fpr is nan without normal pixels, pro is nan without regions.
    """
    if num_thresholds < 2:
        raise ValueError("num_thresholds must be >= 2")
    pairs = _pixel_pairs(masks, maps)
    if not pairs:
        raise ValueError("no images")
    lo = min(float(a.min()) for _, a in pairs if a.size)
    hi = max(float(a.max()) for _, a in pairs if a.size)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("maps contain NaN or infinite values")
    th = np.linspace(lo, hi, num_thresholds)
    nb = num_thresholds + 1
    normal_hist = np.zeros(nb, np.int64)
    region_keys = []
    n_regions = 0
    for m, a in pairs:
        # b = number of thresholds <= value, i.e. value >= th[j] for exactly j < b
        b = np.searchsorted(th, a.reshape(-1), side="right")
        mf = m.reshape(-1)
        if not mf.any():
            normal_hist += np.bincount(b, minlength=nb)
            continue
        normal_hist += np.bincount(b[~mf], minlength=nb)
        n_here, region = _defect_regions(m)
        region_keys.append((region.astype(np.int64) - 1 + n_regions) * nb + b[mf])
        n_regions += n_here
    n_normal = int(normal_hist.sum())
    # count >= th[j] = sum_{k > j} hist[k]
    normal_ge = np.cumsum(normal_hist[::-1])[::-1][1:]
    fpr = normal_ge / n_normal if n_normal else np.full(num_thresholds, _NAN)
    if n_regions:
        hist = np.bincount(np.concatenate(region_keys), minlength=n_regions * nb).reshape(n_regions, nb)
        sizes = hist.sum(axis=1)
        ge = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
        pro = (ge / sizes[:, None]).mean(axis=0)
    else:
        pro = np.full(num_thresholds, _NAN)
    return th, fpr, pro


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under pro(fpr) for fpr in [0, limit]; points ordered with fpr non-decreasing, the curve
    linearly interpolated at exactly ``limit``."""
    k = int(np.searchsorted(fpr, limit, side="left"))  # first point at or beyond the limit
    x, y = fpr[:k], pro[:k]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    if 0 < k < fpr.size:
        x0, x1, y0, y1 = float(fpr[k - 1]), float(fpr[k]), float(pro[k - 1]), float(pro[k])
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0) if x1 > x0 else y1
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def pro_points(masks: Any, maps: Any, fpr_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: ``(fpr, pro)`` at every distinct map value as the threshold, thresholds descending
    (so both non-decreasing, ending at (1, 1)); nan arrays without normal pixels or without regions. With
    ``fpr_limit``, the curve up to its first point at or beyond that FPR (all an area to the limit needs).

    PRO is a weighted true-positive rate: a defect pixel counts 1 / (its region's size x the number of regions),
    a normal pixel 1 / (the number of normal pixels) towards the FPR, so one sort of all pixels gives the whole
    curve (MVTec AD's definition; regions 8-connected as in :func:`pro_curve`). Only the defect pixels carry
    weights (the normal ones are counted by position), so the memory is a few bytes a pixel beyond the sort."""
    pairs = _pixel_pairs(masks, maps)
    if not pairs:
        raise ValueError("no images")
    values, defect_at, defect_weights = [], [], []
    n_regions = offset = 0
    for m, a in pairs:
        flat, mf = a.reshape(-1), m.reshape(-1)
        if not np.isfinite(flat).all():
            raise ValueError("maps contain NaN or infinite values")
        if mf.any():
            n_here, region = _defect_regions(m)
            defect_weights.append(1.0 / np.bincount(region)[region])
            defect_at.append(offset + np.flatnonzero(mf))
            n_regions += n_here
        values.append(flat)
        offset += flat.size
    n_defect = sum(len(d) for d in defect_at)
    n_normal = offset - n_defect
    if not n_regions or not n_normal:
        return np.full(1, _NAN), np.full(1, _NAN)
    pooled = np.concatenate(values)  # the maps' own dtype: ties are decided as they were computed
    order = np.argsort(pooled)[::-1]  # descending (ties share one threshold below, so their order is free)
    sorted_values = pooled[order]
    del pooled
    defect_index = np.concatenate(defect_at)  # ascending pixel indices
    is_defect = np.zeros(offset, bool)
    is_defect[defect_index] = True
    defect_rank = np.flatnonzero(is_defect[order])  # where the defect pixels sit in the descending order
    weight = np.concatenate(defect_weights)[np.searchsorted(defect_index, order[defect_rank])]
    del order, is_defect
    if fpr_limit is not None:  # keep the tie group holding the first normal pixel at or beyond the limit
        m = min(n_normal, max(1, math.ceil(fpr_limit * n_normal)))
        last = m - 1 + int(np.searchsorted(defect_rank - np.arange(n_defect), m - 1, side="right"))
        last += int(np.argmax(np.append(sorted_values[last:] != sorted_values[last], True))) - 1
        sorted_values = sorted_values[:last + 1]
        defect_rank = defect_rank[defect_rank <= last]
    ends = np.append(np.flatnonzero(sorted_values[1:] != sorted_values[:-1]), sorted_values.size - 1)
    defects_to = np.searchsorted(defect_rank, ends, side="right")  # defect pixels at or above each threshold
    fpr = (ends + 1 - defects_to) / n_normal
    cumulative = np.concatenate([[0.0], np.cumsum(weight[:len(defect_rank)])])
    return fpr, cumulative[defects_to] / n_regions


def pro_auc(masks: Any, maps: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """MVTec AD AUPRO: area under the PRO-vs-FPR curve for FPR in [0, fpr_limit], divided by fpr_limit.

    Thresholds: every distinct map value (exact, :func:`pro_points`), a pixel anomalous when ``map >= t``; with
    ``num_thresholds``, that many evenly spaced between the global min and max instead (:func:`pro_curve`, the
    anomalib-style grid: within ~1e-4 of exact on smooth maps, but points too far apart below FPR 0.3 -- PRO
    several points too low -- when a few map values sit far above the rest). The curve, ordered by decreasing
    threshold, is anchored at (FPR 0, PRO 0) (a threshold above every value) and (1, 1); it is integrated with
    the trapezoid rule and linearly interpolated at exactly ``fpr_limit``. A perfect detector (all defect pixels
    above all normal pixels) scores 1.0, a random one about ``fpr_limit / 2``.

    Returns ``nan`` when there are no ground-truth regions or no normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError("fpr_limit must be in (0, 1]")
    if num_thresholds is None:
        fpr, pro = pro_points(masks, maps, fpr_limit)
    else:
        _, fpr, pro = pro_curve(masks, maps, num_thresholds)
        fpr, pro = fpr[::-1], pro[::-1]  # decreasing threshold -> non-decreasing fpr and pro
    if np.isnan(fpr).any() or np.isnan(pro).any():
        return _NAN
    x = np.concatenate([[0.0], fpr, [1.0]])
    y = np.concatenate([[0.0], pro, [1.0]])
    return _area_to_limit(x, y, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------------------------
# aggregates
# --------------------------------------------------------------------------------------------------------------
#: rates of :func:`operating_point`, per class only (the class mean holds the summed counts instead)
OPERATING_RATES = ("image_false_alarm_rate", "image_recall")


def operating_point(labels: Any, scores: Any, threshold: float) -> dict[str, float | int]:
    """What the rule ``score >= threshold`` does to these images (the runtime flags ``score > t``: pass the next
    float above ``t``, as grad-bench does): the share of good images it flags (``image_false_alarm_rate``, of
    ``n_good_scored``: ``n_false_alarms``) and of defective images (``image_recall``, of ``n_defective_scored``:
    ``n_detected``); a rate is nan without images of its kind."""
    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    flagged = s >= threshold
    n_good, n_bad = int((~y).sum()), int(y.sum())
    false_alarms, detected = int((flagged & ~y).sum()), int((flagged & y).sum())
    return {"image_false_alarm_rate": false_alarms / n_good if n_good else _NAN,
            "image_recall": detected / n_bad if n_bad else _NAN,
            "n_false_alarms": false_alarms, "n_good_scored": n_good,
            "n_detected": detected, "n_defective_scored": n_bad}


def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    *,
    threshold: float | None = None,
    f1_images: Any = None,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> dict[str, float | int]:
    """All metrics of one image set.

    Keys: ``image_auroc``, ``image_aupr``, ``image_best_f1``, ``n_images``, ``n_anomalous``; with ``threshold``
    (e.g. the calibrated one) also ``image_f1`` and the :func:`operating_point` keys; with both ``masks`` and
    ``maps`` also ``pixel_auroc``, ``pixel_aupr`` and ``pro`` (AUPRO to ``fpr_limit``; exact unless
    ``num_thresholds`` asks for :func:`pro_auc`'s evenly spaced grid). Undefined metrics are nan.
    ``f1_images`` (bool per image): the images ``image_f1`` and the operating point may score (not those the
    threshold was fitted on); the others are counted in ``n_left_out_of_f1``.
    """
    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    a, p = _auroc_aupr_flat(y, s)
    out: dict[str, float | int] = {
        "image_auroc": a,
        "image_aupr": p,
        "image_best_f1": best_f1(y, s)[0],
        "n_images": int(s.size),
        "n_anomalous": int(y.sum()),
    }
    if threshold is not None:
        keep = np.ones(s.size, bool) if f1_images is None else np.asarray(f1_images, bool)
        out["image_f1"] = f1_at_threshold(y[keep], s[keep], threshold) if keep.any() else _NAN
        out.update(operating_point(y[keep], s[keep], threshold))
        if f1_images is not None:
            out["n_left_out_of_f1"] = int((~keep).sum())
    if masks is not None and maps is not None:
        pairs = _pixel_pairs(masks, maps)
        if len(pairs) != s.size:
            raise ValueError(f"{len(pairs)} anomaly maps but {s.size} image scores")
        pa, pp, pro = _NAN, _NAN, _NAN
        if pairs:
            pa, pp = pixel_auroc_aupr(masks, maps)
            pro = pro_auc(masks, maps, fpr_limit, num_thresholds)
        out["pixel_auroc"] = pa
        out["pixel_aupr"] = pp
        out["pro"] = pro
    return out


def _nanmean_dicts(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys: list[str] = []
    for e in entries:
        for k, v in e.items():
            if k not in keys and isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool):
                keys.append(k)
    out: dict[str, Any] = {}
    for k in keys:
        vals = [float(e[k]) for e in entries if k in e]
        if k.startswith("n_"):
            out[k] = int(sum(vals))
        else:
            finite = [v for v in vals if not math.isnan(v)]
            out[k] = float(np.mean(finite)) if finite else _NAN
    return out


def per_class_metrics(
    class_names: Sequence[str],
    defect_types: Sequence[str] | None,
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    *,
    class_thresholds: Mapping[str, float] | None = None,
    threshold: float | None = None,
    by_defect: bool = True,
    f1_images: Any = None,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics per class (unified protocol: one model, scores of all classes evaluated class by class).

    ``class_names`` and ``defect_types`` are per image (length N); ``defect_types`` may be None. Returns
    ``{class: {compute_metrics keys..., "by_defect": {defect: {...}}}, ..., "mean": {...}}`` with classes in
    order of first appearance. ``mean`` holds the mean over classes of each metric, skipping nan, and the
    summed counts (``n_images``, ``n_anomalous``) plus ``n_classes``. ``by_defect`` (when ``defect_types`` is
    given and ``by_defect`` is True) scores each defect type of a class against the good (label 0) images of
    that class: image AUROC/AUPR and, with masks/maps, pixel AUROC/AUPR and PRO. ``f1_images``: as in
    :func:`compute_metrics`, per image. ``class_thresholds``: a class's own F1 threshold in place of ``threshold``.
    """
    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    names = list(class_names)
    if len(names) != s.size:
        raise ValueError(f"{len(names)} class names but {s.size} scores")
    defects = list(defect_types) if defect_types is not None else None
    if defects is not None and len(defects) != s.size:
        raise ValueError(f"{len(defects)} defect types but {s.size} scores")
    pixel = masks is not None and maps is not None
    pairs = _pixel_pairs(masks, maps) if pixel else None
    if pairs is not None and len(pairs) != s.size:
        raise ValueError(f"{len(pairs)} anomaly maps but {s.size} image scores")

    f1_keep = None if f1_images is None else np.asarray(f1_images, bool)

    def subset(idx: np.ndarray, t: float | None) -> dict[str, Any]:
        f1 = None if f1_keep is None else f1_keep[idx]
        if pairs is None:
            return compute_metrics(y[idx], s[idx], threshold=t, f1_images=f1)
        return compute_metrics(y[idx], s[idx], [pairs[i][0] for i in idx], [pairs[i][1] for i in idx],
                               threshold=t, f1_images=f1, fpr_limit=fpr_limit, num_thresholds=num_thresholds)

    names_arr = np.asarray(names, dtype=object)
    result: dict[str, dict[str, Any]] = {}
    for cls in dict.fromkeys(names):
        idx = np.flatnonzero(names_arr == cls)
        t = (class_thresholds or {}).get(str(cls), threshold)
        entry = subset(idx, t)
        if defects is not None and by_defect:
            good = idx[~y[idx]]
            per_def: dict[str, Any] = {}
            for d in dict.fromkeys(defects[i] for i in idx if y[i]):
                didx = np.array([i for i in idx if y[i] and defects[i] == d], dtype=np.int64)
                per_def[str(d)] = subset(np.concatenate([good, didx]), t)
            entry["by_defect"] = per_def
        result[str(cls)] = entry
    mean = _nanmean_dicts(list(result.values()))
    for rate in OPERATING_RATES:  # the counts are summed over classes: a rate of the mean would contradict them
        mean.pop(rate, None)
    mean["n_classes"] = len(result)
    result["mean"] = mean
    return result
