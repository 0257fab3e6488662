"""Session 21 walkthrough on a tester's own data: what the dataset readers, grad-calibrate and grad-eval pass over
or refuse is said, naming the folder and why (files of another type, broken links, images in subfolders, masks
that binarise to nothing, a root given twice or pointing inside a class, empty and float files, 12-bit data in a
16-bit file, an output folder that cannot be written, the generic layout's hold-out rule)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from fakes.calibration import MeanBackend, grey_images
from gradad import cli_utils
from gradad.calibration.calibrate import calibrate
from gradad.calibration.thresholds import CalibrationConfig
from gradad.data import images as images_module
from gradad.data.datasets import list_image_files, load_samples, load_samples_from_roots
from gradad.data.images import read_image_rgb, read_mask
from gradad.errors import DatasetError
from gradad.evaluation.cli import main as eval_cli


def _png(path: Path, level: int = 100, ext: str = ".png") -> Path:
    """A small image with a level-dependent pattern (so no two are identical), written with OpenCV."""
    path = path.with_suffix(ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((16, 16, 3), level, np.uint8)
    image[level % 16, 3] = 255 - level
    assert cv2.imwrite(str(path), image), path
    return path


def _mvtec(root: Path, cls: str = "p", n_train: int = 3, ext: str = ".png") -> Path:
    """A small MVTec-style class: ``n_train`` goods in train/good (of extension ``ext``), two test goods."""
    cdir = root / cls
    for i in range(n_train):
        _png(cdir / "train" / "good" / f"{i:03d}", 10 + i, ext)
    for i in range(2):
        _png(cdir / "test" / "good" / f"{i:03d}", 50 + i)
    return cdir


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# ------------------------------------------------------------------------------ 1. files the readers pass over


def test_a_class_of_webp_files_only_says_what_its_folder_holds(tmp_path: Path) -> None:
    _mvtec(tmp_path, n_train=3, ext=".webp")
    with pytest.raises(DatasetError, match=r"empty class 'p': no training images in .*train/good \(ignored 3 "
                                           r"file\(s\) that are not images of a known type \(\.webp; known: \.png"):
        load_samples(tmp_path, "train")


def test_webp_files_among_pngs_are_warned_about_once_per_folder(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cdir = _mvtec(tmp_path, n_train=3)
    for i in range(2):
        _png(cdir / "train" / "good" / f"w{i}", 70 + i, ".webp")
    with caplog.at_level(logging.WARNING):
        first = load_samples(tmp_path, "train")
        load_samples(tmp_path, "train")  # training lists its classes more than once: still one warning
    assert len(first) == 3  # which files are read is unchanged
    lines = _warnings(caplog, "not images of a known type")
    assert len(lines) == 1
    assert "train/good: ignored 2 file(s) that are not images of a known type (.webp; known: .png" in lines[0]


def test_images_in_subfolders_of_train_good_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cdir = _mvtec(tmp_path, n_train=0)
    for day in ("day1", "day2"):
        _png(cdir / "train" / "good" / day / "000", 20)
    with pytest.raises(DatasetError, match=r"empty class 'p'.*images in subfolders day1/, day2/ are not read: "
                                           r"move them up or use one class per folder"):
        load_samples(tmp_path, "train")
    _png(cdir / "train" / "good" / "top", 30)
    with caplog.at_level(logging.WARNING):
        assert len(load_samples(tmp_path, "train")) == 1
    assert len(_warnings(caplog, "images in subfolders day1/, day2/ are not read")) == 1


def test_a_broken_link_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cdir = _mvtec(tmp_path, n_train=3)
    (cdir / "train" / "good" / "zz.png").symlink_to(tmp_path / "gone.png")
    with caplog.at_level(logging.WARNING):
        assert len(load_samples(tmp_path, "train")) == 3
    lines = _warnings(caplog, "broken link")
    assert len(lines) == 1 and "ignored 1 broken link(s) whose target does not exist (zz.png)" in lines[0]


def test_a_test_defect_folder_of_webp_files_is_warned_about(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    cdir = _mvtec(tmp_path)
    _png(cdir / "test" / "spot" / "000", 200, ".webp")
    with caplog.at_level(logging.WARNING):
        samples = load_samples(tmp_path, "test")
    assert all(s.label == 0 for s in samples)
    assert any("test/spot: ignored 1 file(s)" in line for line in _warnings(caplog, ".webp"))


def test_grad_calibrate_warns_about_the_files_it_passes_over(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    grey_images(tmp_path / "good", [10, 20, 30])
    _png(tmp_path / "good" / "extra", 40, ".webp")
    with caplog.at_level(logging.WARNING):
        assert len(list_image_files(tmp_path / "good", "--good")) == 3
        calibrate(MeanBackend(), tmp_path / "good")
    assert len(_warnings(caplog, "ignored 1 file(s) that are not images of a known type (.webp")) == 1
    (tmp_path / "only_webp").mkdir()
    _png(tmp_path / "only_webp" / "a", 40, ".webp")
    with pytest.raises(DatasetError, match=r"--good folder .*only_webp holds no images \(ignored 1 file\(s\) "
                                           r"that are not images of a known type \(\.webp"):
        list_image_files(tmp_path / "only_webp", "--good")


# -------------------------------------------------------------------------------- 2. masks that mark nothing


def _mask(path: Path, value: int, size: int = 16) -> None:
    mask = np.zeros((size, size), np.uint8)
    mask[4:10, 4:10] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)


def test_masks_that_binarise_to_nothing_are_refused_naming_the_folder(tmp_path: Path) -> None:
    grey_images(tmp_path / "good", [10, 20, 30])
    grey_images(tmp_path / "bad", [150, 160, 170])
    for i in range(3):
        _mask(tmp_path / "masks" / f"{i:03d}_mask.png", 100)  # drawn in grey <= 127: background once binarised
    with pytest.raises(DatasetError, match=r"--masks .*masks: none of the 3 matched mask\(s\) marks a defect pixel "
                                           r".*value is > 127"):
        calibrate(MeanBackend(), tmp_path / "good", tmp_path / "bad", tmp_path / "masks",
                  CalibrationConfig(method="f1"))


def test_one_empty_mask_among_others_is_counted_in_a_warning(tmp_path: Path) -> None:
    grey_images(tmp_path / "good", [10, 20, 30])
    grey_images(tmp_path / "bad", [150, 160, 170])
    for i, value in enumerate((255, 255, 0)):
        _mask(tmp_path / "masks" / f"{i:03d}_mask.png", value)
    cal = calibrate(MeanBackend(), tmp_path / "good", tmp_path / "bad", tmp_path / "masks",
                    CalibrationConfig(method="f1"))
    hits = [w for w in cal.warnings if "mark no defect pixel" in w]
    assert len(hits) == 1 and "1 of 3 matched mask(s)" in hits[0]


# -------------------------------------------------------------------------------- 3. roots and odd files


def test_a_root_given_twice_is_read_once_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "mv"
    _mvtec(root, "widget")
    _mvtec(root, "gadget")
    with caplog.at_level(logging.WARNING):
        samples = load_samples_from_roots([root, tmp_path / "mv" / "." / "widget" / ".."], "train")
    assert len(samples) == 6
    assert len(_warnings(caplog, "is given twice")) == 1


def test_a_root_inside_another_is_named_as_the_cause_of_a_clash(tmp_path: Path) -> None:
    root = tmp_path / "mv"
    _mvtec(root, "widget")
    _mvtec(root, "gadget")
    with pytest.raises(DatasetError, match=r"class 'widget' exists in both .*mv and .*widget \(.*widget lies "
                                           r"inside .*mv: give one of them\)"):
        load_samples_from_roots([root, root / "widget"], "train")


@pytest.mark.parametrize("inside", ["train/good", "test/good", "test/spot", "ground_truth/spot"])
def test_a_root_deep_inside_an_mvtec_class_names_the_class_folder(tmp_path: Path, inside: str) -> None:
    cdir = _mvtec(tmp_path, "widget")
    _png(cdir / "test" / "spot" / "000", 200)
    _mask(cdir / "ground_truth" / "spot" / "000_mask.png", 255)
    with pytest.raises(DatasetError, match=r"dataset root points inside the class folder .*widget: .*"
                                           r"\(pass the class folder or the dataset root\)"):
        load_samples(cdir / inside, "train")


def test_a_root_inside_a_generic_folder_class_names_the_class_folder(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "part" / "good" / f"{i:03d}", 10 + i)
    with pytest.raises(DatasetError, match=r"points inside the class folder .*part: .*part/good"):
        load_samples(tmp_path / "part" / "good", "train")


def test_a_zero_byte_file_is_called_empty(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"image file is empty \(0 bytes\): .*a\.png"):
        read_image_rgb(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"mask file is empty \(0 bytes\): .*a\.png"):
        read_mask(tmp_path / "a.png")


def test_a_float_tiff_is_named_an_unsupported_pixel_type(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    assert cv2.imwrite(str(path), np.full((8, 8, 3), 0.5, np.float32))
    with pytest.raises(DatasetError, match=r"unsupported pixel type float32 \(3 channel\(s\)\).*: .*f\.tif"):
        read_image_rgb(path)
    truncated = tmp_path / "t.png"
    truncated.write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()[:30])
    with pytest.raises(DatasetError, match=r"cannot decode image \(corrupt"):
        read_image_rgb(truncated)


# ------------------------------------------------------------------------------- 4. 12-bit data in 16 bits


def test_twelve_bit_data_in_a_16_bit_png_is_warned_about_once_and_scaled_as_before(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_module, "_warned_low_bits", False)
    raw = np.zeros((8, 8, 3), np.uint16)
    raw[..., :] = np.arange(8, dtype=np.uint16)[:, None, None] * 500 + 400  # up to 3900: 12-bit camera data
    frames = []
    for i in range(3):
        frames.append(tmp_path / f"{i}.png")
        assert cv2.imwrite(str(frames[-1]), raw)
    full = tmp_path / "full.png"
    assert cv2.imwrite(str(full), raw * 16)
    eight = tmp_path / "eight.png"
    assert cv2.imwrite(str(eight), np.zeros((8, 8, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        assert read_image_rgb(eight).max() == 0 and read_image_rgb(full).max() > 200  # neither warns
        assert not _warnings(caplog, "low 12 bits")
        read = [read_image_rgb(f) for f in frames * 2]  # a folder source looping over its frames
    assert int(read[0].max()) == 3900 >> 8  # the scaling training, calibration and grad-run share is unchanged
    lines = _warnings(caplog, "low 12 bits")
    assert len(lines) == 1 and "scaled as 16-bit" in lines[0] and "0.png" in lines[0]


# ------------------------------------------------------------------------------------------- 5. grad-eval


def test_grad_eval_refuses_an_output_folder_it_cannot_write_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before the model is even read (a missing model file would otherwise be the error)."""
    model = str(tmp_path / "missing_model.pt")
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # a file where a folder of the path goes
    result = CliRunner().invoke(eval_cli, [model, "-o", str(blocker / "eval")])
    assert result.exit_code == 2
    assert "error: --output" in result.output and "afile is a file, not a folder" in result.output

    def read_only(*args: object, **kwargs: object) -> None:
        # a read-only mount (the tests run as root, for whom permission bits stop no write)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cli_utils.tempfile, "NamedTemporaryFile", read_only)
    result = CliRunner().invoke(eval_cli, [model, "-o", str(tmp_path / "new" / "eval")])
    assert result.exit_code == 2 and "missing_model" not in result.output
    assert f"error: --output {tmp_path / 'new' / 'eval'}: its parent {tmp_path}: cannot write there " \
           f"(Read-only file system)" in result.output
    result = CliRunner().invoke(eval_cli, [model])  # the default, beside the model
    assert result.exit_code == 2 and "error: --output (default <model dir>/eval)" in result.output


def test_a_generic_class_too_small_for_a_test_image_explains_the_hold_out_rule(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "part" / "good" / f"{i:03d}", 10 + i)
    assert len(load_samples(tmp_path, "train")) == 3
    with pytest.raises(DatasetError, match=r"class 'part' has no test images in .*part: without a test/ folder, "
                                           r"every 5th good image \(sorted by name\) is held out for testing, so "
                                           r"its 3 good image\(s\) give none"):
        load_samples(tmp_path, "test")


def test_twelve_bit_data_in_a_16_bit_tiff_near_full_range_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV rounds a TIFF's 16-bit values to 8 bits (4095 -> 16), a PNG's it truncates (-> 15): the first check
    skipped a saturated 12-bit TIFF (reviewer's find)."""
    monkeypatch.setattr(images_module, "_warned_low_bits", False)
    path = tmp_path / "sat.tif"
    assert cv2.imwrite(str(path), np.full((8, 8, 3), 4095, np.uint16))
    with caplog.at_level(logging.WARNING):
        read_image_rgb(path)
    assert len(_warnings(caplog, "low 12 bits")) == 1
