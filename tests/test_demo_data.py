"""Tests of the procedural demo data generator (gradad.data.demo) and its CLI (grad-demo-data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from gradad.data.demo import (
    ALL_CLASSES,
    DEFECT_TYPES,
    MARKER_NAME,
    MAX_DEFECT_AREA,
    MIN_DEFECT_AREA,
    OBJECT_CLASSES,
    DemoDataConfig,
    apply_defect,
    generate_demo_dataset,
    render_good,
    sample_rng,
)
from gradad.data.demo_cli import main
from gradad.errors import DatasetError

SMALL = DemoDataConfig(image_size=96, train_good=3, test_good=2, test_per_defect=2, seed=7)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", SMALL)


def _read(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, path
    return img


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(small_dataset: Path) -> None:
    root = small_dataset
    assert len(SMALL.classes) >= 3
    for cls in SMALL.classes:
        assert len(list((root / cls / "train" / "good").glob("*.png"))) == SMALL.train_good
        assert len(list((root / cls / "test" / "good").glob("*.png"))) == SMALL.test_good
        test_dirs = {p.name for p in (root / cls / "test").iterdir()}
        assert test_dirs == {"good", *SMALL.defect_types}
        assert {p.name for p in (root / cls / "ground_truth").iterdir()} == set(SMALL.defect_types)
        for defect in SMALL.defect_types:
            images = sorted((root / cls / "test" / defect).glob("*.png"))
            masks = sorted((root / cls / "ground_truth" / defect).glob("*_mask.png"))
            assert len(images) == len(masks) == SMALL.test_per_defect
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["config"]["classes"] == list(SMALL.classes)
    assert marker["config"]["seed"] == SMALL.seed
    n_per_class = SMALL.train_good + SMALL.test_good + SMALL.test_per_defect * len(SMALL.defect_types)
    assert marker["images"] == n_per_class * len(SMALL.classes)
    assert marker["counts"][SMALL.classes[0]]["train/good"] == SMALL.train_good
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".ds.partial")]


def test_images_and_masks(small_dataset: Path) -> None:
    size = SMALL.image_size
    for img_path in small_dataset.rglob("*.png"):
        if "ground_truth" in img_path.parts:
            continue
        img = _read(img_path)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        defect = img_path.parent.name
        if defect == "good":
            continue
        cls = img_path.parts[-4]
        mask = _read(small_dataset / cls / "ground_truth" / defect / f"{img_path.stem}_mask.png")
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}
        area = float((mask > 0).mean())
        assert MIN_DEFECT_AREA <= area <= MAX_DEFECT_AREA, (img_path, area)


def test_saved_defect_matches_good_render(small_dataset: Path) -> None:
    """The stored image differs from the defect-free render exactly inside the stored mask (RGB saved as BGR)."""
    cls, defect = "nut", "crack"
    rng = sample_rng(SMALL.seed, cls, "test", defect, 1)
    good, _ = render_good(cls, rng, SMALL.image_size)
    stored = _read(small_dataset / cls / "test" / defect / "001.png", cv2.IMREAD_COLOR)[..., ::-1]
    mask = _read(small_dataset / cls / "ground_truth" / defect / "001_mask.png") > 0
    assert np.array_equal(stored[~mask], good[~mask])
    assert np.abs(stored[mask].astype(int) - good[mask]).mean() > 25


def test_determinism(tmp_path: Path) -> None:
    cfg = DemoDataConfig(
        classes=("fabric", "capsule"), image_size=64, train_good=2, test_good=1, test_per_defect=1, seed=3
    )
    a = _files(generate_demo_dataset(tmp_path / "a", cfg))
    b = _files(generate_demo_dataset(tmp_path / "b", cfg))
    assert a == b
    c = _files(generate_demo_dataset(tmp_path / "c", dataclasses.replace(cfg, seed=4)))
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != c[k] for k in pngs)
    # An image does not depend on which other classes are generated.
    d = _files(generate_demo_dataset(tmp_path / "d", dataclasses.replace(cfg, classes=("capsule",))))
    assert d["capsule/test/spot/000.png"] == a["capsule/test/spot/000.png"]


def test_normal_images_vary() -> None:
    for cls in ALL_CLASSES:
        imgs = [render_good(cls, sample_rng(0, cls, "train", "good", i), 96)[0].astype(np.float32) for i in range(3)]
        assert np.abs(imgs[0] - imgs[1]).mean() > 2.0, cls
        assert np.abs(imgs[1] - imgs[2]).mean() > 2.0, cls
        assert 40 < imgs[0].mean() < 220, cls


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_apply_defect_changes_only_masked_pixels(cls: str, defect: str) -> None:
    for index in range(3):
        rng = sample_rng(11, cls, "test", defect, index)
        good, obj = render_good(cls, rng, 128)
        before = good.copy()
        bad, mask = apply_defect(good, obj, defect, rng)
        assert np.array_equal(good, before), "input must not be modified"
        assert bad.shape == good.shape and bad.dtype == np.uint8
        assert mask.dtype == bool and mask.shape == good.shape[:2]
        assert np.array_equal(bad[~mask], good[~mask])
        diff = np.abs(bad.astype(int) - good.astype(int))
        assert diff[mask].mean() > 25, (cls, defect, diff[mask].mean())
        assert (diff.max(axis=2)[mask] > 0).mean() > 0.9
        assert MIN_DEFECT_AREA <= mask.mean() <= MAX_DEFECT_AREA
        assert not (mask & ~obj).any(), "defect outside the object"
        if cls in OBJECT_CLASSES:
            assert 0.05 < obj.mean() < 0.6


def test_refuses_non_empty_folder_without_marker(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = DemoDataConfig(classes=("fabric",), image_size=64, train_good=1, test_good=0, test_per_defect=0)
    with pytest.raises(DatasetError, match="precious"):
        generate_demo_dataset(out, cfg)
    with pytest.raises(DatasetError, match="marker"):
        generate_demo_dataset(out, cfg, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_overwrite_own_dataset_only(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    cfg = DemoDataConfig(classes=("nut",), image_size=64, train_good=2, test_good=0, test_per_defect=0)
    generate_demo_dataset(out, cfg)
    with pytest.raises(DatasetError, match="not empty"):
        generate_demo_dataset(out, cfg)
    cfg2 = DemoDataConfig(classes=("capsule",), image_size=64, train_good=1, test_good=0, test_per_defect=0)
    generate_demo_dataset(out, cfg2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["capsule", MARKER_NAME])
    # A foreign file inside a generated folder blocks the overwrite.
    (out / "capsule" / "labels.csv").write_text("x")
    with pytest.raises(DatasetError, match="labels.csv"):
        generate_demo_dataset(out, cfg, overwrite=True)
    assert (out / "capsule" / "labels.csv").exists()
    # An empty existing folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_demo_dataset(empty, cfg)
    assert (empty / MARKER_NAME).exists()


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"classes": ("fabric", "bolt")}, "classes"),
        ({"defect_types": ("dent",)}, "defect_types"),
        ({"classes": ()}, "classes"),
        ({"image_size": 8}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_settings(tmp_path: Path, kwargs: dict, setting: str) -> None:
    with pytest.raises(DatasetError, match=setting):
        generate_demo_dataset(tmp_path / "x", DemoDataConfig(**kwargs))
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    args = [str(out), "--size", "64", "--train", "2", "--test-good", "1", "--test-per-defect", "1", "--seed", "5",
            "--classes", "fabric,nut"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["fabric", "nut", MARKER_NAME])
    assert len(list((out / "nut" / "train" / "good").glob("*.png"))) == 2
    assert _read(out / "fabric" / "test" / "scratch" / "000.png").shape == (64, 64, 3)
    assert json.loads((out / MARKER_NAME).read_text())["config"]["seed"] == 5

    again = runner.invoke(main, args)
    assert again.exit_code == 2
    assert "not empty" in again.output and "Traceback" not in again.output
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0

    bad = runner.invoke(main, [str(tmp_path / "bad"), "--classes", "fabric,bolt", "--size", "64"])
    assert bad.exit_code == 2
    assert "bolt" in bad.output and "classes" in bad.output
    assert not (tmp_path / "bad").exists()

    helped = runner.invoke(main, ["--help"])
    assert helped.exit_code == 0 and "--test-per-defect" in helped.output and "OUT_DIR" in helped.output
