"""Paired bootstrap intervals for the difference between two models scored on the same test images.

A benchmark table says GRAD 97.4 and PatchCore 97.7 image AUROC; whether that 0.3 is a difference or noise depends
on how many defects and good images a class has. Resampling the *images* of each class (defective and good ones
separately, with replacement) and scoring both models on every resample gives the spread of the difference; the
same resample for both models keeps what they share (the same hard images) out of it.

Image AUROC is exact on every resample. Pixel AUROC and pixel AUPR pool millions of pixels, so each image is
reduced once to per-bin counts of its defect and normal pixels over ``PIXEL_BINS`` bins of that model's map values
(edges at quantiles of all pixels and of the defect pixels); a resample sums the counts of its images (binned and
exact metrics agree to ~1e-3 on the benchmark's data; the point differences are the binned ones).
PRO is region based and gets no interval. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gradad.ranking import auroc

PIXEL_BINS = 4096
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.9
#: pixels drawn (evenly strided) to place the quantile bin edges of one model's maps
EDGE_SAMPLE_PIXELS = 2_000_000
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupr")


@dataclass
class PairedScores:
    """What one model produced on the test images, reduced to what the bootstrap needs."""

    classes: np.ndarray  # (N,) class name of every image
    labels: np.ndarray  # (N,) 1 = defective image
    scores: np.ndarray  # (N,) image scores
    defect_counts: np.ndarray  # (N, PIXEL_BINS) defect pixels of each image per map-value bin
    normal_counts: np.ndarray  # (N, PIXEL_BINS) normal pixels of each image per map-value bin


def paired_scores(classes: Sequence[str], labels: Sequence[int], scores: np.ndarray, maps: np.ndarray,
                  masks: np.ndarray, bins: int = PIXEL_BINS) -> PairedScores:
    """Reduce one model's image scores and (N, H, W) maps with their masks to :class:`PairedScores`."""
    flat = np.asarray(maps, dtype=np.float32).reshape(len(maps), -1)
    truth = np.asarray(masks).reshape(len(masks), -1) > 0
    step = max(1, flat.size // EDGE_SAMPLE_PIXELS)
    # Half the edges from all pixels, half from the defect pixels: defects are a tiny share of the pixels, and
    # edges from all pixels alone put most of them into a few top bins with normal pixels (AUPR then off by points).
    levels = np.linspace(0, 1, bins // 2 + 1)[1:-1]
    defect_values = flat[truth]
    edges = np.unique(np.concatenate([np.quantile(flat.reshape(-1)[::step], levels),
                                      np.quantile(defect_values, levels) if defect_values.size else []]))
    defect = np.zeros((len(flat), bins), np.int64)
    normal = np.zeros((len(flat), bins), np.int64)
    for i, (values, mask) in enumerate(zip(flat, truth)):
        idx = np.searchsorted(edges, values, side="right")
        defect[i] = np.bincount(idx[mask], minlength=bins)
        normal[i] = np.bincount(idx[~mask], minlength=bins)
    return PairedScores(np.asarray(classes), np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64),
                        defect, normal)


def binned_auroc_aupr(defect: np.ndarray, normal: np.ndarray) -> tuple[float, float]:
    """(AUROC, average precision) of pixels given as counts per increasing score bin (ties within a bin)."""
    n_pos, n_neg = float(defect.sum()), float(normal.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    below = np.cumsum(normal) - normal
    auc = float((defect * (below + 0.5 * normal)).sum() / (n_pos * n_neg))
    tp = np.cumsum(defect[::-1])  # thresholds from the top bin down
    fp = np.cumsum(normal[::-1])
    hit = defect[::-1] > 0
    ap = float((defect[::-1][hit] / n_pos * tp[hit] / (tp[hit] + fp[hit])).sum())
    return auc, ap


def _metrics(s: PairedScores, idx: np.ndarray) -> dict[str, float]:
    pix_auroc, pix_aupr = binned_auroc_aupr(s.defect_counts[idx].sum(0), s.normal_counts[idx].sum(0))
    return {"image_auroc": auroc(s.labels[idx], s.scores[idx]), "pixel_auroc": pix_auroc, "pixel_aupr": pix_aupr}


def paired_differences(reference: PairedScores, other: PairedScores, resamples: int = DEFAULT_RESAMPLES,
                       level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """metric -> class (and "mean" over classes) -> difference ``other - reference`` on the test images, the
    ``level`` interval of the difference over ``resamples`` paired resamples, and ``share_not_above`` (the share
    of resamples where ``other`` is not above ``reference``). Both must list the same images in the same order."""
    if not (np.array_equal(reference.classes, other.classes) and np.array_equal(reference.labels, other.labels)):
        raise ValueError("paired bootstrap needs both models scored on the same images in the same order")
    rng = np.random.default_rng(seed)
    names = sorted(set(reference.classes.tolist()))
    groups = {c: (np.flatnonzero((reference.classes == c) & (reference.labels == 1)),
                  np.flatnonzero((reference.classes == c) & (reference.labels == 0))) for c in names}
    point = {c: _difference(reference, other, np.r_[d, g]) for c, (d, g) in groups.items()}
    draws = {c: {m: np.empty(resamples) for m in METRICS} for c in names}
    for r in range(resamples):
        for c, (d, g) in groups.items():
            idx = np.r_[rng.choice(d, len(d)) if len(d) else d, rng.choice(g, len(g)) if len(g) else g]
            for m, v in _difference(reference, other, idx).items():
                draws[c][m][r] = v
    point["mean"] = {m: float(np.nanmean([point[c][m] for c in names])) for m in METRICS}
    draws["mean"] = {m: np.nanmean(np.stack([draws[c][m] for c in names]), axis=0) for m in METRICS}
    return {m: {c: _interval(point[c][m], draws[c][m], level) for c in [*names, "mean"]} for m in METRICS}


def paired_mean_difference(reference: Sequence[float], other: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                           level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, float]:
    """Mean of ``other - reference`` over paired items (e.g. one IoU per image), its ``level`` interval over
    ``resamples`` resamples of the items, and ``share_not_above`` (resamples whose mean difference is <= 0)."""
    diff = np.asarray(other, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    diff = diff[np.isfinite(diff)]  # an item without a value on either side says nothing about the difference
    if diff.size == 0:
        return _interval(float("nan"), np.empty(0), level)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (resamples, diff.size))].mean(axis=1)
    return _interval(float(diff.mean()), means, level)


def _interval(difference: float, draws: np.ndarray, level: float) -> dict[str, float]:
    """A difference with the ``level`` percentile interval of its resampled ``draws`` (non-finite draws left out)
    and the share of draws <= 0; nan where no draw is finite."""
    values = draws[np.isfinite(draws)]
    if not len(values):
        return {"difference": difference, "low": float("nan"), "high": float("nan"), "share_not_above": float("nan")}
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"difference": difference, "low": float(low), "high": float(high),
            "share_not_above": float((values <= 0).mean())}


def format_interval(cell: dict[str, float], decimals: int = 1) -> str:
    """'+d [+low, +high] P(≤ 0) s' in points (x100) for a table cell; '–' for an undefined difference."""
    if not np.isfinite(cell["difference"]):
        return "–"
    return (f"{100 * cell['difference']:+.{decimals}f} [{100 * cell['low']:+.{decimals}f}, "
            f"{100 * cell['high']:+.{decimals}f}] P(≤ 0) {cell['share_not_above']:.2f}")


def _difference(reference: PairedScores, other: PairedScores, idx: np.ndarray) -> dict[str, float]:
    a, b = _metrics(reference, idx), _metrics(other, idx)
    return {m: b[m] - a[m] for m in METRICS}
