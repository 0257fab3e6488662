"""grad-calibrate's view of the trade-off it makes: the far rule at the other usual false-alarm targets, and a
warning naming the good images a threshold rests on when they score far above the others (on MTD one over-exposed
good tile set its class threshold 34 % above the next good score: recall at that threshold 29 %)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fakes.calibration import MeanBackend, grey_images
from gradad.calibration.calibrate import calibrate, calibration_table
from gradad.calibration.thresholds import (OUTLIER_MIN_IMAGES, CalibrationConfig, far_alternatives, far_threshold,
                                           outlying_goods)

SPREAD = list(range(20, 120, 4))  # 25 good parts scoring 20 ... 116


def test_far_alternatives_list_only_targets_that_change_the_threshold() -> None:
    scores = np.arange(1.0, 32.0)  # 31 scores: 1 % and 2 % both allow 0 above, 5 % one, 10 % three
    alts = far_alternatives(scores, 0.01)
    assert list(alts) == [0.05, 0.1]
    assert alts[0.05] == far_threshold(scores, 0.05) == (30.0, 1)
    assert alts[0.1] == (28.0, 3)
    assert list(far_alternatives(scores, 0.1)) == [0.01, 0.05]  # 2 % allows as many above as 1 %: listed once


def test_outlying_goods_are_the_few_far_above_the_spread() -> None:
    scores = np.r_[np.arange(1.0, 31.0), 100.0, 90.0]
    assert outlying_goods(scores, 90.0).tolist() == [30, 31]  # highest first
    assert outlying_goods(scores, 100.0).tolist() == [30, 31]  # every outlier: the rest must be free of them
    assert outlying_goods(scores, 25.0).size == 0  # set by the spread: the outliers above it do not set it
    assert outlying_goods(np.arange(1.0, 31.0), 30.0).size == 0  # a threshold set by the spread itself
    few = np.r_[np.arange(1.0, OUTLIER_MIN_IMAGES - 1.0), 100.0]
    assert outlying_goods(few, 100.0).size == 0  # too few scores to tell an outlier
    tied = np.r_[np.ones(23), 1.0001, 1.0002]
    assert outlying_goods(tied, 1.0002).size == 0  # tied scores: a hair above the median is no outlier


def test_a_threshold_set_by_one_unusual_good_image_names_it(tmp_path: Path) -> None:
    files = grey_images(tmp_path / "good", [*SPREAD, 250])
    cal = calibrate(MeanBackend(), tmp_path / "good")
    hits = [w for w in cal.warnings if "scoring far above the others" in w]
    assert len(hits) == 1
    assert str(files[-1]) in hits[0] and "is set by 1 good image(s)" in hits[0]
    # the threshold the rest give: their highest score (1 % of 25 allows none above)
    from gradad.calibration.calibrate import score_images

    without = score_images(MeanBackend(), files[:-1])[0].max()
    assert f"Without them the threshold would be {without:.4f}" in hits[0]
    # the other targets are in the table, with how many good images each lets above
    table = calibration_table(cal)
    assert "other false-alarm targets (--false-alarm-rate): 5% -> " in table and "(1 good above)" in table
    assert [o["target"] for o in cal.rules["far"]["other_targets"]] == [0.05, 0.1]


def test_no_warning_when_the_goods_spread_sets_the_threshold(tmp_path: Path) -> None:
    grey_images(tmp_path / "good", SPREAD)
    cal = calibrate(MeanBackend(), tmp_path / "good")
    assert not any("scoring far above" in w for w in cal.warnings)


def test_with_defects_the_other_targets_carry_their_recall(tmp_path: Path) -> None:
    grey_images(tmp_path / "good", SPREAD)
    grey_images(tmp_path / "bad", [100, 110, 200, 210])
    cal = calibrate(MeanBackend(), tmp_path / "good", tmp_path / "bad")
    others = cal.rules["far"]["other_targets"]
    assert all(o["recall"] is not None for o in others)
    assert "recall 100.0%" in calibration_table(cal) or "recall 75.0%" in calibration_table(cal)


def test_per_class_thresholds_name_their_own_outliers(tmp_path: Path) -> None:
    outlier = grey_images(tmp_path / "a", [*SPREAD, 250])[-1]
    grey_images(tmp_path / "b", [v + 102 for v in SPREAD])  # other levels: not dropped as copies of a's
    bundle = SimpleNamespace(classes=["a", "b"], data_root=None, training_data={}, calibration=None)
    cal = calibrate(MeanBackend(), [tmp_path / "a", tmp_path / "b"], bundle=bundle)
    hits = [w for w in cal.warnings if "scoring far above the others" in w]
    assert len(hits) == 1 and hits[0].startswith("class a: the image threshold") and str(outlier) in hits[0]
    assert cal.classes["a"]["other_targets"] and cal.classes["b"]["other_targets"]
    assert "class a: image threshold" in calibration_table(cal) and "; other targets: 5% -> " in calibration_table(cal)


@pytest.mark.parametrize("rate", [0.05, 0.1])
def test_a_target_that_leaves_the_outlier_above_is_not_warned_about(tmp_path: Path, rate: float) -> None:
    grey_images(tmp_path / "good", [*SPREAD, 250])
    cal = calibrate(MeanBackend(), tmp_path / "good", config=CalibrationConfig(false_alarm_rate=rate))
    assert cal.rules["far"]["good_above"] >= 1
    assert not any("scoring far above" in w for w in cal.warnings)


def test_results_page_names_each_class_threshold_the_f1_is_at() -> None:
    """A bundle calibrated class by class: the page's F1 note names the class thresholds, not the one threshold
    the bundle also holds (which grad-bench does not score at then)."""
    from gradad.benchmarks.report_page import accuracy_notes

    row = {"label": "GRAD edge · ONNX Runtime CPU FP32", "method": "grad", "backend": "onnxruntime",
           "precision": "fp32", "per_class": {"mean": {"image_auroc": 0.9}},
           "f1": {"kind": "calibrated threshold", "threshold": 46.79, "class_thresholds": {"b": 30.34, "a": 62.82}}}
    result = {"rows": [row], "calibration": {"threshold": 46.79, "method": "far",
                                             "data": {"n_good": 102, "good_dirs": ["ga", "gb"]}}}
    note = accuracy_notes(result)[0]
    assert "each class's own calibrated threshold (a 62.82, b 30.34" in note and "46.79" not in note
    del row["f1"]["class_thresholds"]
    assert "the bundle's calibrated threshold 46.79" in accuracy_notes(result)[0]


def test_several_outliers_are_all_named_and_the_rest_is_free_of_them(tmp_path: Path) -> None:
    """Three unusual goods among 63 and a 1 % target: the threshold is the highest; all three are named and the
    threshold without them comes from the ordinary goods (naming only those at the threshold left the others in
    'the rest', whose threshold was again an outlier's)."""
    from gradad.calibration.calibrate import score_images

    ordinary = list(range(20, 140, 2))
    files = grey_images(tmp_path / "good", [*ordinary, 236, 244, 252])
    cal = calibrate(MeanBackend(), tmp_path / "good")
    (hit,) = [w for w in cal.warnings if "far above the others" in w]
    assert "is set by 3 good image(s)" in hit
    without = score_images(MeanBackend(), files[:len(ordinary)])[0].max()
    assert f"Without them the threshold would be {without:.4f}" in hit


def test_tied_top_scores_give_one_other_target_per_threshold() -> None:
    scores = np.r_[np.arange(1.0, 91.0), np.full(10, 95.0)]  # 100 scores, the top ten tied
    assert far_threshold(scores, 0.01) == (95.0, 0)
    assert list(far_alternatives(scores, 0.01)) == [0.1]  # 2 % and 5 % would repeat 95.0


def test_the_bundle_threshold_of_a_unified_calibration_is_checked_too(tmp_path: Path) -> None:
    """grad-run without --class runs at the bundle's one threshold: an outlier that sets it is named for it too."""
    grey_images(tmp_path / "a", [*SPREAD, 250])
    grey_images(tmp_path / "b", [v + 2 for v in SPREAD])  # the same spread: the outlier stands out of both
    bundle = SimpleNamespace(classes=["a", "b"], data_root=None, training_data={}, calibration=None)
    cal = calibrate(MeanBackend(), [tmp_path / "a", tmp_path / "b"], bundle=bundle)
    assert cal.classes["b"]["n_good"] == len(SPREAD)
    hits = [w for w in cal.warnings if "far above the others" in w]
    assert [h.split(" 2")[0] for h in hits] == ["the image threshold", "class a: the image threshold"]
