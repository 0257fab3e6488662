"""The F2PAD mask benchmark: IoU/DICE on hand cases and a tiny end-to-end run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from gradad.benchmarks.cli import main as bench_cli
from gradad.benchmarks.refine_masks import iou_dice
from gradad.benchmarks.report_page import write_report
from gradad.data.datasets import load_samples
from gradad.refine.bundle_files import prepare_bundle
from gradad.refine.config import RefineConfig
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


def test_benchmark_cli_writes_per_class_coarse_and_f2pad_numbers(bundle, trained_tiny, tiny_demo_root, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:6]
    images, _ = load_images(train, 64)
    prepare_bundle(copy, trained_tiny, images, RefineConfig(mog_components=2, mog_pixels=5000))
    out = tmp_path / "results"
    res = CliRunner().invoke(bench_cli, ["refine", "--bundle", str(copy), "--data", str(tiny_demo_root), "--per-defect", "1",
                                          "--set", "max_iterations=2", "--device", "cpu", "--threads", "1",
                                          "-o", str(out), "--name", "t"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "t.json").read_text())
    assert result["kind"] == "refine" and result["command"].startswith("grad-bench refine --bundle")
    n_groups = len({(s.class_name, s.defect_type) for s in load_samples(tiny_demo_root, "test") if s.label == 1})
    assert result["mean"]["images"] == n_groups == len(result["images"])
    assert set(result["per_class"]) == {"capsule", "fabric", "nut"}
    for row in result["images"]:
        assert 0.0 <= row["coarse_iou"] <= 1.0 and 0.0 <= row["f2pad_iou"] <= 1.0
        assert row["iterations"] <= 2
    assert "F2PAD IoU" in (out / "t.md").read_text()
    readme, _ = write_report(out)  # the results page renders it, sentence driven by the numbers
    gain = 100 * (result["mean"]["f2pad_iou"] - result["mean"]["coarse_iou"])
    verdict = "raises" if gain > 0.05 else "lowers" if gain < -0.05 else "keeps"
    assert f"F2PAD {verdict} the mean IoU" in readme.read_text()
