"""What grad-calibrate says about inputs that would give a wrong threshold without failing: defects of another
class, good parts given as defects, a rule that flags most good parts, folders that name no class; and where the
f1 and recall thresholds sit between the calibration scores."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fakes.calibration import MeanBackend, grey_images
from gradad.calibration.calibrate import calibrate, calibration_table, inside_gap
from gradad.calibration.thresholds import CalibrationConfig
from gradad.data.datasets import list_image_files
from gradad.errors import DatasetError


def _bundle(classes: list[str], per_class: dict | None = None) -> SimpleNamespace:
    calibration = SimpleNamespace(classes=per_class) if per_class is not None else None
    return SimpleNamespace(classes=classes, data_root=None, training_data={}, calibration=calibration)


def _scores(files: list[Path]) -> np.ndarray:
    backend = MeanBackend()
    from gradad.calibration.calibrate import score_images

    return score_images(backend, files)[0]


@pytest.mark.parametrize("method", ["f1", "recall"])
def test_f1_and_recall_thresholds_sit_in_the_middle_of_the_gap(tmp_path: Path, method: str) -> None:
    good = grey_images(tmp_path / "good", [10, 20, 30, 40, 50])
    bad = grey_images(tmp_path / "bad", [150, 160, 170, 180, 190])
    good_max, bad_min = _scores(good).max(), _scores(bad).min()
    cal = calibrate(MeanBackend(), tmp_path / "good", tmp_path / "bad", config=CalibrationConfig(method=method))
    rule = cal.rules[method]
    # just below the weakest defect, a defect weaker by a rounding step would pass as good
    assert cal.image_threshold == pytest.approx((good_max + bad_min) / 2, rel=1e-6)
    assert rule["gap"] == pytest.approx([good_max, bad_min], rel=1e-6)
    assert rule["false_alarm_rate"] == 0 and rule["recall"] == 1
    assert f"middle of the gap {good_max:.4f} - {bad_min:.4f}" in calibration_table(cal)


def test_a_threshold_with_no_score_below_stays_just_below_the_rule() -> None:
    t, gap = inside_gap(5.0, np.array([5.0, 7.0]))
    assert gap is None and t < 5.0 and t == pytest.approx(5.0)
    t, gap = inside_gap(5.0, np.array([1.0, 3.0, 5.0]))
    assert gap == [3.0, 5.0] and t == 4.0


def test_a_gap_of_one_float32_step_keeps_the_weakest_defect_flagged() -> None:
    from gradad.calibration.thresholds import rates_at

    lowers = np.float32(20.0) + np.arange(1000, dtype=np.float32) * np.float32(1e-3)
    for lower in lowers:  # a middle computed in float64 rounds onto the defect's score about half the time
        weakest = np.nextafter(lower, np.float32(np.inf))
        good, bad = np.array([10.0, lower], np.float32), np.array([weakest, 30.0], np.float32)
        t, _ = inside_gap(float(weakest), np.r_[good, bad])
        assert rates_at(t, good, bad) == {"false_alarm_rate": 0.0, "recall": 1.0}


def test_defects_of_another_class_than_the_goods_are_warned_about(tmp_path: Path) -> None:
    grey_images(tmp_path / "nut" / "test" / "good", [10, 20, 30])
    grey_images(tmp_path / "fabric" / "test" / "crack", [150, 160])
    grey_images(tmp_path / "nut" / "test" / "crack", [150, 160])
    bundle = _bundle(["fabric", "nut"])
    other = calibrate(MeanBackend(), tmp_path / "nut" / "test" / "good", tmp_path / "fabric" / "test" / "crack",
                      bundle=bundle)
    assert any("defects of class fabric" in w and "nut" in w for w in other.warnings)
    same = calibrate(MeanBackend(), tmp_path / "nut" / "test" / "good", tmp_path / "nut" / "test" / "crack",
                     bundle=bundle)
    assert not any("defects of class" in w for w in same.warnings)


def test_good_images_given_as_defects_are_warned_about(tmp_path: Path) -> None:
    good = grey_images(tmp_path / "good", [10, 20, 30])
    grey_images(tmp_path / "bad", [150])
    shutil.copy(good[1], tmp_path / "bad" / "copy_of_a_good_part.png")
    cal = calibrate(MeanBackend(), tmp_path / "good", tmp_path / "bad")
    assert any("1 of its images are also --good images" in w for w in cal.warnings)


def test_a_rule_that_flags_most_good_parts_is_warned_about(tmp_path: Path) -> None:
    grey_images(tmp_path / "good", [100, 110, 120, 130])
    grey_images(tmp_path / "bad", [10, 20, 30, 40, 50])  # "defects" that score below every good part
    cal = calibrate(MeanBackend(), tmp_path / "good", tmp_path / "bad", config=CalibrationConfig(method="f1"))
    assert cal.rules["f1"]["false_alarm_rate"] == 1.0
    assert any("flags 100% of the good calibration images" in w for w in cal.warnings)
    far = calibrate(MeanBackend(), tmp_path / "good", tmp_path / "bad", config=CalibrationConfig(method="far"))
    assert not any("of the good calibration images" in w for w in far.warnings)


def test_goods_in_a_folder_naming_no_class_are_warned_about_and_dropped_thresholds_named(tmp_path: Path) -> None:
    grey_images(tmp_path / "held_out", [10, 20, 30])
    before = {"nut": {"image_threshold": 1.0}, "fabric": {"image_threshold": 2.0}}
    cal = calibrate(MeanBackend(), tmp_path / "held_out", bundle=_bundle(["fabric", "nut"], before))
    assert cal.classes is None
    hits = [w for w in cal.warnings if "names no class" in w]
    assert len(hits) == 1 and "(fabric, nut) are replaced by one threshold" in hits[0]
    fresh = calibrate(MeanBackend(), tmp_path / "held_out", bundle=_bundle(["fabric", "nut"]))
    assert any("names no class" in w and "replaced" not in w for w in fresh.warnings)


def test_an_image_folder_with_images_only_in_subfolders_says_so(tmp_path: Path) -> None:
    grey_images(tmp_path / "test" / "crack", [10])
    grey_images(tmp_path / "test" / "spot", [10])
    with pytest.raises(DatasetError, match=r"subfolders are not searched; crack, spot hold images"):
        list_image_files(tmp_path / "test", "--defect")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"holds no images$"):
        list_image_files(tmp_path / "empty", "--defect")
