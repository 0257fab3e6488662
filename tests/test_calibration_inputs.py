"""What grad-calibrate and grad-bench accept as inputs and outputs: calibration images recorded, masks folders,
the classes and training images behind --good, --target-recall, result files and tuning split folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from gradad.benchmarks.results_io import result_header, write_result_files
from gradad.benchmarks.split import write_split
from gradad.calibration.calibrate import CALIBRATION_IMAGES, calibrate, find_mask
from gradad.calibration.cli import main as calibrate_cli
from gradad.calibration.thresholds import CalibrationConfig, recall_threshold
from gradad.errors import GradError
from fakes.calibration import MeanBackend as _MeanBackend, grey_images as _images


def test_calibration_records_the_resolved_paths_of_its_images(tmp_path: Path, monkeypatch) -> None:
    good = _images(tmp_path / "good", [10, 20, 30])
    defects = _images(tmp_path / "bad", [200, 210])
    monkeypatch.chdir(tmp_path)
    cal = calibrate(_MeanBackend(), "good", "bad")
    assert sorted(cal.data[CALIBRATION_IMAGES]) == sorted(str(p.resolve()) for p in good + defects)


def test_masks_in_the_defect_folder_are_refused_and_no_image_is_its_own_mask(tmp_path: Path) -> None:
    _images(tmp_path / "good", [10, 20, 30])
    both = tmp_path / "defects"
    images = _images(both, [200, 210])
    with pytest.raises(GradError, match="--masks .* is the --defect folder"):
        calibrate(_MeanBackend(), tmp_path / "good", both, both)
    assert find_mask(both, images[0]) is None  # only the image itself matches its stem
    masks = _images(both, [255, 255], suffix="_mask")
    assert find_mask(both, images[0]) == masks[0]


def test_the_masks_folder_is_listed_once_for_all_defect_images(tmp_path: Path, monkeypatch) -> None:
    """A listing per defect image made calibration quadratic in the number of defects (a thousand defects: a
    million directory entries read)."""
    good = _images(tmp_path / "good", [10, 20, 30])
    defects = _images(tmp_path / "bad", [200, 210, 220, 230])
    masks = _images(tmp_path / "masks", [255, 255, 255, 255], suffix="_mask")
    listings: list[Path] = []
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: listings.append(self) or real_iterdir(self))
    cal = calibrate(_MeanBackend(), tmp_path / "good", tmp_path / "bad", tmp_path / "masks")
    assert listings.count(tmp_path / "masks") == 1
    assert len(masks) == len(defects) == 4 and len(good) == 3
    assert cal.pixel_threshold is not None  # the masks were found and used


@pytest.mark.parametrize("method", ["f1", "recall"])
def test_a_defect_rule_without_defects_is_refused_before_any_image_is_scored(tmp_path: Path, method: str) -> None:
    _images(tmp_path / "good", [10, 20, 30])

    class _Unused(_MeanBackend):
        def infer(self, batch):  # noqa: ANN001, ANN201 - the fake's signature
            raise AssertionError("scored before the options were checked")

    with pytest.raises(GradError, match=f"--method {method} needs labelled defects"):
        calibrate(_Unused(), tmp_path / "good", config=CalibrationConfig(method=method))


def test_unified_bundle_without_good_images_of_a_class_is_warned_about(tmp_path: Path) -> None:
    _images(tmp_path / "nut" / "test" / "good", [10, 20, 30])
    bundle = SimpleNamespace(classes=["fabric", "nut", "capsule"], data_root=None, training_data={})
    cal = calibrate(_MeanBackend(), tmp_path / "nut" / "test" / "good", bundle=bundle)
    assert any("fabric, capsule" in w and "no good images" in w for w in cal.warnings)
    _images(tmp_path / "fabric" / "test" / "good", [11, 21, 31])
    _images(tmp_path / "capsule" / "test" / "good", [12, 22, 32])
    every = calibrate(_MeanBackend(), [tmp_path / c / "test" / "good" for c in ("nut", "fabric", "capsule")],
                      bundle=bundle)
    assert not any("no good images" in w for w in every.warnings)


def test_training_goods_given_as_held_out_are_warned_about(tmp_path: Path, caplog) -> None:
    train = tmp_path / "data" / "nut" / "train" / "good"
    _images(train, [10, 20, 30])
    held_out = tmp_path / "held_out"
    _images(held_out, [11, 21, 31])
    bundle = SimpleNamespace(classes=["nut"], data_root=str(tmp_path / "data"), training_data={})
    with caplog.at_level(logging.WARNING):
        cal = calibrate(_MeanBackend(), [held_out, train], bundle=bundle)
    hits = [w for w in cal.warnings if "training images" in w]
    assert len(hits) == 1 and str(train) in hits[0] and "\n" not in hits[0]
    assert not any("training images" in w for w in calibrate(_MeanBackend(), held_out, bundle=bundle).warnings)


def test_goods_the_trainer_held_out_are_not_taken_for_training_images(tmp_path: Path) -> None:
    """The model file records its training roots and held-out validation goods (bundle.json's training_data): a
    folder of those is fine though it lies under train/, a folder mixing in trained ones is warned about with the
    count, and every training root is checked, not only the first."""
    mtd, tyre = tmp_path / "mtd", tmp_path / "mvtec3d"
    tiles = _images(mtd / "magnetic_tile" / "train" / "good", [10, 20, 30, 40])
    tyres = _images(tyre / "tire" / "train" / "good", [15, 25, 35])
    bundle = SimpleNamespace(classes=["magnetic_tile", "tire"], data_root=str(mtd), training_data={
        "data_roots": [str(mtd.resolve()), str(tyre.resolve())],
        "held_out_goods": [str(p.resolve()) for p in tiles[:2]]})
    held = tmp_path / "calib" / "magnetic_tile"
    held.mkdir(parents=True)
    for p in tiles[:2]:
        (held / p.name).symlink_to(p)
    assert not any("training images" in w for w in calibrate(_MeanBackend(), held, bundle=bundle).warnings)
    (held / tiles[2].name).symlink_to(tiles[2])
    hits = [w for w in calibrate(_MeanBackend(), held, bundle=bundle).warnings if "training images" in w]
    assert len(hits) == 1 and "holds 1 of the model's training images" in hits[0]
    hits = [w for w in calibrate(_MeanBackend(), [held, tyres[0].parent], bundle=bundle).warnings
            if "training images" in w]
    assert len(hits) == 2 and "holds 3 of" in hits[1] and "tire" in hits[1]


def test_the_recorded_training_goods_decide_not_their_folder(tmp_path: Path) -> None:
    """Where the model file recorded the good images it trained on (``trained_goods``, by folder), a --good image
    is a training image exactly when it is one of them: a flat folder layout that keeps its test goods next to the
    training ones (every 5th) is calibrated on those test goods without a warning, and a trained one is counted."""
    goods = _images(tmp_path / "parts" / "good", [10, 20, 30, 40, 50, 60])
    test_goods, trained = goods[4:], goods[:4]
    bundle = SimpleNamespace(classes=["parts"], data_root=str(tmp_path / "parts"), training_data={
        "data_roots": [str((tmp_path / "parts").resolve())],
        "trained_goods": {str(goods[0].parent.resolve()): [p.name for p in trained[1:]]},
        "held_out_goods": [str(trained[0].resolve())]})
    calib = tmp_path / "calib" / "parts"
    calib.mkdir(parents=True)
    for p in test_goods + trained[:1]:  # the test goods and the held-out one
        (calib / p.name).symlink_to(p)
    assert not any("training images" in w for w in calibrate(_MeanBackend(), calib, bundle=bundle).warnings)
    (calib / trained[2].name).symlink_to(trained[2])
    hits = [w for w in calibrate(_MeanBackend(), calib, bundle=bundle).warnings if "training images" in w]
    assert len(hits) == 1 and "holds 1 of the model's training images" in hits[0]
    assert str(goods[0].parent.resolve()) in hits[0]
    hits = [w for w in calibrate(_MeanBackend(), goods[0].parent, bundle=bundle).warnings if "training images" in w]
    assert len(hits) == 1 and "holds 3 of" in hits[0]


def test_copies_of_training_goods_are_found_by_content_on_any_machine(tmp_path: Path) -> None:
    """A bundle that records content digests of its training goods finds them copied to another machine under
    other names, and takes held-out goods (not in the digests) and re-encoded-looking new images for what they
    are."""
    from gradad.bundle import image_digest

    trained = _images(tmp_path / "train_machine" / "nut" / "train" / "good", [10, 20, 30])
    bundle = SimpleNamespace(classes=["nut"], data_root="/somewhere/else", training_data={
        "trained_good_digests": sorted(image_digest(p) for p in trained[:2])})
    line = tmp_path / "jetson" / "held_out"
    line.mkdir(parents=True)
    (line / "renamed.png").write_bytes(trained[2].read_bytes())  # the one the trainer held out
    _images(line, [44, 55])
    assert not any("training images" in w for w in calibrate(_MeanBackend(), line, bundle=bundle).warnings)
    (line / "copy_of_trained.png").write_bytes(trained[0].read_bytes())
    hits = [w for w in calibrate(_MeanBackend(), line, bundle=bundle).warnings if "training images" in w]
    assert len(hits) == 1 and "holds 1 of the model's training images" in hits[0]
    assert str((line / "copy_of_trained.png").resolve()) in hits[0]


def test_target_recall_must_be_a_fraction(tmp_path: Path) -> None:
    for bad in (95, 0, -0.5):
        with pytest.raises(GradError, match="--target-recall"):
            recall_threshold(np.array([1.0, 2.0]), bad)
    result = CliRunner().invoke(calibrate_cli, [str(tmp_path), "--good", str(tmp_path), "--target-recall", "95"])
    assert result.exit_code == 2 and "--target-recall" in result.output and "Traceback" not in result.output


def test_recall_and_f1_rules_on_few_defects_are_warned_about(tmp_path: Path) -> None:
    _images(tmp_path / "good", [10, 20, 30])
    _images(tmp_path / "bad", [200, 210])
    cal = calibrate(_MeanBackend(), tmp_path / "good", tmp_path / "bad", config=CalibrationConfig(method="f1"))
    assert any("rests on 2 defect image(s)" in w for w in cal.warnings)


def test_results_never_replace_files_of_another_kind(tmp_path: Path) -> None:
    record = {"kind": "preparation", "note": "hand-written"}
    (tmp_path / "preparation.json").write_text(json.dumps(record))
    (tmp_path / "README.md").write_text("# Benchmark results\n")
    payload = {**result_header("accuracy", "x", "grad-bench accuracy"), "rows": []}
    for name in ("preparation", "README"):
        with pytest.raises(GradError, match=name):
            write_result_files(tmp_path, name, payload, "# new")
    assert json.loads((tmp_path / "preparation.json").read_text()) == record
    assert (tmp_path / "README.md").read_text() == "# Benchmark results\n"
    write_result_files(tmp_path, "acc", payload, "# first")
    write_result_files(tmp_path, "acc", {**payload, "rows": [1]}, "# second")  # same kind: replaced
    assert json.loads((tmp_path / "acc.json").read_text())["rows"] == [1]
    assert (tmp_path / "acc.md").read_text() == "# second\n"


def test_a_split_written_over_an_earlier_one_keeps_no_stale_links(tmp_path: Path) -> None:
    from gradad.data.demo import DemoDataConfig, generate_demo_dataset

    root = generate_demo_dataset(tmp_path / "data", DemoDataConfig(image_size=32, train_good=1, test_good=1,
                                                                     test_per_defect=4, seed=0))
    out = tmp_path / "split"
    first = write_split([str(root)], 3, out)
    split = write_split([str(root)], 1, out)
    assert len(first["held_out"]) > len(split["held_out"])
    links = sorted(p for p in (out / "defects").rglob("*") if p.is_symlink())
    assert sorted(str(p.resolve()) for p in links) == sorted(split["held_out"])
    masks = [p for p in (out / "masks").rglob("*") if p.is_symlink()]
    assert len(masks) == len(split["held_out"])
    real = next(p for p in links).parent / "real.png"
    real.write_bytes(b"not a link")
    with pytest.raises(GradError, match="real.png is a file"):
        write_split([str(root)], 1, out)
    assert real.read_bytes() == b"not a link"


def test_bundles_of_older_models_carry_their_path_lists_and_never_read_the_files_named(tmp_path: Path) -> None:
    """A model file from before the digests lists its trained goods by folder: the bundle carries those lists as
    they are. Exporting never reads a file a model file names: a hostile one naming /etc/passwd would otherwise
    get its digest written into the bundle (and learn whether it exists)."""
    from gradad.export.onnx_export import training_data_section

    goods = _images(tmp_path / "parts" / "good", [10, 20, 30])
    payload = {"data_summary": {"total": 3}, "data_roots": [str(tmp_path)],
               "trained_goods": {str(goods[0].parent): [p.name for p in goods[:2]]},
               "held_out_goods": [str(goods[2])]}
    section = training_data_section(payload)
    assert "trained_good_digests" not in section and section["trained_goods"] == payload["trained_goods"]
    assert section["held_out_goods"] == payload["held_out_goods"]
    hostile = {"data_summary": {}, "trained_goods": {"/etc": ["passwd", "hostname"]}}
    assert "trained_good_digests" not in training_data_section(hostile)
