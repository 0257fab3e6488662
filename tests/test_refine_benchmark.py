"""The F2PAD mask benchmark: IoU/DICE on hand cases and a tiny end-to-end run with both coarse baselines, tuning
images left out, and one panel per image linked from the results page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from gradad.benchmarks.cli import main as bench_cli
from gradad.benchmarks.refine_masks import iou_dice
from gradad.benchmarks.report_page import write_report
from gradad.bundle import read_manifest, write_manifest
from gradad.calibration.thresholds import pixel_threshold_f1
from gradad.data.datasets import load_samples
from gradad.bundle import Bundle
from gradad.refine.bundle_files import load_refine_parts, prepare_bundle, tuning_images, write_class_settings
from gradad.refine.cli import main as refine_cli
from gradad.refine.config import RefineConfig
from gradad.refine.tuning import labelled_arrays
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.training.features import load_images


def test_iou_dice_hand_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 px
    b[0, 1:] = True  # 3 px, overlap 2, union 4
    assert iou_dice(a, b) == pytest.approx((0.5, 2 * 2 / 6))
    assert iou_dice(a, a) == (1.0, 1.0)
    assert iou_dice(a, np.zeros_like(a)) == (0.0, 0.0)
    assert iou_dice(np.zeros_like(a), np.zeros_like(a)) == (1.0, 1.0)


def _prepared_copy(bundle, trained_tiny, root, tmp_path):
    """A copy of the tiny bundle prepared for refinement and calibrated (pixel threshold: the maps' 0.9 quantile);
    its labelled defects, their truths and maps, and the threshold."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    train = [s for s in load_samples(root, "train") if s.label == 0][:6]
    images, _ = load_images(train, 64)
    prepare_bundle(copy, trained_tiny, images, RefineConfig(mog_components=2, mog_pixels=5000))
    defects = [s for s in load_samples(root, "test") if s.label == 1]
    all_images, all_truths = labelled_arrays(defects, 64)
    backend = OnnxRuntimeBackend(copy / "model.onnx", None, 1, 8)
    _, all_maps = backend.infer_all(all_images.astype(np.float32).transpose(0, 3, 1, 2))
    calibrated = float(np.quantile(all_maps, 0.9))
    manifest = read_manifest(copy)
    manifest["calibration"] = {**(manifest.get("calibration") or {}), "image_threshold": 1.0,
                               "pixel_threshold": calibrated}
    write_manifest(copy, manifest)
    return copy, defects, all_truths, all_maps, calibrated


def _model_recording(model: Path, tmp_path: Path, key: str, sample) -> Path:
    """A copy of the model file recording ``sample`` under ``key`` (trained_defects / tuned_defects), as grad-train
    records them (resolved paths)."""
    import torch

    payload = torch.load(model, weights_only=True)
    payload[key] = [str(sample.image_path.resolve())]
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    return path


def _bench_nut(bundle_dir: Path, root: Path, tmp_path: Path) -> dict:
    """grad-bench refine of the nut class, one iteration per image, no panels: the result JSON."""
    out = tmp_path / "results"
    res = CliRunner().invoke(bench_cli, ["refine", "--bundle", str(bundle_dir), "--data", str(root), "--classes",
                                          "nut", "--set", "max_iterations=1", "--device", "cpu", "--threads", "1",
                                          "--no-panels", "-o", str(out), "--name", "t"])
    assert res.exit_code == 0, res.output
    return json.loads((out / "t.json").read_text())


def test_tune_on_a_tuning_split_uses_and_records_exactly_its_images(bundle, trained_tiny, tiny_demo_root, tmp_path):
    copy, defects, _, _, _ = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    chosen = [s for s in defects if s.class_name == "nut"][:2]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"held_out": [str(s.image_path.resolve()) for s in chosen]}))
    res = CliRunner().invoke(refine_cli, ["tune", "--bundle", str(copy), "--data", str(tiny_demo_root),
                                           "--split", str(split),
                                           "--good", str(tiny_demo_root / "nut" / "test" / "good"),
                                           "--threads", "1", "--set", "max_iterations=2",
                                           "--set", "mask_tau_images=1", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    tuning = Bundle.load(copy).refine.tuning
    assert set(tuning) == {"nut"}  # only the split's class was tuned
    assert tuning["nut"]["images"] == [str(s.image_path) for s in chosen]
    assert tuning_images(copy) == {str(s.image_path.resolve()) for s in chosen}
    # the class's own coarse threshold, from its held-out good images' maps, is stored and used
    refine = Bundle.load(copy).refine
    stored = refine.classes["nut"]["coarse_threshold"]
    assert stored > 0 and tuning["nut"]["coarse_threshold"]["value"] == stored
    assert load_refine_parts(copy).class_settings["nut"]["coarse_threshold"] == stored


def test_tune_leaves_out_defects_the_model_trained_on(bundle, trained_tiny, tiny_demo_root, tmp_path):
    """Stage 1's labelled defects (recorded in the model file) map better than new ones: not tuned on by default."""
    chosen = [s for s in load_samples(tiny_demo_root, "test") if s.label == 1 and s.class_name == "nut"][:2]
    model_path = _model_recording(trained_tiny, tmp_path, "trained_defects", chosen[0])
    copy, _, _, _, _ = _prepared_copy(bundle, model_path, tiny_demo_root, tmp_path)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"held_out": [str(s.image_path.resolve()) for s in chosen]}))
    args = ["tune", "--bundle", str(copy), "--data", str(tiny_demo_root), "--split", str(split),
            "--good", str(tiny_demo_root / "nut" / "test" / "good"), "--threads", "1", "--set", "max_iterations=2",
            "--set", "mask_tau_images=1", "--set", "device=cpu"]
    res = CliRunner().invoke(refine_cli, args)
    assert res.exit_code == 0, res.output
    tuning = Bundle.load(copy).refine.tuning["nut"]
    assert tuning["images"] == [str(chosen[1].image_path)]
    assert tuning["left_out_as_trained"] == [str(chosen[0].image_path)]
    # the benchmark never scores it either (nor the tuned image)
    result = _bench_nut(copy, tiny_demo_root, tmp_path)
    assert result["trained_images_excluded"] == 1 and result["tuning_images_excluded"] == 1
    assert not {str(s.image_path) for s in chosen} & {r["image"] for r in result["images"]}
    res = CliRunner().invoke(refine_cli, [*args, "--include-trained"])
    assert res.exit_code == 0, res.output
    assert Bundle.load(copy).refine.tuning["nut"]["images"] == [str(s.image_path) for s in chosen]


def test_benchmark_cli_reports_calibrated_and_oracle_baselines_and_panels(bundle, trained_tiny, tiny_demo_root,
                                                                           tmp_path):
    copy, defects, all_truths, all_maps, calibrated = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    tuned = str(defects[0].image_path)  # one image "used for tuning": never scored
    # a class with its own tuned coarse threshold: an F2PAD setting, never the calibrated baseline's threshold
    write_class_settings(copy, {"nut": {"coarse_threshold": 0.5 * calibrated}},
                         {defects[0].class_name: {"images": [tuned]}})
    split_held = str(defects[1].image_path)  # one image of the model's tuning split (grad-bench split): not scored
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"held_out": [str(defects[1].image_path.resolve())]}))
    out = tmp_path / "results"
    res = CliRunner().invoke(bench_cli, ["refine", "--bundle", str(copy), "--data", str(tiny_demo_root),
                                          "--exclude", str(split), "--set", "max_iterations=2", "--device", "cpu",
                                          "--threads", "1",
                                          "-o", str(out), "--name", "t"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "t.json").read_text())
    assert result["kind"] == "refine" and result["command"].startswith("grad-bench refine --bundle")
    rows = result["images"]
    assert len(rows) == len(defects) - 2 and not {tuned, split_held} & {r["image"] for r in rows}
    assert result["tuning_images_excluded"] == 2 and result["tuning_split"] == str(split)
    assert set(result["per_class"]) == {"capsule", "fabric", "nut"}
    # the two baselines, recomputed: calibrated threshold of the bundle, oracle = pixel-F1-optimal over the rows
    # result files keep 6 significant digits
    assert result["pixel_threshold"] == pytest.approx(calibrated, rel=1e-5)
    index = {str(s.image_path): i for i, s in enumerate(defects)}
    picked = [index[r["image"]] for r in rows]
    oracle, _ = pixel_threshold_f1(all_maps[picked], all_truths[picked])
    assert result["oracle_pixel_threshold"] == pytest.approx(oracle, rel=1e-5)
    assert result["f2pad_coarse_thresholds"]["nut"] == pytest.approx(0.5 * calibrated, rel=1e-5)
    assert result["f2pad_coarse_thresholds"]["fabric"] == pytest.approx(calibrated, rel=1e-5)
    assert "model input" in result["scored_at"] and "batches of up to" in result["seconds_per_image_rule"]
    for row, i in zip(rows, picked):
        assert (row["coarse_iou"], row["coarse_dice"]) == pytest.approx(iou_dice(all_maps[i] > calibrated,
                                                                                all_truths[i]), abs=1e-6)
        assert (row["oracle_iou"], row["oracle_dice"]) == pytest.approx(iou_dice(all_maps[i] >= oracle,
                                                                                all_truths[i]), abs=1e-6)
        assert 0.0 <= row["f2pad_iou"] <= 1.0 and row["iterations"] <= 2
        assert (out / row["panel"]).is_file() and row["panel"].startswith("t_panels/")
    assert result["mean"]["oracle_iou"] == pytest.approx(np.mean([r["oracle_iou"] for r in rows]), rel=1e-5)
    assert "coarse IoU (oracle)" in (out / "t.md").read_text()
    # the gains over both baselines carry a bootstrap interval over the images, overall and per class
    gains = result["iou_gain_intervals"]
    assert set(gains["groups"]) == {"mean", "capsule", "fabric", "nut"}
    for baseline, key in (("calibrated", "coarse_iou"), ("oracle", "oracle_iou")):
        cell = gains["groups"]["mean"][baseline]
        expect = np.mean([r["f2pad_iou"] - r[key] for r in rows])
        assert cell["difference"] == pytest.approx(expect, abs=1e-5)
        assert cell["low"] <= cell["difference"] <= cell["high"]
    assert "bootstrap interval over" in (out / "t.md").read_text()
    readme, _ = write_report(out)  # the results page renders it, sentence driven by the numbers, panels linked
    text = readme.read_text()
    gain = 100 * (result["mean"]["f2pad_iou"] - result["mean"]["coarse_iou"])
    verdict = "raises" if gain > 0.05 else "lowers" if gain < -0.05 else "keeps"
    assert f"F2PAD {verdict} the mean IoU" in text
    assert f"]({rows[0]['panel']})" in text


def test_tune_keeps_the_bundle_threshold_without_held_out_good_images(bundle, trained_tiny, tiny_demo_root, tmp_path):
    """Training images score lower than unseen ones: a class threshold measured on them would be too low."""
    copy, defects, _, all_maps, _ = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    # the threshold at the median of the nut defects' maps, so nut's tuning defects are flagged whatever the tiny
    # model learnt (trained after other tests changed torch's CPU settings, it can map nut below the 0.9 quantile of
    # every class's maps, and a class with nothing flagged is not tuned)
    nut = [i for i, s in enumerate(defects) if s.class_name == "nut"]
    manifest = read_manifest(copy)
    manifest["calibration"]["pixel_threshold"] = float(np.quantile(all_maps[nut], 0.5))
    write_manifest(copy, manifest)
    res = CliRunner().invoke(refine_cli, ["tune", "--bundle", str(copy), "--data", str(tiny_demo_root),
                                           "--classes", "nut", "--per-defect", "1", "--threads", "1",
                                           "--set", "max_iterations=2", "--set", "mask_tau_images=1",
                                           "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    refine = Bundle.load(copy).refine
    assert "coarse_threshold" not in refine.classes.get("nut", {})
    # the start rule was tuned too: the share of the map's peak with the best tuning IoU, a tighter start than the
    # coarse mask only when it wins by the margin
    tried = refine.tuning["nut"]["start_peak_iou"]
    assert set(tried) == {"0.0", "0.4", "0.6"}
    margin = RefineConfig().start_peak_margin
    allowed = {f: v for f, v in tried.items() if f == "0.0" or v >= tried["0.0"] + margin - 1e-4}
    assert refine.classes["nut"]["start_peak_fraction"] == float(max(allowed, key=lambda f: (allowed[f], -float(f))))
    assert refine.tuning["nut"]["coarse_threshold"]["value"] is None
    assert refine.tuning["nut"]["coarse_threshold"]["from"] == "nut training images"
    two = CliRunner().invoke(refine_cli, ["tune", "--bundle", str(copy), "--data", str(tiny_demo_root),
                                           "--good", str(tiny_demo_root / "nut" / "test" / "good")])
    assert two.exit_code != 0 and "tune one class at a time" in two.output


def test_class_settings_of_a_newer_gradad_are_ignored_with_a_warning(bundle, trained_tiny, tiny_demo_root, tmp_path,
                                                                     caplog):
    copy, _, _, _, _ = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    write_class_settings(copy, {"nut": {"lambda0": 0.01, "some_future_rule": 3}}, {"nut": {"images": []}})
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        parts = load_refine_parts(copy)
    assert parts.class_settings["nut"] == {"lambda0": 0.01}
    assert "some_future_rule unknown to this gradad" in caplog.text and "grad-refine tune" in caplog.text


def test_a_defect_whose_mask_is_empty_at_model_size_is_not_scored(bundle, trained_tiny, tiny_demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    copy, *_ = _prepared_copy(bundle, trained_tiny, root, tmp_path)
    nut = [s for s in load_samples(root, "test", ["nut"]) if s.label == 1]
    mask = cv2.imread(str(nut[0].mask_path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(nut[0].mask_path), np.zeros_like(mask))  # a defect too small to survive the resize
    out = tmp_path / "results"
    res = CliRunner().invoke(bench_cli, ["refine", "--bundle", str(copy), "--data", str(root), "--classes", "nut",
                                         "--set", "max_iterations=1", "--device", "cpu", "--threads", "1",
                                         "--no-panels", "-o", str(out), "--name", "t"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "t.json").read_text())
    assert result["empty_masks_excluded"] == 1
    assert str(nut[0].image_path) not in {r["image"] for r in result["images"]}


def test_refine_run_refuses_a_class_the_bundle_lacks_as_grad_run_does(bundle, trained_tiny, tiny_demo_root,
                                                                      tmp_path, caplog):
    from cli_helpers import one_error_line
    from gradad.bundle import check_refine_class

    copy, defects, _, _, _ = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    write_class_settings(copy, {"nut": {"lambda0": 0.01}, "fabric": {"lambda0": 0.02}}, {})
    res = CliRunner().invoke(refine_cli, ["run", str(defects[0].image_path), "--bundle", str(copy), "--class", "Nut",
                                          "--all", "-o", str(tmp_path / "out")])
    line = one_error_line(res)  # a class the bundle has but was not tuned goes ahead: tests/test_refine_cli.py
    assert "--class Nut" in line and "has the classes capsule, fabric, nut" in line
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        check_refine_class(copy, ["nut", "fabric"], None)
    assert "refining with the bundle's default settings" in caplog.text and "--class" in caplog.text


def test_retune_without_flagged_defects_drops_the_old_settings_with_their_record(bundle, trained_tiny,
                                                                                 tiny_demo_root, tmp_path):
    copy, defects, _, _, _ = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    write_class_settings(copy, {"nut": {"lambda0": 0.5}}, {"nut": {"images": ["/old/tuning/image.png"]}})
    manifest = read_manifest(copy)
    manifest["calibration"]["pixel_threshold"] = 1e6  # re-calibrated: no tuning defect is flagged any more
    write_manifest(copy, manifest)
    chosen = [s for s in defects if s.class_name == "nut"][:1]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"held_out": [str(s.image_path.resolve()) for s in chosen]}))
    res = CliRunner().invoke(refine_cli, ["tune", "--bundle", str(copy), "--data", str(tiny_demo_root),
                                          "--split", str(split), "--threads", "1", "--set", "max_iterations=2",
                                          "--set", "mask_tau_images=1", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    refine = Bundle.load(copy).refine
    assert refine.tuning["nut"]["settings"] == {} and refine.tuning["nut"]["flagged_tuning_images"] == 0
    assert "nut" not in (refine.classes or {})  # no settings left that the new record does not back
    assert "nut" not in load_refine_parts(copy).class_settings


def test_relative_tuning_paths_resolve_against_the_records_data_root(bundle, trained_tiny, tiny_demo_root,
                                                                     tmp_path, monkeypatch, caplog):
    copy, defects, _, _, _ = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    image = next(s.image_path for s in defects if s.class_name == "nut")
    relative = str(image.relative_to(tiny_demo_root))
    write_class_settings(copy, {}, {"nut": {"data": str(tiny_demo_root), "images": [relative]},
                                    "fabric": {"data": "old_root", "images": ["old_root/fabric/test/x/000.png"]}})
    monkeypatch.chdir(tmp_path)  # not the folder tuning ran in
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        found = tuning_images(copy)
    assert str(image.resolve()) in found
    assert "1 recorded F2PAD tuning image(s) do not exist" in caplog.text and "old_root/fabric" in caplog.text


def test_settings_tuned_at_another_pixel_threshold_are_warned_about(bundle, trained_tiny, tiny_demo_root, tmp_path,
                                                                    caplog):
    copy, _, _, _, calibrated = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    record = {"images": [], "coarse_threshold": {"value": None, "bundle_pixel_threshold": calibrated}}
    write_class_settings(copy, {"nut": {"lambda0": 0.01}}, {"nut": record})
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        load_refine_parts(copy)
    assert "tuned at pixel threshold" not in caplog.text
    manifest = read_manifest(copy)
    manifest["calibration"]["pixel_threshold"] = 2 * calibrated  # grad-calibrate ran again after tuning
    write_manifest(copy, manifest)
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        load_refine_parts(copy)
    assert "class nut were tuned at pixel threshold" in caplog.text and "grad-refine tune" in caplog.text
    caplog.clear()  # a class calibrated on its own is compared with its own threshold
    manifest["calibration"]["classes"] = {"nut": {"image_threshold": 1.0, "pixel_threshold": calibrated}}
    write_manifest(copy, manifest)
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        load_refine_parts(copy)
    assert "tuned at pixel threshold" not in caplog.text
    manifest["calibration"]["classes"]["nut"]["pixel_threshold"] = 3 * calibrated
    write_manifest(copy, manifest)
    write_class_settings(copy, {"nut": {"lambda0": 0.01, "coarse_threshold": 0.5}}, {"nut": record})
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        load_refine_parts(copy)
    assert "tuned at pixel threshold" not in caplog.text  # its own coarse threshold: calibration does not enter


def test_the_set_values_a_class_was_tuned_under_are_recorded_and_checked_at_run_time(bundle, trained_tiny,
                                                                                   tiny_demo_root, tmp_path, caplog):
    from gradad.refine.bundle_files import TUNED_UNDER
    from gradad.refine.cli import apply_refine_set
    from gradad.refine.refiner import Refiner

    copy, defects, _, _, _ = _prepared_copy(bundle, trained_tiny, tiny_demo_root, tmp_path)
    chosen = [s for s in defects if s.class_name == "nut"][:1]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"held_out": [str(s.image_path.resolve()) for s in chosen]}))
    manifest = read_manifest(copy)
    manifest["calibration"]["pixel_threshold"] = 1e6  # nothing flagged: the record is written, quickly
    write_manifest(copy, manifest)
    res = CliRunner().invoke(refine_cli, ["tune", "--bundle", str(copy), "--data", str(tiny_demo_root),
                                          "--split", str(split), "--threads", "1", "--set", "max_iterations=2",
                                          "--set", "mask_tau_images=1", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    assert Bundle.load(copy).refine.tuning["nut"][TUNED_UNDER] == {"max_iterations": 2, "mask_tau_images": 1,
                                                                   "device": "cpu"}
    # run time: a class tuned under max_iterations=2 refined with the default warns; tuning-only and execution
    # keys (mask_tau_images, device) never do
    write_class_settings(copy, {"nut": {"lambda0": 0.01}},
                         {"nut": {"images": [], TUNED_UNDER: {"max_iterations": 2, "mask_tau_images": 1,
                                                              "device": "cpu"}}})
    parts = load_refine_parts(copy)
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        Refiner.from_parts(parts, apply_refine_set(parts.config, ("max_iterations=2",)))
    assert "tuned with --set" not in caplog.text
    with caplog.at_level("WARNING", logger="gradad.refine.bundle_files"):
        Refiner.from_parts(parts, parts.config)
    assert "class 'nut' were tuned with --set max_iterations=2" in caplog.text
    assert "mask_tau_images" not in caplog.text and "device" not in caplog.text


def test_benchmark_never_scores_the_defects_that_selected_the_model(bundle, trained_tiny, tiny_demo_root, tmp_path):
    """The defects held out of stage 1 picked its epoch and fitted the fusion weight (``tuned_defects``): tuning may
    use them, grad-bench refine does not score them."""
    nut = [s for s in load_samples(tiny_demo_root, "test") if s.label == 1 and s.class_name == "nut"]
    model_path = _model_recording(trained_tiny, tmp_path, "tuned_defects", nut[0])
    copy, _, _, _, _ = _prepared_copy(bundle, model_path, tiny_demo_root, tmp_path)
    result = _bench_nut(copy, tiny_demo_root, tmp_path)
    assert result["trained_images_excluded"] == 1
    scored = {r["image"] for r in result["images"]}
    assert str(nut[0].image_path) not in scored and len(scored) == len(nut) - 1
