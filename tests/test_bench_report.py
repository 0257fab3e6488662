"""The results page is made from the JSON files alone: tables, ratios, prose driven by the numbers, plot."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
from click.testing import CliRunner

from cli_helpers import one_error_line
from gradad.benchmarks.cli import main


def _metrics(image_auroc: float, pro: float) -> dict:
    m = {"image_auroc": image_auroc, "image_aupr": 0.9, "pixel_auroc": 0.8, "pixel_aupr": 0.3, "pro": pro,
         "image_best_f1": 0.85, "n_images": 10, "n_anomalous": 5}
    return {**m, "by_defect": {"crack": {**m, "pro": pro - 0.2}, "hole": dict(m)}}


def _acc_row(label: str, method: str, backend: str, image_auroc: float, pro: float) -> dict:
    per_class = {"tile": _metrics(image_auroc, pro), "mean": _metrics(image_auroc, pro)}
    return {"label": label, "method": method, "preset": "edge", "backend": backend, "precision": "fp32",
            "device": "cpu", "per_class": per_class, "seconds_per_image": 0.01,
            "f1": {"kind": "oracle (best F1 over thresholds)", "mean": 0.85},
            "memory_bank": [100, 152], "config": {"coreset_ratio": 0.01}, "fit_seconds": 3.0}


def _lat_row(label: str, method: str, backend: str, precision: str, total_ms: float) -> dict:
    stages = {s: {"p50": total_ms / 4, "p95": total_ms / 3, "p99": total_ms / 2} for s in
              ("decode", "preprocess", "inference", "postprocess")}
    stages["total"] = {"p50": total_ms, "p95": total_ms * 1.1, "p99": total_ms * 1.2, "min": total_ms / 2}
    b1 = {"batch": 1, "fps": 1000 / total_ms, "latency_ms": stages, "iterations": 5, "images": 5}
    return {"label": label, "method": method, "preset": "edge", "backend": backend, "precision": precision,
            "device": "cpu", "by_batch": [b1], "batch1": b1, "best_batch": 1, "best_fps": 1000 / total_ms,
            "peak_rss_mb": 300.0, "complexity": {"gflop_total": 2.7, "params_m": 8.9},
            "load_average_1min": [0.5, 5.0 if method == "patchcore" else 1.0]}


def _write(folder: Path) -> None:
    accuracy = {"kind": "accuracy", "name": "tiles", "command": "grad-bench accuracy --data tiles",
                "dataset": {"root": "tiles", "name": "tiles", "classes": ["tile"], "n_test_images": 10,
                            "n_anomalous": 5},
                "calibration": None, "skipped": [{"label": "GRAD edge · tensorrt", "reason": "no TensorRT"}],
                "rows": [_acc_row("GRAD edge · ONNX Runtime CPU FP32", "grad", "onnxruntime", 0.90, 0.70),
                         _acc_row("PatchCore 1% coreset", "patchcore", "pytorch", 0.95, 0.70),
                         _acc_row("GRAD edge NORMAL-only", "grad_normal_only", "pytorch", 0.93, 0.75)]}
    latency = {"kind": "latency", "name": "cpu", "command": "grad-bench latency --preset edge",
               "environment": {"cpu_model": "Test CPU", "cpu_count": 2, "gpu": None, "python": "3", "torch": "t",
                               "onnxruntime": "o", "numpy": "n", "opencv": "c"},
               "threads": 2, "settings": {"batches": [1]}, "decode_images": {"256": "synthetic"},
               "patchcore_bank": {"rows": 100, "note": "random"}, "skipped": [],
               "rows": [_lat_row("GRAD edge · PyTorch eager", "grad", "pytorch", "fp32", 40.0),
                        _lat_row("GRAD edge · ORT FP32", "grad", "onnxruntime", "fp32", 10.0),
                        _lat_row("GRAD edge · ORT FP16", "grad", "onnxruntime", "fp16", 15.0),
                        _lat_row("PatchCore", "patchcore", "pytorch", "fp32", 50.0)]}
    for name, data in (("tiles.json", accuracy), ("cpu.json", latency)):
        (folder / name).write_text(json.dumps(data))


def test_report_page_and_plot_come_from_the_json(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "masks.json").write_text(json.dumps({"command": "python -m other.tool", "mean": {}}))
    (tmp_path / "masks.md").write_text("# other tool\n")
    (tmp_path / "prep.json").write_text(json.dumps({"kind": "preparation", "note": "how", "steps": [
        {"what": "train", "command": "grad-train --data tiles -o runs/t"}]}))
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "README.md").read_text()
    # PatchCore timed in PyTorch eager only: compared with GRAD's eager row, never with its ONNX Runtime one
    assert "1.2× faster than PatchCore on the same extractor and the same engine, PyTorch eager" in page  # 50 vs 40
    assert "1.2× faster on the fastest image of each" in page  # minimum 25 ms vs 20 ms
    assert "lower image AUROC on tiles (90.0 vs 95.0)" in page
    assert "ONNX Runtime FP32 is 4.0× faster than PyTorch eager" in page  # 40 vs 10
    assert "1.50× *slower* than FP32" in page  # FP16 15 ms vs 10 ms
    assert "NORMAL-only ablation (no abnormal grids, no stage 1) is *better*" in page
    assert "Hardest defect type" in page and "**crack**" in page
    assert "grad-bench accuracy --data tiles" in page and "grad-bench latency --preset edge" in page
    assert "no TensorRT" in page
    assert "other jobs shared the CPU" in page and "PatchCore (5.0)" in page  # only the busy row is named
    assert "Treat this ratio as unreliable" in page  # the headline says so when its rows were contended
    assert "- train: `grad-train --data tiles -o runs/t`" in page
    assert "[masks.md](masks.md)" in page and "python -m other.tool" in page  # other tools' files are linked
    image = cv2.imread(str(tmp_path / "accuracy_vs_latency.png"))
    assert image is not None and image.shape[0] > 100


def test_speed_is_compared_on_one_engine(tmp_path: Path) -> None:
    _write(tmp_path)
    latency = json.loads((tmp_path / "cpu.json").read_text())
    latency["rows"].append(_lat_row("PatchCore · ORT FP32", "patchcore", "onnxruntime", "fp32", 25.0))
    (tmp_path / "cpu.json").write_text(json.dumps(latency))
    assert CliRunner().invoke(main, ["report", str(tmp_path)]).exit_code == 0
    page = (tmp_path / "README.md").read_text()
    assert "2.5× faster than PatchCore on the same extractor and the same engine, ONNX Runtime FP32" in page
    latency["rows"][-1] = _lat_row("PatchCore · ORT FP32", "patchcore", "onnxruntime", "fp32", 8.0)
    (tmp_path / "cpu.json").write_text(json.dumps(latency))
    assert CliRunner().invoke(main, ["report", str(tmp_path)]).exit_code == 0
    assert "1.2× slower than PatchCore on the same extractor" in (tmp_path / "README.md").read_text()


def test_the_conclusion_follows_the_numbers(tmp_path: Path) -> None:
    _write(tmp_path)
    data = json.loads((tmp_path / "tiles.json").read_text())
    data["rows"][0]["per_class"]["mean"]["image_auroc"] = 0.97  # GRAD now ahead of PatchCore
    data["rows"][2]["per_class"]["mean"].update(image_auroc=0.5, pixel_auroc=0.5, pixel_aupr=0.1, pro=0.5)
    (tmp_path / "tiles.json").write_text(json.dumps(data))
    latency = json.loads((tmp_path / "cpu.json").read_text())
    latency["rows"][0] = _lat_row("GRAD edge · PyTorch eager", "grad", "pytorch", "fp32", 5.0)  # eager now faster
    (tmp_path / "cpu.json").write_text(json.dumps(latency))
    assert CliRunner().invoke(main, ["report", str(tmp_path)]).exit_code == 0
    page = (tmp_path / "README.md").read_text()
    assert "better image AUROC on tiles (97.0 vs 95.0)" in page
    assert "PyTorch eager is 2.0× faster than ONNX Runtime FP32" in page
    assert "ahead of its NORMAL-only ablation on more metrics" in page
    assert "by at least 1 point on 4 of them" in page  # the ablation's 50 % is far below on every metric


def test_corrupt_result_file_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    assert "broken.json" in one_error_line(CliRunner().invoke(main, ["report", str(tmp_path)]))


def _refine_result(class_settings: dict, class_thresholds: dict) -> dict:
    summary = {"images": 2, "coarse_iou": 0.132, "oracle_iou": 0.147, "f2pad_iou": 0.138, "coarse_dice": 0.2,
               "oracle_dice": 0.22, "f2pad_dice": 0.21, "seconds_per_image": 0.0, "iterations_mean": 0.0}
    return {"data": "/data/mvtec3d", "device": "cpu", "threads": 2, "pixel_threshold": 31.45,
            "threshold_rule": "the bundle's calibrated pixel threshold", "oracle_pixel_threshold": 20.8,
            "class_pixel_thresholds": class_thresholds, "f2pad_coarse_thresholds": {"tire": 21.21},
            "class_settings": class_settings, "config": {}, "per_class": {"tire": summary}, "per_defect": {},
            "mean": summary, "images": [{"class": "tire", "defect": "hole", "image": "/x/000.png"}] * 2}


def test_refine_sentence_names_each_class_threshold_and_says_when_f2pad_is_off() -> None:
    """A bundle calibrated class by class: the sentence gives the scored class's own calibrated pixel threshold,
    not the bundle's one; where F2PAD is off for every scored class, the gain is not called F2PAD's."""
    from gradad.benchmarks.report_page import refine_block

    text = " ".join(refine_block("tyre", _refine_result({"tire": {"use_f2pad": False}},
                                                         {"magnetic_tile": 32.42, "tire": 21.42})))
    assert "coarse threshold: each class's own calibrated pixel threshold (tire 21.42)" in text
    assert "31.45" not in text and "magnetic_tile 32.42" not in text
    assert "Refinement (F2PAD off here" in text and "F2PAD raises" not in text and "F2PAD -0.9" not in text
    assert "refined -0.9 points" in text
    assert "F2PAD's own coarse threshold per class: tire 21.21" in text
    text = " ".join(refine_block("tyre", _refine_result({"tire": {}}, {})))
    assert "F2PAD raises the mean IoU" in text and "the bundle's calibrated pixel threshold = 31.45" in text


def test_a_bundles_accuracy_is_plotted_at_its_own_latency_once(tmp_path: Path) -> None:
    """An accuracy row of a bundle pairs with that bundle's latency row (an INT8 bundle with uint8 activations is
    not plotted at another INT8 bundle's speed); without one, the preset's row of the same engine; the same bundle
    scored in two files is one point."""
    from gradad.benchmarks.report_page import classify, plot_points

    _write(tmp_path)
    files = {name: json.loads((tmp_path / name).read_text()) for name in ("tiles.json", "cpu.json")}
    int8 = {**_acc_row("GRAD edge · ORT INT8", "grad", "onnxruntime", 0.91, 0.7), "precision": "int8",
            "model": "models/u8"}
    files["tiles.json"]["rows"] += [int8, {**files["tiles.json"]["rows"][0], "model": "models/a"}]
    files["again.json"] = {**files["tiles.json"], "rows": [{**files["tiles.json"]["rows"][0], "model": "models/a"}]}
    files["bundles.json"] = {**files["cpu.json"], "rows": [
        {**_lat_row("INT8 of another bundle", "grad", "onnxruntime", "int8", 40.0), "bundle": "models/other"},
        {**_lat_row("INT8, uint8 activations", "grad", "onnxruntime", "int8", 20.0), "bundle": "models/u8"},
        {**_lat_row("today: float input", "grad", "onnxruntime", "fp32", 99.0), "path": "today"}]}
    points = plot_points(classify(files))
    ms = {(p["label"], p["auroc"]): p["ms"] for p in points}
    assert ms[("edge ORT INT8", 0.91)] == 20.0  # its own bundle's row, not the first INT8 row
    assert ms[("edge ORT FP32", 0.90)] == 10.0  # no own row: the preset's, never the "today" comparison row
    assert sum(p["label"] == "edge ORT FP32" for p in points) == 1  # models/a in two files, and no-bundle: one
