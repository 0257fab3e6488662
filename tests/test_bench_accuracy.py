"""grad-bench accuracy on the tiny demo data: PyTorch and ONNX Runtime rows agree, peer columns, F1 rules."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line
from gradad.benchmarks.cli import main
from gradad.benchmarks.report_page import write_report
from gradad.bundle import read_manifest, write_manifest
from gradad.data.datasets import load_samples

AUROC_TOLERANCE = 0.01  # ONNX Runtime vs PyTorch scores differ around the 5th digit


def _run(args: list[str]):
    return CliRunner().invoke(main, ["accuracy", *args])


@pytest.fixture(scope="module")
def full_run(tiny_demo_root: Path, trained_tiny: Path, bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench_acc")
    result = _run(["--data", str(tiny_demo_root), "--checkpoint", str(trained_tiny), "--bundle", str(bundle),
                   "--backend", "pytorch", "--backend", "onnxruntime-fp32", "--backend", "tensorrt",
                   "--backend", "onnxruntime-int8",
                   "--normal-only", str(trained_tiny), "--patchcore", "--cache-dir", str(out / "cache"),
                   "-o", str(out), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "tiny.json").read_text()), out, result


def test_pytorch_and_onnxruntime_rows_agree(full_run) -> None:
    data, _, _ = full_run
    torch_row = next(r for r in data["rows"] if r["method"] == "grad" and r["backend"] == "pytorch")
    ort_row = next(r for r in data["rows"] if r["backend"] == "onnxruntime")
    assert ort_row["precision"] == "fp32"
    classes = data["dataset"]["classes"]
    assert set(classes) == {"fabric", "nut", "capsule"}
    for cls in [*classes, "mean"]:
        for key in ("image_auroc", "pixel_auroc", "pro"):
            assert torch_row["per_class"][cls][key] == pytest.approx(ort_row["per_class"][cls][key],
                                                                     abs=AUROC_TOLERANCE), (cls, key)


def test_peer_columns_are_measured_in_the_same_run(full_run) -> None:
    data, out, result = full_run
    rows = {r["method"]: r for r in data["rows"]}
    assert {"grad", "grad_normal_only", "patchcore"} <= set(rows)
    patchcore = rows["patchcore"]
    assert patchcore["memory_bank"][1] == 152  # same extractor as GRAD edge/tiny
    assert patchcore["backbone"]["name"] == "tf_efficientnet_lite0" and patchcore["image_size"] == 64
    assert patchcore["backbone"]["mean"] == patchcore["backbone"]["std"] == [0.5, 0.5, 0.5]  # the model's own
    assert patchcore["backbone"]["exposure"] == "none" and "exposure_max_gain" not in patchcore["backbone"]
    for cls in data["dataset"]["classes"]:
        assert 0.0 <= patchcore["per_class"][cls]["image_auroc"] <= 1.0
    # --normal-only got the same checkpoint here: identical model, identical numbers.
    torch_row = next(r for r in data["rows"] if r["method"] == "grad" and r["backend"] == "pytorch")
    assert rows["grad_normal_only"]["per_class"] == torch_row["per_class"]


def test_every_row_is_compared_with_the_first_by_a_paired_bootstrap(full_run) -> None:
    data, out, _ = full_run
    first, rest = data["rows"][0], data["rows"][1:]
    assert "vs_first_row" not in first and "_paired" not in json.dumps(data)
    rows = {r["method"]: r for r in rest}
    same = rows["grad_normal_only"]["vs_first_row"]  # the same checkpoint again: no difference, no spread
    assert same["first_row"] == first["label"] and same["resamples"] == 1000
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupr"):
        for cls in [*data["dataset"]["classes"], "mean"]:
            cell = same["metrics"][metric][cls]
            assert cell["difference"] == cell["low"] == cell["high"] == 0.0, (metric, cls)
    pc = rows["patchcore"]["vs_first_row"]["metrics"]
    for metric in pc.values():
        for cell in metric.values():
            assert cell["low"] <= cell["high"] and 0.0 <= cell["share_not_above"] <= 1.0
    # the point difference is the difference of the table's numbers (pixel metrics from binned maps)
    diff = pc["image_auroc"]["mean"]["difference"]
    assert diff == pytest.approx(rows["patchcore"]["per_class"]["mean"]["image_auroc"]
                                 - first["per_class"]["mean"]["image_auroc"], abs=1e-5)  # the table rounds
    assert pc["pixel_auroc"]["mean"]["difference"] == pytest.approx(
        rows["patchcore"]["per_class"]["mean"]["pixel_auroc"] - first["per_class"]["mean"]["pixel_auroc"], abs=3e-3)
    assert "paired bootstrap interval" in (out / "tiny.md").read_text()
    assert "PatchCore" in (out / "tiny.md").read_text()
    assert data["command"].startswith("grad-bench accuracy")


def test_uncalibrated_bundle_reports_oracle_f1_and_missing_tensorrt_is_a_skip_line(full_run) -> None:
    data, _, result = full_run
    assert data["calibration"] is None
    for row in data["rows"]:
        assert row["f1"]["kind"].startswith("oracle")
        assert row["f1"]["mean"] == row["per_class"]["mean"]["image_best_f1"]
    trt = [s for s in data["skipped"] if "tensorrt" in s["label"]]
    if importlib.util.find_spec("tensorrt") is None:
        assert trt and "not importable" in trt[0]["reason"]
        assert "skipped" in result.output
        assert all(r["backend"] != "tensorrt" for r in data["rows"])
    # no model.int8.onnx in this bundle: the INT8 row is a skip line that says how to make one
    int8 = [s for s in data["skipped"] if "onnxruntime-int8" in s["label"]]
    assert int8 and "grad-export quantize" in int8[0]["reason"]
    assert all(r.get("precision") != "int8" for r in data["rows"])


def test_f1_at_calibrated_threshold(tiny_demo_root: Path, bundle: Path, tmp_path: Path) -> None:
    """Threshold (the smallest valid one) below every score: every image flagged, so per class F1 = 2A / (2A + G)."""
    calibrated = tmp_path / "bundle"
    shutil.copytree(bundle, calibrated)
    manifest = read_manifest(calibrated)
    manifest["calibration"] = {"image_threshold": 1e-12, "method": "far", "data": {"n_good": 3}}
    write_manifest(calibrated, manifest)
    result = _run(["--data", str(tiny_demo_root), "--bundle", str(calibrated), "--backend", "onnxruntime-fp32",
                   "-o", str(tmp_path), "--name", "cal"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "cal.json").read_text())
    (row,) = data["rows"]
    assert row["f1"]["kind"] == "calibrated threshold"
    samples = load_samples(tiny_demo_root, "test")
    for cls in data["dataset"]["classes"]:
        anomalous = sum(s.label for s in samples if s.class_name == cls)
        good = sum(1 - s.label for s in samples if s.class_name == cls)
        assert row["per_class"][cls]["image_f1"] == pytest.approx(2 * anomalous / (2 * anomalous + good))
        # every image flagged: every good one a false alarm, every defective one found
        m = row["per_class"][cls]
        assert (m["n_false_alarms"], m["n_good_scored"], m["n_detected"], m["n_defective_scored"]) == (
            good, good, anomalous, anomalous)
        assert m["image_false_alarm_rate"] == 1.0 and m["image_recall"] == 1.0
    # the operating-point table: one line per class with counts and 95 % bounds, in the report and the page
    report = (tmp_path / "cal.md").read_text()
    assert "At the calibrated threshold (method `far`" in report
    nut_good = sum(1 - s.label for s in samples if s.class_name == "nut")
    assert f"| nut | 1e-12 | {nut_good} / {nut_good} = 100.0% (≤ 100.0%) |" in report
    page = write_report(tmp_path)[0].read_text()
    assert "At the calibrated threshold (method `far`" in page


def test_operating_point_table_bounds_and_own_class_thresholds() -> None:
    """Counts, rates and one-sided 95 % Clopper-Pearson bounds (upper for false alarms, lower for recall); a class
    calibrated on its own shows its own threshold; no calibrated row, no table."""
    from gradad.benchmarks.accuracy import operating_point_table
    from gradad.calibration.thresholds import binomial_upper_bound

    per_class = {"a": {"n_false_alarms": 1, "n_good_scored": 50, "n_detected": 18, "n_defective_scored": 20},
                 "b": {"n_false_alarms": 0, "n_good_scored": 30, "n_detected": 0, "n_defective_scored": 0},
                 "mean": {"n_false_alarms": 1, "n_good_scored": 80}}
    row = {"label": "GRAD edge", "per_class": per_class,
           "f1": {"kind": "calibrated threshold", "threshold": 5.0, "class_thresholds": {"b": 7.25}}}
    result = {"calibration": {"method": "far", "target_false_alarm_rate": 0.01}, "rows": [row]}
    text = "\n".join(operating_point_table(result))
    assert "aimed at 1% false alarms" in text
    upper = 100 * binomial_upper_bound(1, 50)
    lower = 100 * (1 - binomial_upper_bound(2, 20))
    assert f"| GRAD edge | a | 5 | 1 / 50 = 2.0% (≤ {upper:.1f}%) | 18 / 20 = 90.0% (≥ {lower:.1f}%) |" in text
    assert "| GRAD edge | b | 7.25 | 0 / 30 = 0.0% (≤" in text and text.rstrip().endswith("| – |")
    assert "| mean |" not in text
    assert operating_point_table({"calibration": None, "rows": [row]}) == []
    older = {**row, "per_class": {"a": {"image_f1": 0.5}, "mean": {"image_f1": 0.5}}}  # written before the counts
    assert operating_point_table({"calibration": result["calibration"], "rows": [older]}) == []
    oracle = {**row, "f1": {"kind": "oracle best F1"}}
    assert operating_point_table({"calibration": result["calibration"], "rows": [oracle]}) == []


def test_f1_at_calibrated_threshold_leaves_out_the_calibration_images(tiny_demo_root: Path, bundle: Path,
                                                                       tmp_path: Path, caplog) -> None:
    """The nut good images are recorded as calibration images: the nut F1 is over its defects only (all flagged:
    F1 1), the other classes keep 2A / (2A + G); a bundle without the record gets a warning."""
    from gradad.benchmarks.accuracy import AccuracyConfig, run_accuracy

    samples = load_samples(tiny_demo_root, "test")
    calibration_goods = [str(s.image_path.resolve()) for s in samples if s.class_name == "nut" and s.label == 0]
    calibrated = tmp_path / "bundle"
    shutil.copytree(bundle, calibrated)
    manifest = read_manifest(calibrated)
    manifest["calibration"] = {"image_threshold": 1e-12, "method": "far",
                               "data": {"n_good": 3, "images": calibration_goods}}
    write_manifest(calibrated, manifest)
    cfg = dict(data_roots=[str(tiny_demo_root)], bundle=str(calibrated), backends=("onnxruntime-fp32",),
               bootstrap=0, threads=1)
    result = run_accuracy(AccuracyConfig(**cfg))
    (row,) = result["rows"]
    assert result["dataset"]["n_calibration_images_left_out_of_f1"] == len(calibration_goods)
    assert result["dataset"]["n_test_images"] == len(samples)  # every other metric still scores them
    assert row["per_class"]["nut"]["image_f1"] == pytest.approx(1.0)
    # the operating point leaves the calibration images out too: no nut good image is counted as a false alarm
    assert row["per_class"]["nut"]["n_good_scored"] == 0
    assert math.isnan(row["per_class"]["nut"]["image_false_alarm_rate"])
    for cls in ("fabric", "capsule"):
        anomalous = sum(s.label for s in samples if s.class_name == cls)
        good = sum(1 - s.label for s in samples if s.class_name == cls)
        assert row["per_class"][cls]["image_f1"] == pytest.approx(2 * anomalous / (2 * anomalous + good))
    assert "does not record its calibration images" not in caplog.text
    del manifest["calibration"]["data"]["images"]  # calibrated before the images were recorded
    write_manifest(calibrated, manifest)
    old = run_accuracy(AccuracyConfig(**cfg))
    assert "does not record its calibration images" in caplog.text
    assert old["dataset"]["n_calibration_images_left_out_of_f1"] is None


def test_missing_checkpoint_is_one_error_line(tiny_demo_root: Path, tmp_path: Path) -> None:
    result = _run(["--data", str(tiny_demo_root), "--checkpoint", str(tmp_path / "nope.pt"), "-o", str(tmp_path)])
    assert "nope.pt" in one_error_line(result)


def test_nothing_to_evaluate_is_one_error_line(tiny_demo_root: Path, tmp_path: Path) -> None:
    assert "--checkpoint" in one_error_line(_run(["--data", str(tiny_demo_root), "-o", str(tmp_path)]))


def test_patchcore_takes_the_compared_models_extractor_and_input_size(trained_tiny: Path, bundle: Path,
                                                                     tmp_path: Path) -> None:
    """PatchCore is "the same extractor" only if it uses the GRAD model's backbone, weights, normalisation and
    input size, not the edge preset's: a model trained on another backbone gets PatchCore on that backbone."""
    import torch

    from gradad.benchmarks.accuracy import AccuracyConfig, patchcore_reference

    size, backbone = patchcore_reference(AccuracyConfig([], checkpoint=str(trained_tiny)), None)
    assert size == 64 and backbone.name == "tf_efficientnet_lite0" and tuple(backbone.out_indices) == (2, 3)
    payload = torch.load(trained_tiny, map_location="cpu", weights_only=True)
    payload["config"]["backbone"].update(name="tf_efficientnet_lite2", mean=[0.1, 0.2, 0.3])
    payload["config"]["data"]["image_size"] = 96
    other = tmp_path / "lite2.pt"
    torch.save(payload, other)
    size, backbone = patchcore_reference(AccuracyConfig([], normal_only=str(other)), None)
    assert (size, backbone.name, tuple(backbone.mean)) == (96, "tf_efficientnet_lite2", (0.1, 0.2, 0.3))
    # a bundle alone: its recorded backbone, normalisation and model input size
    from gradad.bundle import Bundle

    loaded = Bundle.load(bundle)
    size, backbone = patchcore_reference(AccuracyConfig([]), loaded)
    assert size == loaded.input.model_height and backbone.name == loaded.backbone.name
    assert list(backbone.mean) == loaded.input.normalisation.mean
    assert (backbone.exposure, backbone.exposure_max_gain) == ("none", None)
    # ... and its exposure rule with its limit (a gain model's PatchCore row sees the images the model saw)
    loaded.backbone.exposure, loaded.backbone.exposure_max_gain = "gain", 2.5
    _, backbone = patchcore_reference(AccuracyConfig([]), loaded)
    assert (backbone.exposure, backbone.exposure_max_gain) == ("gain", 2.5)
    assert patchcore_reference(AccuracyConfig([]), None) == (256, None)


def test_bootstrap_zero_adds_no_comparison(tiny_demo_root: Path, trained_tiny: Path, tmp_path: Path) -> None:
    result = _run(["--data", str(tiny_demo_root), "--checkpoint", str(trained_tiny), "--backend", "pytorch",
                   "--normal-only", str(trained_tiny), "--bootstrap", "0", "-o", str(tmp_path), "--name", "nb"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "nb.json").read_text())
    assert len(data["rows"]) == 2 and not any("vs_first_row" in r or "_paired" in r for r in data["rows"])
    assert "paired bootstrap" not in (tmp_path / "nb.md").read_text()


def test_test_goods_that_are_copies_of_training_goods_are_left_out_as_grad_eval_does(
        tiny_demo_root: Path, trained_tiny: Path, tmp_path: Path) -> None:
    """A test good with the content of a good the model trained on would flatter every row: grad-bench accuracy
    leaves it out by the model file's digests, as grad-eval does, and says how many it left out."""
    from gradad.bundle import image_digest
    from gradad.training.checkpoint import read_checkpoint

    digests = set(read_checkpoint(trained_tiny)["trained_good_digests"])
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    trained = next(p for p in sorted((root / "nut" / "train" / "good").glob("*.png")) if image_digest(p) in digests)
    shutil.copy(trained, root / "nut" / "test" / "good" / "copy_of_a_training_good.png")
    n_before = len(load_samples(tiny_demo_root, "test", ["nut"]))
    result = _run(["--data", str(root), "--checkpoint", str(trained_tiny), "--backend", "pytorch", "--classes", "nut",
                   "--bootstrap", "0", "-o", str(tmp_path), "--name", "copies"])
    assert result.exit_code == 0, result.output
    dataset = json.loads((tmp_path / "copies.json").read_text())["dataset"]
    assert dataset["n_trained_goods_left_out"] == 1 and dataset["n_test_images"] == n_before
