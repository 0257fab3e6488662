"""Output folders and hand-edited files: no command destroys what it did not write, and a damaged input is one
clear error (fresh-eyes review of session 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradad.bundle import MANIFEST_NAME, Bundle, BundleError, read_manifest
from gradad.errors import CheckpointError, ConfigError, GradError
from gradad.export.cli import main as export_main


def _export(args: list[str]) -> Any:
    return CliRunner().invoke(export_main, ["onnx", *args, "--no-fp16", "--parity-max-images", "4"])


def test_export_overwrite_replaces_only_a_bundle_of_its_own_files(trained_tiny: Path, bundle: Path,
                                                                  tmp_path: Path) -> None:
    # a folder with some other tool's bundle.json, and files no bundle lists
    other = tmp_path / "webapp"
    (other / "src").mkdir(parents=True)
    (other / MANIFEST_NAME).write_text(json.dumps({"name": "my-web-app"}))
    (other / "src" / "main.c").write_text("int main() {}")
    result = _export([str(trained_tiny), "-o", str(other), "--overwrite"])
    assert result.exit_code == 2 and "not a readable gradad bundle" in result.stderr, result.output
    assert (other / "src" / "main.c").is_file()
    # a real bundle holding a file of the user's
    mine = tmp_path / "mine"
    shutil.copytree(bundle, mine)
    (mine / "NOTES.txt").write_text("line 3 settings")
    result = _export([str(trained_tiny), "-o", str(mine), "--overwrite"])
    assert result.exit_code == 2 and "NOTES.txt, which the bundle does not list" in result.stderr
    assert (mine / "NOTES.txt").read_text() == "line 3 settings" and (mine / "model.fp16.onnx").is_file()
    # files named like ours that the bundle does not list are the user's too (a backup, a hand-built engine)
    (mine / "NOTES.txt").unlink()
    for name in ("model_backup_before_retrain.onnx", "model.trt8.6.1.fp16.sm87.Orin.plan"):
        (mine / name).write_bytes(b"keep me")
        result = _export([str(trained_tiny), "-o", str(mine), "--overwrite"])
        assert result.exit_code == 2 and f"{name}, which the bundle does not list" in result.stderr
        assert (mine / name).read_bytes() == b"keep me"
        (mine / name).unlink()
    (mine / ".model.onnx.tmp123").write_bytes(b"")  # a temporary of ours and the timing cache do not count
    (mine / "timing.cache").write_bytes(b"")
    # without them, the bundle is replaced, and no temporary folder is left behind
    result = _export([str(trained_tiny), "-o", str(mine), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (mine / "model.fp16.onnx").exists() and read_manifest(mine)["name"] == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_refuses_the_current_folder_and_a_symlink(trained_tiny: Path, bundle: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "here"
    shutil.copytree(bundle, here)
    before = sorted(p.name for p in here.iterdir())
    monkeypatch.chdir(here)
    result = _export([str(trained_tiny), "-o", ".", "--overwrite"])
    assert result.exit_code == 2 and "is the current folder" in result.stderr
    assert sorted(p.name for p in here.iterdir()) == before
    link = tmp_path / "link"
    link.symlink_to(here)
    result = _export([str(trained_tiny), "-o", str(link), "--overwrite"])
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert sorted(p.name for p in here.iterdir()) == before


def test_train_refuses_a_finished_run_without_resume_or_overwrite(tmp_path: Path) -> None:
    from gradad.training.cli import main as train_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"the model of last week")
    result = CliRunner().invoke(train_main, ["--data", str(tmp_path / "nowhere"), "-o", str(run)])
    assert result.exit_code == 2 and "already holds model.pt" in result.output and "--overwrite" in result.output
    assert (run / "model.pt").read_bytes() == b"the model of last week"


def test_bench_report_never_replaces_a_readme_it_did_not_write(tmp_path: Path) -> None:
    from gradad.benchmarks.report_page import write_report

    with pytest.raises(GradError, match="no grad-bench result files"):
        write_report(tmp_path)
    (tmp_path / "README.md").write_text("# My project\n\nHand-written docs.\n")
    (tmp_path / "r.json").write_text(json.dumps({"kind": "accuracy", "datasets": []}))
    with pytest.raises(GradError, match="was not written by grad-bench report"):
        write_report(tmp_path)
    assert (tmp_path / "README.md").read_text().startswith("# My project")


@pytest.mark.parametrize(("path", "value"), [(("onnx", "gridsample"), []), (("calibration",), {"warnings": 5}),
                                             (("refine",), {"classes": {"capsule": 5}})])
def test_bundle_fields_of_the_wrong_type_are_a_bundle_error(bundle: Path, tmp_path: Path, path: tuple[str, ...],
                                                            value: Any) -> None:
    manifest = read_manifest(bundle)
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
        node[path[-1]].update(value)
    elif isinstance(value, dict):
        node[path[-1]] = {"image_threshold": 1.0, "pixel_threshold": 1.0, **value} if path == ("calibration",) \
            else {"model": "refine_model.pt", "pixel_prior": "pixel_prior.npz", **value}
    else:
        node[path[-1]] = value
    try:
        Bundle.from_dict(manifest)
    except BundleError as exc:  # the schema or the typed model: either way one line naming bundle.json
        assert "bundle.json" in str(exc)
    else:
        pytest.fail("a field of the wrong type was accepted")


@pytest.mark.parametrize(("values", "message"), [({"lambda0": "abc"}, "lambda0 = 'abc': expected a finite number"),
                                                 ({"lambda0": float("nan")}, "lambda0 = nan: expected a finite number"),
                                                 ({"betas": 5}, "betas = 5: expected 3 values, got 1"),
                                                 ({"max_iterations": None}, "max_iterations is empty"),
                                                 ({"use_f2pad": "false"}, "use_f2pad = 'false': expected bool"),
                                                 ({"max_batch": 2.5}, "max_batch = 2.5: expected int")])
def test_refine_settings_of_the_wrong_type_are_one_config_error(values: dict, message: str) -> None:
    from gradad.refine.config import refine_config_from_dict

    with pytest.raises(ConfigError, match=r"refinement config: " + message.replace("(", r"\(").replace(")", r"\)")):
        refine_config_from_dict(values)


def test_refine_set_option_names_itself(tmp_path: Path) -> None:
    from gradad.refine.cli import apply_refine_set
    from gradad.refine.config import RefineConfig

    with pytest.raises(ConfigError, match=r"--set: refinement config: lambda0 = 'abc'"):
        apply_refine_set(RefineConfig(), ("lambda0=abc",))
    # the same --set strings as grad-train (gradad.config_values): 1e-4 is a number, tuples take their elements
    config = apply_refine_set(RefineConfig(), ("lambda0=1e-4", "mask_tau_quantiles=0.9,0.99"))
    assert config.lambda0 == 1e-4 and config.mask_tau_quantiles == (0.9, 0.99)


@pytest.mark.parametrize("tamper", ["no_channels", "no_config", "extra_weight", "config_is_list"])
def test_a_checkpoint_that_does_not_fit_is_one_error_naming_it(trained_tiny: Path, tmp_path: Path,
                                                                tamper: str) -> None:
    from gradad.training.checkpoint import load_detector

    payload = torch.load(trained_tiny, map_location="cpu", weights_only=True)
    if tamper == "no_channels":
        del payload["channels"]
    elif tamper == "no_config":
        del payload["config"]
    elif tamper == "extra_weight":
        payload["state_dict"]["normal_cnn.99.weight"] = torch.zeros(1)
    else:
        payload["config"] = [1, 2]
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/model.pt \(written by gradad .*\) does not fit this"):
        load_detector(path)


def test_refine_output_names_never_collide() -> None:
    from gradad.refine.cli import _unique_stems

    files = [Path("line1/a.png"), Path("line2/a.png"), Path("line1/a_2.png"), Path("x/a.jpg")]
    names = _unique_stems(files)
    assert len(set(names.values())) == len(files)
    assert names[Path("line1/a.png")] == "a" and names[Path("line2/a.png")] == "a_2"


def test_refine_run_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    from gradad.refine.cli import main as refine_main

    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"last week's mask")
    image = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    result = CliRunner().invoke(refine_main, ["run", str(image), "--bundle", str(tmp_path / "nobundle"),
                                              "-o", str(out)])
    assert result.exit_code == 2 and "is not empty" in result.output, result.output
    assert (out / "a_mask.png").read_bytes() == b"last week's mask"


def test_one_bad_frame_fails_only_itself_in_a_worker_batch() -> None:
    import queue

    from gradad.refine.worker import refine_batch

    class Refiner:
        def refine(self, images: list, maps: list, classes: list) -> list:
            if any(img.shape != (4, 4, 3) for img in images):
                raise GradError("refine: image 1 is 5x5 but the model takes 4x4")
            return [f"refined {img.shape}" for img in images]

    results: queue.Queue = queue.Queue()
    good, bad = np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)
    refine_batch(Refiner(), [(1, good, None), (2, bad, None), (3, good, None)], results)  # type: ignore[arg-type]
    got = [results.get_nowait() for _ in range(3)]
    assert [(m[0], m[1]) for m in got] == [("done", 1), ("failed", [2]), ("done", 3)]
    assert "5x5" in got[1][2]


class _NanBackend:
    """A backend whose second image scores NaN (a broken model or a corrupt frame)."""

    name = "fake"
    input_hw = (8, 8)
    max_batch = 4

    def __init__(self) -> None:
        self.seen = 0

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(images)
        scores = np.arange(self.seen, self.seen + n, dtype=np.float32) + 1.0
        scores[(np.arange(self.seen, self.seen + n) == 1)] = np.nan
        self.seen += n
        return scores, np.ones((n, 8, 8), np.float32)


def test_calibration_names_images_with_non_finite_scores(tmp_path: Path) -> None:
    import cv2

    from gradad.calibration.calibrate import calibrate

    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    with pytest.raises(GradError, match=r"--good: the model gives a non-finite score or map for .*001.png"):
        calibrate(_NanBackend(), tmp_path)  # type: ignore[arg-type]


def test_checkout_root_readme_is_safe_from_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``grad-bench report .`` at a project root: refused, the README untouched."""
    from gradad.benchmarks.cli import main as bench_main

    (tmp_path / "README.md").write_text("# Project\n")
    (tmp_path / "x.json").write_text(json.dumps({"kind": "accuracy", "datasets": []}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(bench_main, ["report", "."])
    assert result.exit_code == 2 and "not written by grad-bench report" in result.output
    assert (tmp_path / "README.md").read_text() == "# Project\n"


def test_a_mask_is_found_by_its_exact_stem(tmp_path: Path) -> None:
    from gradad.calibration.calibrate import find_mask

    for name in ("001.5.png", "[x]_mask.png", "002_mask.png", "002.png"):
        (tmp_path / name).write_bytes(b"")
    assert find_mask(tmp_path, Path("001.png")) is None  # never 001.5.png's mask
    assert find_mask(tmp_path, Path("001.5.png")) == tmp_path / "001.5.png"
    assert find_mask(tmp_path, Path("[x].png")) == tmp_path / "[x]_mask.png"
    assert find_mask(tmp_path, Path("002.jpg")) == tmp_path / "002_mask.png"  # <stem>_mask first


def test_a_failed_atomic_torch_save_leaves_no_temporary_file(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from gradad.training import checkpoint

    def disk_full(obj: Any, f: Any) -> None:
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    (tmp_path / "model.pt").write_bytes(b"the good model")
    with pytest.raises(OSError, match="No space"):
        checkpoint.atomic_torch_save({"a": 1}, tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert (tmp_path / "model.pt").read_bytes() == b"the good model"


@pytest.mark.parametrize(("key", "value"), [("name", "hf-hub:someone/backbone"), ("name", "local-dir:/tmp/x")])
def test_opening_a_model_file_never_downloads_what_it_names(trained_tiny: Path, tmp_path: Path, key: str,
                                                             value: str) -> None:
    from gradad.training.checkpoint import load_detector

    payload = torch.load(trained_tiny, map_location="cpu", weights_only=True)
    payload["config"]["backbone"][key] = value
    payload.pop("extractor_state_dict", None)
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="never downloads from a repository it names"):
        load_detector(path)


def _model_that_trained_on(trained_tiny: Path, tmp_path: Path, image: Path) -> Path:
    payload = torch.load(trained_tiny, map_location="cpu", weights_only=True)
    payload["trained_defects"] = [str(image.resolve())]
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    return path


def test_evaluations_never_score_the_defects_stage_1_trained_on(trained_tiny: Path, tiny_demo_root: Path,
                                                                tmp_path: Path) -> None:
    from gradad.benchmarks.accuracy import AccuracyConfig, run_accuracy
    from gradad.data.datasets import load_samples
    from gradad.evaluation.cli import main as eval_main

    samples = load_samples(tiny_demo_root, "test")
    learnt = next(s for s in samples if s.label == 1).image_path
    model = _model_that_trained_on(trained_tiny, tmp_path, learnt)
    result = CliRunner().invoke(eval_main, [str(model), "--data", str(tiny_demo_root), "-o", str(tmp_path / "e"),
                                            "--figures", "0"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert meta["n_trained_defects_left_out"] == 1 and meta["n_test_images"] == len(samples) - 1
    acc = run_accuracy(AccuracyConfig([str(tiny_demo_root)], checkpoint=str(model), bootstrap=0, threads=1))
    assert acc["dataset"]["n_trained_defects_left_out"] == 1
    assert acc["dataset"]["n_test_images"] == len(samples) - 1


def test_tuning_images_are_left_out_however_the_data_root_is_spelled(tiny_demo_root: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from gradad.data.datasets import load_samples
    from gradad.refine.tuning import pick_samples

    absolute = load_samples(tiny_demo_root, "test")
    tuned = {str(s.image_path.resolve()) for s in absolute if s.label == 1}
    monkeypatch.chdir(tiny_demo_root.parent)
    relative = load_samples(Path(tiny_demo_root.name), "test")  # the same images, spelled from here
    assert not pick_samples(relative, 0, exclude=tuned)
    # a bundle's model copy names them by content: left out alike
    from gradad.bundle import image_digest
    from gradad.data.tuning_split import DIGEST_PREFIX

    assert not pick_samples(relative, 0, exclude={DIGEST_PREFIX + image_digest(p) for p in tuned})


def test_a_bundle_s_threshold_is_not_applied_to_another_model(bundle: Path, trained_tiny: Path, tiny_demo_root: Path,
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gradad.benchmarks.accuracy import F1_CALIBRATED, AccuracyConfig, run_accuracy
    from gradad.bundle import write_manifest

    calibrated = tmp_path / "b"
    shutil.copytree(bundle, calibrated)
    manifest = read_manifest(calibrated)
    manifest["calibration"] = {"image_threshold": 1.0, "pixel_threshold": 1.0, "method": "far"}
    manifest["source_checkpoint"] = str(trained_tiny)
    write_manifest(calibrated, manifest)
    other = tmp_path / "other.pt"
    shutil.copy(trained_tiny, other)  # another file: the bundle's calibration says nothing about it
    for checkpoint, kind in ((trained_tiny, F1_CALIBRATED), (other, "oracle")):
        result = run_accuracy(AccuracyConfig([str(tiny_demo_root)], checkpoint=str(checkpoint),
                                             bundle=str(calibrated), backends=("pytorch",), bootstrap=0, threads=1))
        assert (result["rows"][0]["f1"]["kind"] == F1_CALIBRATED) == (kind == F1_CALIBRATED)
    assert "was exported from" in caplog.text
