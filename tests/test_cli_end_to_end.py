"""End to end through the command lines: demo data -> grad-train (tiny) -> grad-eval, and bad inputs."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line

from gradad.evaluation.cli import main as eval_main
from gradad.training.cli import main as train_main

METRIC_KEYS = ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "pro")


def _train_args(root: Path, out: Path) -> list[str]:
    return ["--preset", "tiny", "--data", str(root), "-o", str(out / "run"), "--epochs", "1", "2",
            "--set", f"data.cache_dir={out / 'cache'}"]


def test_train_then_eval_writes_complete_metrics(tiny_demo_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(train_main, _train_args(tiny_demo_root, tmp_path))
    assert result.exit_code == 0, result.output
    model = tmp_path / "run" / "model.pt"
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_main, [str(model), "-o", str(out), "--figures", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    per_class = metrics["per_class"]
    assert set(per_class) == {"capsule", "fabric", "nut", "mean"}
    for cls, entry in per_class.items():
        for key in METRIC_KEYS:
            assert isinstance(entry[key], float) and 0.0 <= entry[key] <= 1.0, (cls, key, entry[key])
    for cls in ("capsule", "fabric", "nut"):
        assert set(per_class[cls]["by_defect"]) == {"scratch", "spot", "crack", "color"}
    md = (out / "metrics.md").read_text()
    assert "| **mean** |" in md
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 6  # 2 per class
    assert cv2.imread(str(figures[0])).shape[1] == 3 * 64


def test_good_images_only_get_the_right_next_step_not_a_table_of_dashes(tmp_path: Path, caplog) -> None:
    """The README quick start's layout (mydata/<class>/good, no defects): grad-train pointed at grad-eval, which
    printed every metric as '-' with exit 0 and no reason."""
    folder = tmp_path / "mydata" / "widget" / "good"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(90, 110, (64, 64, 3), dtype=np.uint8))
    with caplog.at_level(logging.INFO, logger="gradad.data.datasets"):
        result = CliRunner().invoke(train_main, _train_args(tmp_path / "mydata", tmp_path))
    assert result.exit_code == 0, result.output
    assert "class widget: 2 of its 10 good images (every 5th) are kept out of training" in caplog.text
    assert "evaluate with" not in result.output
    assert "no defect images in the data's test split" in result.output and "grad-calibrate" in result.output
    result = CliRunner().invoke(eval_main, [str(tmp_path / "run" / "model.pt"), "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "class widget: its test images are all good" in caplog.text
    split = tmp_path / "split.json"  # every test image left out of scoring
    split.write_text(json.dumps({"held_out": [str(p.resolve()) for p in sorted(folder.iterdir())]}))
    result = CliRunner().invoke(eval_main, [str(tmp_path / "run" / "model.pt"), "--exclude", str(split),
                                            "-o", str(tmp_path / "eval2")])
    assert result.exit_code == 2 and "no test images to evaluate on" in result.output, result.output


@pytest.mark.parametrize("command", ["grad-run", "grad-calibrate", "grad-export inspect", "grad-refine tune"])
def test_a_model_file_where_a_bundle_folder_goes_says_what_a_bundle_is(tmp_path: Path, command: str) -> None:
    from gradad.calibration.cli import main as calibrate_main
    from gradad.export.cli import main as export_main
    from gradad.refine.cli import main as refine_main
    from gradad.runtime.cli import main as run_main

    model = tmp_path / "model.pt"
    model.write_bytes(b"PK")
    args = {"grad-run": (run_main, [str(model)]), "grad-calibrate": (calibrate_main, [str(model)]),
            "grad-export inspect": (export_main, ["inspect", str(model)]),
            "grad-refine tune": (refine_main, ["tune", "--bundle", str(model), "--data", str(tmp_path)])}[command]
    result = CliRunner().invoke(*args)
    assert result.exit_code == 2
    assert "is a file, not a bundle" in result.output and "grad-export onnx MODEL.pt -o models/NAME" in result.output


def test_wrong_root_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(train_main, _train_args(tmp_path / "missing", tmp_path))
    assert "missing" in one_error_line(result)


def test_unknown_class_and_empty_class(tiny_demo_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(train_main, [*_train_args(tiny_demo_root, tmp_path), "--classes", "zebra"])
    assert "zebra" in one_error_line(result)
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root / "fabric", root / "fabric")
    for f in (root / "fabric" / "train" / "good").iterdir():
        f.unlink()
    result = CliRunner().invoke(train_main, _train_args(root, tmp_path))
    assert "fabric" in one_error_line(result)


def test_unreadable_training_image_names_the_file(tiny_demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root / "nut", root / "nut")
    bad = sorted((root / "nut" / "train" / "good").iterdir())[2]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = CliRunner().invoke(train_main, _train_args(root, tmp_path))
    assert bad.name in one_error_line(result)


def test_mask_size_mismatch_names_the_mask(trained_tiny: Path, tiny_demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root / "capsule", root / "capsule")
    mask = sorted((root / "capsule" / "ground_truth" / "spot").iterdir())[0]
    cv2.imwrite(str(mask), np.zeros((10, 12), np.uint8))
    result = CliRunner().invoke(eval_main, [str(trained_tiny), "--data", str(root), "--classes", "capsule",
                                           "-o", str(tmp_path / "e")])
    assert mask.name in one_error_line(result)


def test_missing_and_corrupt_model_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(eval_main, [str(tmp_path / "nope.pt")])
    assert "nope.pt" in one_error_line(result)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert "bad.pt" in one_error_line(CliRunner().invoke(eval_main, [str(bad)]))


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    """The installed entry point, in a real process: one line on stderr, exit code 2."""
    exe = Path(sys.executable).parent / "grad-train"
    if not exe.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(exe), "--data", str(tmp_path / "nowhere")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        line for line in proc.stderr.splitlines() if "nowhere" in line
    ]
