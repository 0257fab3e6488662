"""grad-refine's command line: every output of one image at its own size, the settings each record names, option
ranges, the tuning split's warning, Ctrl-C, and the one-line errors of a missing refinement file or an ONNX file
given as the checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line
from gradad.bundle import Bundle, read_manifest, write_manifest
from gradad.data.datasets import load_samples
from gradad.refine.bundle_files import load_refine_parts, prepare_bundle, write_class_settings
from gradad.refine.cli import main as refine_cli
from gradad.refine.config import RefineConfig
from gradad.refine.tuning import labelled_arrays
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.training.features import load_images

FAST = ["--set", "max_iterations=2", "--device", "cpu", "--all"]


@pytest.fixture(scope="module")
def prepared(bundle: Path, trained_tiny: Path, tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny bundle prepared for refinement and calibrated (pixel threshold: the defect maps' 0.9 quantile), and
    the nut defect with the most pixels above it. Tests that change the bundle copy it (:func:`_copy`)."""
    copy = tmp_path_factory.mktemp("prepared") / "bundle"
    shutil.copytree(bundle, copy)
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:6]
    images, _ = load_images(train, 64)
    prepare_bundle(copy, trained_tiny, images, RefineConfig(mog_components=2, mog_pixels=5000))
    defects = [s for s in load_samples(tiny_demo_root, "test") if s.label == 1 and s.class_name == "nut"]
    arrays, _ = labelled_arrays(defects, 64)
    backend = OnnxRuntimeBackend(copy / "model.onnx", None, 1, 8)
    _, maps = backend.infer_all(arrays.astype(np.float32).transpose(0, 3, 1, 2))
    backend.close()
    threshold = float(np.quantile(maps, 0.9))
    manifest = read_manifest(copy)
    manifest["calibration"] = {**(manifest.get("calibration") or {}), "image_threshold": 1.0,
                               "pixel_threshold": threshold}
    write_manifest(copy, manifest)
    best = int(np.argmax([(m > threshold).sum() for m in maps]))
    return {"bundle": copy, "nut_defect": defects[best].image_path}


def _copy(prepared: dict, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(prepared["bundle"], dest)
    return dest


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "refine.jsonl").read_text().splitlines()]


def test_every_output_of_an_image_off_the_model_size_is_at_its_size(prepared: dict, tmp_path: Path) -> None:
    """A 96x72 image (the model takes 64x64): masks, repaired image and the record's size and areas all at 96x72."""
    image = cv2.resize(cv2.imread(str(prepared["nut_defect"])), (96, 72))
    cv2.imwrite(str(tmp_path / "odd.png"), image)
    out = tmp_path / "out"
    res = CliRunner().invoke(refine_cli, ["run", str(tmp_path / "odd.png"), "--bundle", str(prepared["bundle"]),
                                          "-o", str(out), *FAST])
    assert res.exit_code == 0, res.output
    (record,) = _records(out)
    assert record["refined"] and (record["height"], record["width"]) == (72, 96)
    assert (record["model_height"], record["model_width"]) == (64, 64)
    for key, file_key in (("mask_area_px", "mask_file"), ("coarse_area_px", "coarse_mask_file")):
        mask = cv2.imread(str(out / record[file_key]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (72, 96) and record[key] == np.count_nonzero(mask)
    assert record["coarse_area_px"] > 0
    repaired = cv2.imread(str(out / record["repaired_file"]))
    assert repaired.shape == image.shape
    # outside the solver's region the repaired image is the image itself
    changed = np.abs(repaired.astype(int) - image).max(axis=2) > 0
    assert 0 < np.count_nonzero(changed) <= record["region_area_px"]


def test_the_settings_choice_is_one_rule() -> None:
    from gradad.bundle import tuned_class_for

    assert tuned_class_for({"nut"}, None) == "nut"  # unknown class: the only tuned one
    assert tuned_class_for({"nut"}, "fabric") is None  # an untuned class: the defaults
    assert tuned_class_for({"nut", "fabric"}, None) is None
    assert tuned_class_for({"nut", "fabric"}, "fabric") == "fabric"
    assert tuned_class_for({}, None) is None


def test_records_name_the_settings_and_an_untuned_class_refines_like_grad_run(prepared: dict, tiny_demo_root: Path,
                                                                             tmp_path: Path, caplog) -> None:
    """Only nut is tuned. A fabric image without --class gets nut's settings, saying so; --class fabric goes ahead
    with the bundle's settings and grad-run --class's warning; a class the bundle lacks is refused."""
    copy = _copy(prepared, tmp_path)
    write_class_settings(copy, {"nut": {"lambda0": 0.01}}, {})
    fabric = next(s for s in load_samples(tiny_demo_root, "test") if s.label == 1 and s.class_name == "fabric")
    args = ["run", str(fabric.image_path), "--bundle", str(copy), *FAST]

    def settings_and_log(*extra: str, out: str) -> tuple[str, str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            res = CliRunner().invoke(refine_cli, [*args, *extra, "-o", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
        return _records(tmp_path / out)[0]["settings"], caplog.text

    settings, text = settings_and_log(out="none")
    assert settings == "nut" and "no --class: F2PAD refines every image with the settings tuned for nut" in text
    settings, text = settings_and_log("--class", "fabric", out="fabric")
    assert settings == "defaults" and "F2PAD refines class fabric with the bundle's settings: it was not tuned" in text
    settings, text = settings_and_log("--class", "nut", out="nut")
    assert settings == "nut" and "F2PAD refines" not in text
    line = one_error_line(CliRunner().invoke(refine_cli, [*args, "--class", "Nut", "-o", str(tmp_path / "typo")]))
    assert "--class Nut" in line and "has the classes capsule, fabric, nut" in line


@pytest.mark.parametrize("args", [["prepare", "--images", "0"], ["prepare", "--images", "-5"],
                                  ["tune", "--per-defect", "-1"], ["tune", "--threads", "-1"]])
def test_out_of_range_counts_are_one_usage_error_naming_the_option(prepared: dict, trained_tiny: Path,
                                                                   tiny_demo_root: Path, tmp_path: Path,
                                                                   args: list[str]) -> None:
    command, option, value = args
    extra = ["--checkpoint", str(trained_tiny)] if command == "prepare" else ["--classes", "nut"]
    res = CliRunner().invoke(refine_cli, [command, "--bundle", str(_copy(prepared, tmp_path)), "--data",
                                          str(tiny_demo_root), *extra, option, value])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and f"Invalid value for '{option}'" in res.output


def test_per_defect_zero_is_documented_and_using_every_defect_of_a_type_is_warned(tiny_demo_root: Path,
                                                                                 caplog) -> None:
    from gradad.refine.cli import warn_none_left_to_score

    help_text = " ".join(CliRunner().invoke(refine_cli, ["tune", "--help"]).output.split())
    assert "0 = all of them" in help_text and "grad-bench refine" in help_text
    labelled = load_samples(tiny_demo_root, "test")
    spots = [s for s in labelled if s.class_name == "nut" and s.defect_type == "spot"]
    cracks = [s for s in labelled if s.class_name == "nut" and s.defect_type == "crack"]
    assert len(spots) == len(cracks) == 2
    with caplog.at_level(logging.WARNING):
        assert warn_none_left_to_score(spots + cracks[:1], labelled, set()) == ["nut/spot"]
    assert "every labelled defect image of nut/spot:" in caplog.text
    # the model's trained defects are never scored anyway: tuning on the other crack uses up nut/crack
    assert warn_none_left_to_score(cracks[:1], labelled, {str(cracks[1].image_path.resolve())}) == ["nut/crack"]
    assert warn_none_left_to_score(cracks[:1], labelled, set()) == []


def test_ctrl_c_is_not_swallowed_by_grad_refine(prepared: dict, tmp_path: Path, monkeypatch) -> None:
    """A KeyboardInterrupt leaves grad-refine's code as it is: grad_command's handler (exit 130) or click sees it."""
    from gradad.refine.refiner import Refiner

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Refiner, "refine", interrupted)
    res = CliRunner().invoke(refine_cli, ["run", str(prepared["nut_defect"]), "--bundle", str(prepared["bundle"]),
                                          "-o", str(tmp_path / "out"), *FAST], standalone_mode=False)
    assert res.exit_code == 130 or isinstance(res.exception.__cause__, KeyboardInterrupt), res.output


def test_a_missing_refinement_file_names_grad_refine_prepare_which_restores_it(prepared: dict, trained_tiny: Path,
                                                                              tiny_demo_root: Path,
                                                                              tmp_path: Path) -> None:
    copy = _copy(prepared, tmp_path)
    write_class_settings(copy, {"nut": {"lambda0": 0.01}}, {})
    model = copy / Bundle.load(copy).refine.model
    model.unlink()
    line = one_error_line(CliRunner().invoke(refine_cli, ["run", str(prepared["nut_defect"]), "--bundle", str(copy),
                                                          "-o", str(tmp_path / "out"), *FAST]))
    assert f"misses its refinement file {model}" in line and "run: grad-refine prepare --bundle" in line
    assert "grad-export" not in line and "re-run grad-refine tune after it" in line
    # the one action named fixes it
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:6]
    prepare_bundle(copy, trained_tiny, load_images(train, 64)[0], RefineConfig(mog_components=2, mog_pixels=5000))
    assert load_refine_parts(copy).model_path.is_file()


@pytest.mark.parametrize("name", ["model.onnx", "renamed.pt"])
def test_an_onnx_file_as_checkpoint_asks_for_the_training_checkpoint(prepared: dict, tiny_demo_root: Path,
                                                                    tmp_path: Path, name: str) -> None:
    copy = _copy(prepared, tmp_path)
    given = tmp_path / name
    shutil.copy(copy / "model.onnx", given)
    line = one_error_line(CliRunner().invoke(refine_cli, ["prepare", "--bundle", str(copy), "--checkpoint", str(given),
                                                          "--data", str(tiny_demo_root)]))
    assert f"--checkpoint {given} looks like an ONNX model" in line and "the model.pt from grad-train" in line
