"""Tests for gradad.evaluation.metrics / report / figures (sklearn used only as a reference here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from gradad.evaluation import figures, metrics, report
from gradad.evaluation.metrics import (
    aupr,
    auroc,
    best_f1,
    compute_metrics,
    f1_at_threshold,
    per_class_metrics,
    pixel_aupr,
    pixel_auroc,
    pro_auc,
)


# ---------------------------------------------------------------------------------------------------- AUROC / AUPR
def test_auroc_aupr_known_tiny_case():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert auroc(y, s) == pytest.approx(0.75)
    # thresholds 0.8: P=1, R=.5 ; 0.35: P=2/3, R=1 -> AP = .5*1 + .5*2/3
    assert aupr(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert aupr(y, s) == pytest.approx(average_precision_score(y, s))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_aupr_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.random(n) < 0.3
    s = np.round(rng.normal(size=n) + y * 0.7, 1)  # rounding -> many ties, also across classes
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # integer scores (heavy ties) and int labels
    si = rng.integers(0, 4, n)
    assert auroc(y.astype(int), si) == pytest.approx(roc_auc_score(y, si), abs=1e-12)
    assert aupr(y.astype(int), si) == pytest.approx(average_precision_score(y, si), abs=1e-12)


def test_single_class_returns_nan():
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))
    assert math.isnan(aupr([0, 0, 0], [0.1, 0.2, 0.3]))
    assert aupr([1, 1], [0.1, 0.2]) == 1.0  # as sklearn
    assert math.isnan(pixel_auroc(np.zeros((2, 3, 3), bool), np.random.rand(2, 3, 3)))
    assert all(math.isnan(v) for v in best_f1([0, 0], [0.3, 0.4]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError):
        auroc([0, 2], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 16, 16), bool)
    for i in range(0, 6, 2):
        y0, x0 = rng.integers(0, 10, 2)
        masks[i, y0:y0 + 5, x0:x0 + 4] = True
    maps = (rng.random((6, 16, 16)) + masks * 0.4).astype(np.float32)
    maps = np.round(maps * 20) / 20  # ties
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_aupr(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # list input with None for defect-free images gives the same numbers
    mlist = [m if m.any() else None for m in masks]
    assert pixel_auroc(mlist, list(maps)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # (N,1,H,W) maps
    assert pixel_aupr(masks, maps[:, None]) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_pixel_metrics_images_of_different_sizes():
    rng = np.random.default_rng(7)
    maps = [rng.random((8, 10)), rng.random((5, 7))]
    masks = [np.zeros((8, 10), bool), np.zeros((5, 7), bool)]
    masks[1][1:3, 2:5] = True
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# ---------------------------------------------------------------------------------------------------- PRO
def _hand_pro_case():
    """Two 4x4 images, values in {0, 0.5, 1} so that 3 thresholds are exactly 0, 0.5, 1."""
    masks = np.zeros((2, 4, 4), bool)
    maps = np.zeros((2, 4, 4), np.float64)
    # image A: region R1 = 2x2 block (4 px) with values 1, 1, 1, 0
    masks[0, 0:2, 0:2] = True
    maps[0, 0:2, 0:2] = [[1, 1], [1, 0]]
    # image A normals (12 px): one at 1.0, eleven at 0.5
    maps[0][~masks[0]] = 0.5
    maps[0, 3, 3] = 1.0
    # image B: region R2 = two diagonal pixels (one region with 8-connectivity) with values 1, 0.5
    masks[1, 0, 0] = masks[1, 1, 1] = True
    maps[1, 0, 0], maps[1, 1, 1] = 1.0, 0.5
    # image B normals (14 px): one at 0.5, thirteen at 0
    maps[1, 3, 3] = 0.5
    return masks, maps


def test_pro_hand_computed():
    masks, maps = _hand_pro_case()
    # Normal pixels: 26 in total -> 1 at 1.0, 12 at 0.5, 13 at 0.
    # Thresholds (3, evenly spaced in [0, 1]) = 0, 0.5, 1; a pixel counts when value >= t.
    #   t=1  : R1 3/4, R2 1/2 -> PRO = (0.75 + 0.5) / 2 = 0.625 ; FPR = 1/26
    #          (pixel-weighted would be 4/6; 4-connectivity (R2 split in two) would give (0.75+1+0)/3)
    #   t=0.5: R1 3/4, R2 2/2 -> PRO = 0.875                    ; FPR = 13/26 = 0.5
    #   t=0  : PRO = 1                                          ; FPR = 1
    # Curve anchored at (0, 0): (0,0) -> (1/26, .625) -> (.5, .875) -> (1, 1).
    # Area up to FPR 0.3 with the curve interpolated at 0.3, then divided by 0.3:
    f1 = 1 / 26
    p_at_03 = 0.625 + (0.3 - f1) / (0.5 - f1) * (0.875 - 0.625)
    area = f1 * (0 + 0.625) / 2 + (0.3 - f1) * (0.625 + p_at_03) / 2
    expected = area / 0.3
    assert pro_auc(masks, maps, fpr_limit=0.3, num_thresholds=3) == pytest.approx(expected, abs=1e-12)

    th, fpr, pro = metrics.pro_curve(masks, maps, num_thresholds=3)
    np.testing.assert_allclose(th, [0, 0.5, 1])
    np.testing.assert_allclose(fpr, [1, 0.5, 1 / 26])
    np.testing.assert_allclose(pro, [1, 0.875, 0.625])
    # whole curve (limit 1): add the trapezoids (.5,.875)->(1,1)
    full = f1 * 0.625 / 2 + (0.5 - f1) * (0.625 + 0.875) / 2 + 0.5 * (0.875 + 1) / 2
    assert pro_auc(masks, maps, fpr_limit=1.0, num_thresholds=3) == pytest.approx(full, abs=1e-12)


def test_pro_perfect_random_and_degenerate():
    rng = np.random.default_rng(0)
    masks = np.zeros((10, 32, 32), bool)
    for i in range(0, 10, 2):
        y0, x0 = rng.integers(0, 24, 2)
        masks[i, y0:y0 + 6, x0:x0 + 8] = True
        masks[i, 1:3, 1:3] = True
    assert pro_auc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    perfect = rng.random(masks.shape) * 0.5 + masks * 0.5 + 1e-3  # defects all above normals
    assert pro_auc(masks, perfect) == pytest.approx(1.0)
    rand = pro_auc(masks, rng.random(masks.shape))
    assert 0.10 < rand < 0.20  # PRO ~ FPR -> area 0.3^2/2, normalised 0.15
    inverted = pro_auc(masks, 1.0 - masks.astype(np.float32))
    assert inverted == pytest.approx(0.0)
    assert math.isnan(pro_auc(np.zeros((2, 8, 8), bool), rng.random((2, 8, 8))))  # no regions
    # constant map: a single threshold, every pixel positive -> curve (0,0)->(1,1), PRO == FPR
    assert pro_auc(masks, np.zeros(masks.shape)) == pytest.approx(0.15)


# ---------------------------------------------------------------------------------------------------- F1
def test_best_f1_known_case():
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    # t=0.35 -> predicted {0.9, 0.8, 0.4, 0.35}: tp=3 fp=1 fn=0 -> F1 = 6/7 (best)
    f1, t = best_f1(y, s)
    assert f1 == pytest.approx(6 / 7)
    assert t == pytest.approx(0.35)
    assert f1_at_threshold(y, s, 0.35) == pytest.approx(6 / 7)
    assert f1_at_threshold(y, s, 0.8) == pytest.approx(0.8)  # tp=2 fp=0 fn=1
    assert f1_at_threshold(y, s, 5.0) == 0.0


def test_best_f1_matches_bruteforce():
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.4
    s = np.round(rng.normal(size=60) + y, 1)
    f1, t = best_f1(y, s)
    brute = max(f1_score(y, s >= v) for v in np.unique(s))
    assert f1 == pytest.approx(brute)
    assert f1_at_threshold(y, s, t) == pytest.approx(f1)


# ---------------------------------------------------------------------------------------------------- aggregates
def _small_dataset():
    rng = np.random.default_rng(1)
    n = 12
    classes = ["a"] * 6 + ["b"] * 6
    defects = ["good", "good", "scratch", "scratch", "hole", "hole"] + ["good"] * 6  # class b: no defects
    labels = np.array([d != "good" for d in defects])
    masks = np.zeros((n, 16, 16), bool)
    for i in np.flatnonzero(labels):
        masks[i, 4:9, 3:10] = True
    maps = rng.random((n, 16, 16)).astype(np.float32) + masks * 0.6
    scores = maps.reshape(n, -1).max(1)
    return classes, defects, labels, scores, masks, maps


def test_compute_metrics_keys():
    _, _, labels, scores, masks, maps = _small_dataset()
    m = compute_metrics(labels, scores)
    assert set(m) >= {"image_auroc", "image_aupr", "n_images", "n_anomalous"}
    assert "pixel_auroc" not in m
    m = compute_metrics(labels, scores, masks, maps, threshold=1.0)
    for k in ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "pro", "image_f1"):
        assert k in m
    assert m["n_images"] == 12 and m["n_anomalous"] == 4
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_per_class_metrics():
    classes, defects, labels, scores, masks, maps = _small_dataset()
    res = per_class_metrics(classes, defects, labels, scores, masks, maps)
    assert list(res) == ["a", "b", "mean"]
    a = res["a"]
    assert a["image_auroc"] == pytest.approx(roc_auc_score(labels[:6], scores[:6]))
    assert math.isnan(res["b"]["image_auroc"])  # class without defects
    assert math.isnan(res["b"]["pro"])
    # mean skips nan -> equals class a's value
    assert res["mean"]["image_auroc"] == pytest.approx(a["image_auroc"])
    assert math.isnan(res["b"]["pixel_auroc"])  # no defect pixels in class b
    assert res["mean"]["pixel_auroc"] == pytest.approx(a["pixel_auroc"])
    assert res["mean"]["n_images"] == 12 and res["mean"]["n_classes"] == 2
    assert set(a["by_defect"]) == {"scratch", "hole"}
    idx = [0, 1, 2, 3]  # good + scratch images of class a
    assert a["by_defect"]["scratch"]["image_auroc"] == pytest.approx(roc_auc_score(labels[idx], scores[idx]))
    assert a["by_defect"]["scratch"]["n_images"] == 4
    assert "by_defect" in res["b"] and res["b"]["by_defect"] == {}
    # without pixel data
    res2 = per_class_metrics(classes, None, labels, scores)
    assert "pro" not in res2["a"] and "by_defect" not in res2["a"]


def test_metrics_module_has_no_heavy_imports():
    code = (
        "import sys; import gradad.evaluation.metrics, gradad.evaluation.report, gradad.evaluation.figures; "
        "bad = [m for m in ('torch', 'sklearn', 'scipy', 'timm') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------- report
def test_write_results(tmp_path):
    classes, defects, labels, scores, masks, maps = _small_dataset()
    per_class = per_class_metrics(classes, defects, labels, scores, masks, maps)
    results = {
        "command": "grad-eval --data demo",
        "timing": {"total_s": 1.23456789},
        "config": {"backbone": "efficientnet_lite0", "size": (256, 256)},
        "per_class": per_class,
    }
    jp, mp = report.write_results(results, tmp_path / "out", "demo_eval")
    assert jp.name == "demo_eval.json" and mp.name == "demo_eval.md"
    text = jp.read_text()
    assert "NaN" not in text
    data = json.loads(text)  # strict JSON
    assert data["per_class"]["b"]["image_auroc"] is None  # nan -> null
    assert data["timing"]["total_s"] == pytest.approx(1.23457)
    assert data["config"]["size"] == [256, 256]
    md = mp.read_text()
    assert "grad-eval --data demo" in md
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table_rows[0].startswith("| Class | Image AUROC | Image AUPR | Pixel AUROC | Pixel AUPR | PRO |")
    body = [ln.split("|")[1].strip() for ln in table_rows[1:]]
    assert body[:3] == ["a", "b", "**mean**"]
    a_row = table_rows[1]
    assert f"{100 * per_class['a']['image_auroc']:.1f}" in a_row
    assert "–" in table_rows[2]  # nan for class b
    assert "scratch" in md  # per-defect table


def test_markdown_table_rows():
    pc = {"x": {"image_auroc": 0.9876, "image_aupr": 0.5, "pixel_auroc": float("nan"), "pro": 1.0},
          "mean": {"image_auroc": 0.9876, "image_aupr": 0.5, "pro": 1.0}}
    lines = report.markdown_table(pc).strip().splitlines()
    assert len(lines) == 4
    assert lines[2] == "| x | 98.8 | 50.0 | – | – | 100.0 |"
    assert lines[3].startswith("| **mean** | **98.8** |")


# ---------------------------------------------------------------------------------------------------- figures
def test_overlay_figure(tmp_path):
    rng = np.random.default_rng(0)
    h, w = 64, 80
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[10:30, 20:50] = True
    amap = rng.random((32, 40)).astype(np.float32)  # smaller map: resized to the image
    p = figures.save_overlay_figure(tmp_path / "sub" / "fig.png", img, mask, amap, title="bottle / broken_large",
                                    vmin=0.0, vmax=1.0)
    out = cv2.imread(str(p), cv2.IMREAD_COLOR)
    assert out.shape == (h + figures.TITLE_BAR_HEIGHT, 3 * w, 3)
    rgb = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    body = rgb[figures.TITLE_BAR_HEIGHT:]
    np.testing.assert_array_equal(body[:, :w], img)  # first panel: the image itself
    gt = body[:, w:2 * w]
    assert (gt[10, 20:50] == [0, 255, 0]).all()  # green contour on the region's top edge
    assert (rgb[: figures.TITLE_BAR_HEIGHT] < 128).any()  # title text drawn
    # no mask, own min/max
    p2 = figures.save_overlay_figure(tmp_path / "fig2.png", img, None, amap)
    assert cv2.imread(str(p2)).shape == (h + figures.TITLE_BAR_HEIGHT, 3 * w, 3)


def test_heatmap_overlay():
    img = np.full((10, 12, 3), 100, np.uint8)
    amap = np.zeros((10, 12), np.float32)
    amap[:, 6:] = 1.0
    ov = figures.heatmap_overlay(img, amap, 0.0, 1.0, alpha=0.5)
    assert ov.shape == img.shape and ov.dtype == np.uint8
    # JET: 0 -> dark blue, 1 -> dark red (RGB order)
    assert ov[0, 0, 2] > ov[0, 0, 0] and ov[0, 11, 0] > ov[0, 11, 2]
    bgr = figures.heatmap_overlay(img, amap, 0.0, 1.0, channel_order="bgr")
    np.testing.assert_array_equal(bgr[..., ::-1], ov)
    assert np.array_equal(figures.heatmap_overlay(img, amap, alpha=0.0), img)


def test_f1_images_leave_images_out_of_the_threshold_f1_only() -> None:
    """The images a threshold was fitted on are left out of its F1, per class and per defect type; every other
    metric still scores them and the mean counts them."""
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.6])  # image 0: a good image above the threshold
    keep = np.array([False, True, True, True, True, True])
    out = per_class_metrics(["a"] * 4 + ["b"] * 2, ["good", "good", "x", "x", "good", "x"], labels, scores,
                            threshold=0.5, f1_images=keep)
    assert out["a"]["image_f1"] == pytest.approx(1.0) and out["a"]["n_left_out_of_f1"] == 1
    assert out["a"]["by_defect"]["x"]["image_f1"] == pytest.approx(1.0)
    assert out["a"]["image_auroc"] == per_class_metrics(["a"] * 4, None, labels[:4], scores[:4])["a"]["image_auroc"]
    assert out["mean"]["n_left_out_of_f1"] == 1 and out["mean"]["image_f1"] == pytest.approx(1.0)
    assert compute_metrics(labels[:4], scores[:4], threshold=0.5)["image_f1"] == pytest.approx(0.8)
    assert np.isnan(compute_metrics(labels[:1], scores[:1], threshold=0.5, f1_images=[False])["image_f1"])


def test_operating_point_counts_rates_and_left_out_images() -> None:
    """score >= threshold flags: 1 of 3 goods and 2 of 3 defects here; images outside ``f1_images`` are not
    counted; a rate without images of its kind is nan."""
    from gradad.evaluation.metrics import operating_point

    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.2, 0.5, 0.9, 0.3])
    op = operating_point(labels, scores, 0.5)
    assert (op["n_false_alarms"], op["n_good_scored"], op["n_detected"], op["n_defective_scored"]) == (1, 3, 2, 3)
    assert op["image_false_alarm_rate"] == pytest.approx(1 / 3) and op["image_recall"] == pytest.approx(2 / 3)
    out = compute_metrics(labels, scores, threshold=0.5, f1_images=np.array([1, 0, 1, 1, 1, 1], bool))
    assert (out["n_false_alarms"], out["n_good_scored"]) == (0, 2) and out["image_false_alarm_rate"] == 0.0
    assert math.isnan(operating_point(labels[:3], scores[:3], 0.5)["image_recall"])
    assert "image_recall" not in compute_metrics(labels, scores)  # no threshold, no operating point


def _brute_force_pro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """PRO by definition: every distinct map value a threshold, each region counted on its own."""
    regions = []  # (image, region mask)
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [(i, lab == r) for r in range(1, n)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = (maps[normal] >= t).sum() / normal.sum()
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    x, y = np.array(points).T
    k = np.searchsorted(x, limit)
    y_limit = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
    xs, ys = np.r_[x[:k], limit], np.r_[y[:k], y_limit]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / limit)


def test_pro_is_exact_where_an_evenly_spaced_grid_of_thresholds_is_not():
    """One hot spot far above every other value left the 200-threshold grid a single step below FPR 0.3, so
    PRO came out far too low; the exact curve does not care."""
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 24, 24), bool)
    masks[1, 4:9, 5:12] = True
    masks[3, 15:20, 2:6] = True
    masks[3, 2:4, 18:22] = True
    masks[5, 10:13, 10:13] = True
    maps = (rng.random(masks.shape) + 1.5 * masks).astype(np.float32)
    maps[2, 12, 12] = 1000.0  # a hot spot on a good image
    exact = _brute_force_pro(masks, maps, 0.3)
    assert pro_auc(masks, maps) == pytest.approx(exact, abs=1e-12)
    assert pro_auc(masks, maps, num_thresholds=200) < exact - 0.2  # the grid's error this replaces
    labels = masks.any(axis=(1, 2)).astype(int)  # what every report computes is the exact one too
    reported = per_class_metrics(["part"] * 6, None, labels, maps.max(axis=(1, 2)), masks, maps)
    assert reported["part"]["pro"] == pytest.approx(exact, abs=1e-12)
    fpr, pro = metrics.pro_points(masks, maps)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_pixel_metrics_refuse_maps_transposed_against_their_masks():
    masks = np.zeros((3, 8, 16), bool)
    masks[:, 2:4, 5:9] = True
    maps = np.random.default_rng(0).random((3, 16, 8)).astype(np.float32)  # same pixel count, other shape
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc_aupr(masks, maps)
    assert metrics.pixel_auroc_aupr(masks, masks.astype(np.float32)[:, None]) == (1.0, 1.0)  # (N,1,H,W) maps ok
