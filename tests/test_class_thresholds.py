"""Per-class thresholds of a unified bundle: grad-calibrate sets each class's own from its --good folder, grad-run
--class (or a line file's ``class:``) runs at them, F2PAD's coarse mask and grad-bench refine's baseline use them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from test_calibration_inputs import _images, _MeanBackend

from gradad.bundle import Bundle, BundleError, Calibration
from gradad.calibration.calibrate import calibrate, score_images
from gradad.calibration.cli import main as calibrate_main
from gradad.calibration.thresholds import CalibrationConfig, pixel_threshold_good_only
from gradad.errors import GradError
from gradad.runtime.cli import main as run_main
from gradad.runtime.pipeline import thresholds_from_bundle


def _two_classes(tmp_path: Path) -> tuple[list[Path], SimpleNamespace]:
    """nut goods score 10-30 (grey level), fabric goods 100-140: one threshold for both is fabric's."""
    dirs = [tmp_path / "nut" / "test" / "good", tmp_path / "fabric" / "test" / "good"]
    _images(dirs[0], [10, 20, 30])
    _images(dirs[1], [100, 120, 140])
    return dirs, SimpleNamespace(classes=["fabric", "nut"], data_root=None, training_data={})


def test_each_class_gets_the_far_threshold_of_its_own_good_images(tmp_path: Path) -> None:
    dirs, bundle = _two_classes(tmp_path)
    backend = _MeanBackend()
    cal = calibrate(backend, dirs, bundle=bundle)
    scored = {d.parts[-3]: score_images(backend, sorted(d.iterdir())) for d in dirs}
    scores = {c: v[0] for c, v in scored.items()}
    assert set(cal.classes) == {"nut", "fabric"}
    # 3 images, 1 % false alarms: no good image may lie above its class's threshold (k = 0)
    assert cal.classes["nut"]["image_threshold"] == pytest.approx(max(scores["nut"]), rel=1e-6)
    assert cal.classes["fabric"]["image_threshold"] == pytest.approx(max(scores["fabric"]), rel=1e-6)
    assert cal.image_threshold == pytest.approx(max(scores["fabric"]), rel=1e-6)  # the mix: fabric's
    for c, (_, maps, _) in scored.items():  # the good-only pixel rule on the class's own maps
        assert cal.classes[c]["pixel_threshold"] == pytest.approx(pixel_threshold_good_only(maps, 0.001), rel=1e-6)
    assert cal.classes["nut"]["n_good"] == 3 and cal.classes["nut"]["good_above"] == 0
    assert any("per-class thresholds rest on few good images (fabric 3, nut 3" in w for w in cal.warnings)


def test_no_class_thresholds_for_one_class_a_folder_of_no_class_or_a_labelled_rule(tmp_path: Path) -> None:
    dirs, bundle = _two_classes(tmp_path)
    backend = _MeanBackend()
    assert calibrate(backend, dirs, bundle=SimpleNamespace(classes=["nut"], data_root=None, training_data={})).classes is None
    assert calibrate(backend, dirs).classes is None  # no bundle: classes unknown
    other = tmp_path / "mixed"
    _images(other, [50, 60])
    assert calibrate(backend, [*dirs, other], bundle=bundle).classes is None  # "mixed" may hold either class
    bad = tmp_path / "bad"
    _images(bad, [200, 210, 220, 230, 240])
    f1 = calibrate(backend, dirs, bad, config=CalibrationConfig(method="f1"), bundle=bundle)
    assert f1.classes is None  # the f1 rule has no per-class counterpart on good images


def _calibration(**classes: tuple[float, float]) -> Calibration:
    return Calibration(10.0, 5.0, "far", date="2026-11-28",
                       classes={c: {"image_threshold": i, "pixel_threshold": p} for c, (i, p) in classes.items()}
                       or None)


def test_run_thresholds_follow_the_class(caplog: pytest.LogCaptureFixture) -> None:
    bundle = SimpleNamespace(name="b", classes=["fabric", "nut"], calibration=_calibration(nut=(4.0, 2.0)))
    assert (thresholds_from_bundle(bundle).image, thresholds_from_bundle(bundle).pixel) == (10.0, 5.0)
    nut = thresholds_from_bundle(bundle, class_name="nut")
    assert (nut.image, nut.pixel) == (4.0, 2.0) and "class nut" in nut.source
    overridden = thresholds_from_bundle(bundle, 7.0, "nut")
    assert (overridden.image, overridden.pixel, overridden.source) == (7.0, 2.0, "--threshold")
    with caplog.at_level(logging.WARNING):
        fabric = thresholds_from_bundle(bundle, class_name="fabric")
    assert (fabric.image, fabric.pixel) == (10.0, 5.0) and "no thresholds of class fabric alone" in caplog.text
    with pytest.raises(GradError, match="--class capsule: bundle b has the classes fabric, nut"):
        thresholds_from_bundle(bundle, class_name="capsule")
    bundle.calibration.classes["nut"]["image_threshold"] = float("nan")
    with pytest.raises(BundleError, match="calibration.classes.nut.image_threshold"):
        thresholds_from_bundle(bundle, class_name="nut")


def test_bundle_refuses_a_bad_class_threshold(tmp_path: Path, bundle: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    typed = Bundle.load(copy)
    typed.calibration = _calibration(nut=(4.0, -1.0))
    with pytest.raises(BundleError, match=r"calibration\.classes\.nut\.pixel_threshold"):
        typed.save()


def test_grad_run_class_runs_at_its_own_threshold(tmp_path: Path, bundle: Path, tiny_demo_root: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    classes = Bundle.load(copy).classes
    assert len(classes) > 1
    goods = [str(tiny_demo_root / c / "test" / "good") for c in classes]
    args = [str(copy), "--backend", "onnxruntime", *[a for g in goods for a in ("--good", g)]]
    result = CliRunner().invoke(calibrate_main, args)
    assert result.exit_code == 0, result.output
    cal = Bundle.load(copy).calibration
    assert set(cal.classes) == set(classes) and f"class {classes[1]}: image threshold" in result.output
    name = classes[1]
    own = cal.classes[name]["image_threshold"]
    assert own != cal.image_threshold  # the classes' good images score differently

    def thresholds(*extra: str) -> list[float]:
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}.jsonl"
        res = CliRunner().invoke(run_main, [str(copy), "--source", goods[1], "--backend", "onnxruntime",
                                            "--jsonl", str(out), *extra])
        assert res.exit_code == 0, res.output
        return sorted({round(json.loads(line)["threshold"], 4) for line in out.read_text().splitlines()})

    assert thresholds() == [round(cal.image_threshold, 4)]
    assert thresholds("--class", name) == [round(own, 4)]
    line_file = tmp_path / "line.yaml"
    line_file.write_text(f"class: {name}\n")
    assert thresholds("--config", str(line_file)) == [round(own, 4)]
    res = CliRunner().invoke(run_main, [str(copy), "--source", goods[1], "--class", "bolt", "--jsonl", ""])
    assert res.exit_code != 0 and "--class bolt" in res.output


def test_refinement_coarse_mask_uses_the_class_calibrated_threshold_unless_tuned_or_given() -> None:
    import dataclasses

    from test_refine_rules import _square_defect, _synthetic_refiner

    image, truth = _square_defect()
    amap = np.where(truth, 0.6, 0.0).astype(np.float32)  # above the bundle's 0.5, below class "high"'s 0.7
    refiner = _synthetic_refiner(max_iterations=2)
    refiner.class_pixel_thresholds = {"high": 0.7, "tuned": 0.7}
    refiner.class_configs = {"tuned": dataclasses.replace(refiner.config, coarse_threshold=0.3)}
    assert refiner.coarse_threshold("high") == 0.7 and refiner.coarse_threshold("other") == 0.5
    assert refiner.calibrated_pixel("tuned") == 0.7  # grad-bench refine's calibrated baseline for the class
    assert refiner.coarse_threshold("tuned") == 0.3  # a tuned coarse threshold is an F2PAD setting: it wins
    high, other = refiner.refine([image] * 2, [amap] * 2, ["high", "other"])
    assert not high.coarse_mask.any() and (other.coarse_mask == truth).all()
    refiner.class_configs = {"high": refiner.config}  # one tuned class: an image of unknown class is its
    assert refiner.calibrated_pixel(None) == refiner.coarse_threshold(None) == 0.7
    refiner.threshold_given = True
    assert refiner.coarse_threshold("high") == 0.5 == refiner.calibrated_pixel("high")


@pytest.fixture(scope="module")
def prepared(bundle: Path, trained_tiny: Path, tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle prepared for F2PAD, nut tuned, calibrated with thresholds of its own for nut."""
    from gradad.data.datasets import load_samples
    from gradad.refine.bundle_files import prepare_bundle, write_class_settings
    from gradad.refine.config import RefineConfig
    from gradad.training.features import load_images

    copy = tmp_path_factory.mktemp("prepared") / "bundle"
    shutil.copytree(bundle, copy)
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:6]
    prepare_bundle(copy, trained_tiny, load_images(train, 64)[0], RefineConfig(mog_components=2, mog_pixels=5000))
    write_class_settings(copy, {"nut": {"lambda0": 0.5}}, {"nut": {"images": ["a.png"]}})
    return copy


def _calibrate(bundle_dir: Path, cal: Calibration) -> None:
    typed = Bundle.load(bundle_dir)
    typed.calibration = cal
    typed.save()


def test_refine_parts_carry_the_class_pixel_thresholds(prepared: Path) -> None:
    from gradad.refine.bundle_files import load_refine_parts

    copy = prepared
    _calibrate(copy, _calibration(nut=(4.0, 2.0)))
    parts = load_refine_parts(copy)
    assert parts.class_pixel_thresholds == {"nut": 2.0}
    given = load_refine_parts(copy, 1.0)  # a threshold passed in holds for every class
    assert given.class_pixel_thresholds == {} and given.pixel_threshold_given


def test_f1_is_scored_at_each_class_own_threshold() -> None:
    from gradad.benchmarks.accuracy import _class_threshold_note
    from gradad.evaluation.metrics import per_class_metrics

    names, labels = ["a"] * 4 + ["b"] * 4, [0, 0, 1, 1] * 2
    scores = [1.0, 2.0, 3.0, 4.0, 10.0, 11.0, 12.0, 13.0]  # class b's good parts score above a's defects
    one = per_class_metrics(names, None, labels, scores, threshold=2.5)
    own = per_class_metrics(names, None, labels, scores, threshold=2.5, class_thresholds={"b": 11.5})
    assert one["a"]["image_f1"] == own["a"]["image_f1"] == 1.0
    assert one["b"]["image_f1"] == pytest.approx(2 / 3) and own["b"]["image_f1"] == 1.0
    rows = [{"f1": {"class_thresholds": {"b": 11.5, "a": 2.5}}}]
    assert "each class at its own (a 2.5, b 11.5)" in _class_threshold_note(rows)[0]
    assert _class_threshold_note([{"f1": {"kind": "oracle"}}]) == []


def test_grad_refine_run_picks_the_frames_grad_run_class_flags(prepared: Path, tiny_demo_root: Path,
                                                              tmp_path: Path) -> None:
    from gradad.refine.cli import main as refine_main

    image = sorted((tiny_demo_root / "nut" / "test").rglob("*.png"))[0]
    args = [str(image), "--bundle", str(prepared), "--backend", "onnxruntime", "--class", "nut", "--budget", "0.05",
            "--set", "max_iterations=1", "--overwrite"]

    def refined(out: str) -> bool:
        result = CliRunner().invoke(refine_main, ["run", *args, "-o", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "refine.jsonl").read_text().splitlines()[0])["refined"]

    _calibrate(prepared, _calibration(nut=(1000.0, 2.0)))  # nut's own image threshold flags nothing
    assert not refined("none")
    _calibrate(prepared, Calibration(1000.0, 5.0, "far", classes={"nut": {"image_threshold": 1e-6,
                                                                          "pixel_threshold": 1e-6}}))
    assert refined("all")  # the bundle's 1000 would flag nothing: the class's threshold picks the frame


def test_tuning_without_held_out_goods_uses_the_class_calibrated_threshold(monkeypatch) -> None:
    from test_refine_rules import _square_defect, _synthetic_refiner

    import gradad.refine.tuning as tuning

    image, truth = _square_defect()
    amap = np.where(truth, 0.6, 0.0).astype(np.float32)  # flagged at the bundle's 0.5, not at the class's 0.7
    refiner = _synthetic_refiner(max_iterations=1)
    seen: list[float] = []
    monkeypatch.setattr(tuning, "_tune_at", lambda r, i, t, m, g, threshold, f: (seen.append(threshold) or
                                                                                  ({}, {"held_out_iou": 0.0}, 0.0)))
    assert tuning.tune_class(refiner, [image], [truth], [amap], [], None, 0.7)[1] == {"flagged_tuning_images": 0}
    tuning.tune_class(refiner, [image], [truth], [amap], [], None, None)
    assert seen and set(seen) == {0.5}  # no class threshold: the bundle's
