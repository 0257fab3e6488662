"""Paired bootstrap intervals of metric differences between two models on the same test images (synthetic)."""

from __future__ import annotations

import numpy as np
import pytest

from gradad.evaluation.bootstrap import binned_auroc_aupr, paired_differences, paired_scores
from gradad.evaluation.metrics import pixel_auroc_aupr


def _test_set(seed: int, n_per_class: int = 30, hw: int = 16):
    """Two classes; half of each class defective with a square defect; maps noisy, brighter on the defect."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_class
    classes = np.array(["a"] * n_per_class + ["b"] * n_per_class)
    labels = np.tile(np.r_[np.zeros(n_per_class // 2, int), np.ones(n_per_class - n_per_class // 2, int)], 2)
    masks = np.zeros((n, hw, hw), np.uint8)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, hw - 4, 2)
        masks[i, y:y + 4, x:x + 4] = 1
    return classes, labels, masks, rng


def _model(masks, labels, rng, signal: float):
    maps = rng.normal(size=masks.shape).astype(np.float32) + signal * masks
    scores = maps.reshape(len(maps), -1).max(1) + signal * labels * 0.5
    return scores, maps


def test_binned_pixel_metrics_match_the_exact_ones() -> None:
    classes, labels, masks, rng = _test_set(0)
    scores, maps = _model(masks, labels, rng, 1.0)
    s = paired_scores(classes, labels, scores, maps, masks)
    exact = pixel_auroc_aupr(masks, maps)
    binned = binned_auroc_aupr(s.defect_counts.sum(0), s.normal_counts.sum(0))
    assert binned == pytest.approx(exact, abs=2e-3)


def test_a_model_against_itself_differs_by_nothing() -> None:
    classes, labels, masks, rng = _test_set(1)
    scores, maps = _model(masks, labels, rng, 1.0)
    s = paired_scores(classes, labels, scores, maps, masks)
    out = paired_differences(s, s, resamples=50)
    for metric in out.values():
        for cell in metric.values():
            assert cell["difference"] == 0 and cell["low"] == 0 and cell["high"] == 0
            assert cell["share_not_above"] == 1.0


def test_a_clearly_better_model_gets_an_interval_above_zero_and_a_tied_one_does_not() -> None:
    classes, labels, masks, rng = _test_set(2)
    weak = paired_scores(classes, labels, *_model(masks, labels, rng, 0.3), masks)
    strong = paired_scores(classes, labels, *_model(masks, labels, rng, 3.0), masks)
    twin = paired_scores(classes, labels, *_model(masks, labels, rng, 0.3), masks)
    better = paired_differences(weak, strong, resamples=200)
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupr"):
        for cls in ("a", "b", "mean"):
            cell = better[metric][cls]
            assert cell["low"] > 0 and cell["share_not_above"] < 0.05, (metric, cls, cell)
            assert cell["low"] <= cell["difference"] <= cell["high"]
    same = paired_differences(weak, twin, resamples=200)["pixel_auroc"]["mean"]
    assert same["low"] < 0 < same["high"]  # an equally good model: the interval straddles zero
    # the mean row is the mean of the classes' differences
    assert better["image_auroc"]["mean"]["difference"] == pytest.approx(
        np.mean([better["image_auroc"][c]["difference"] for c in ("a", "b")]))


def test_models_scored_on_different_images_are_refused() -> None:
    classes, labels, masks, rng = _test_set(3)
    s = paired_scores(classes, labels, *_model(masks, labels, rng, 1.0), masks)
    shuffled = paired_scores(classes[::-1], labels[::-1], *_model(masks[::-1], labels[::-1], rng, 1.0), masks[::-1])
    with pytest.raises(ValueError, match="same images"):
        paired_differences(s, shuffled, resamples=10)


def test_paired_mean_difference_interval_covers_the_mean_and_narrows_with_more_items() -> None:
    from gradad.evaluation.bootstrap import paired_mean_difference

    rng = np.random.default_rng(4)
    base = rng.uniform(size=400)
    gain = base + 0.05 + 0.1 * rng.normal(size=400)
    wide = paired_mean_difference(base[:40], gain[:40], resamples=500)
    narrow = paired_mean_difference(base, gain, resamples=500)
    assert narrow["difference"] == pytest.approx(np.mean(gain - base))
    assert narrow["low"] < 0.05 < narrow["high"] and narrow["low"] > 0 and narrow["share_not_above"] == 0
    assert narrow["high"] - narrow["low"] < wide["high"] - wide["low"]
    assert np.isnan(paired_mean_difference([], [])["difference"])


def test_binned_aupr_stays_exact_when_defects_are_a_tiny_share_of_the_pixels() -> None:
    """Edges from all pixels alone put the few defect pixels into the top bins with normal ones (AP off by points);
    edges from the defect pixels too keep it exact."""
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(40, 64, 64)).astype(np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    for i in range(0, 40, 2):
        y, x = rng.integers(0, 62, 2)
        masks[i, y:y + 2, x:x + 2] = 1  # 0.05 % of the pixels
    maps += 2.5 * masks
    labels = (masks.reshape(40, -1).max(1) > 0).astype(int)
    s = paired_scores(np.array(["a"] * 40), labels, maps.reshape(40, -1).max(1), maps, masks)
    assert binned_auroc_aupr(s.defect_counts.sum(0), s.normal_counts.sum(0)) == pytest.approx(
        pixel_auroc_aupr(masks, maps), abs=2e-3)


def test_items_without_a_value_are_left_out_of_the_mean_difference() -> None:
    from gradad.evaluation.bootstrap import paired_mean_difference

    out = paired_mean_difference([0.1, np.nan, 0.2], [0.3, 0.5, 0.4], resamples=50)
    assert out["difference"] == pytest.approx(0.2) and out["share_not_above"] == 0.0
    assert np.isnan(paired_mean_difference([np.nan], [0.1])["difference"])
