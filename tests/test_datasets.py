"""Tests for gradad.data.datasets and gradad.data.images (tiny fake datasets built in tmp_path)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from gradad.data.datasets import Sample, detect_layout, list_classes, load_samples, summarize
from gradad.data.images import load_sample_arrays, read_image_rgb, read_mask, resize_hw, resize_image, resize_mask
from gradad.errors import DatasetError

MTD_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mtd"


# ----------------------------------------------------------------------------------------------- builders


def _img(path: Path, hw: tuple[int, int] = (32, 32), seed: int = 0, gray: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = hw if gray else (*hw, 3)
    assert cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
    return path


def _mask(path: Path, hw: tuple[int, int] = (32, 32), value: int = 255, box=(8, 16, 8, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(hw, np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = value
    assert cv2.imwrite(str(path), m)
    return path


def _mvtec_class(root: Path, cls: str, n_train: int = 3, suffix: str = "_mask") -> Path:
    cdir = root / cls
    for i in range(n_train):
        _img(cdir / "train" / "good" / f"{i:03d}.png", seed=i)
    _img(cdir / "test" / "good" / "000.png", seed=10)
    for dtype in ("crack", "scratch"):
        for i in range(2):
            _img(cdir / "test" / dtype / f"{i:03d}.png", seed=20 + i)
            _mask(cdir / "ground_truth" / dtype / f"{i:03d}{suffix}.png")
    return cdir


# ------------------------------------------------------------------------------------------------ layouts


def test_mvtec_multi_class(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "bottle")
    _mvtec_class(tmp_path, "cable", n_train=2)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "bottle" / "train" / "good" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "bottle" / "train" / "good" / "notes.txt").write_text("x")
    _img(tmp_path / "bottle" / "train" / "good" / "UPPER.JPG", seed=5)

    assert detect_layout(tmp_path) == "mvtec"
    assert list_classes(tmp_path) == ["bottle", "cable"]
    train = load_samples(tmp_path, "train")
    assert [s.class_name for s in train] == ["bottle"] * 4 + ["cable"] * 2
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert [s.image_path.name for s in train[:4]] == ["000.png", "001.png", "002.png", "UPPER.JPG"]

    test = load_samples(tmp_path, "test", classes=["cable"])
    assert [(s.defect_type, s.label) for s in test] == [("good", 0)] + [("crack", 1)] * 2 + [("scratch", 1)] * 2
    for s in test:
        assert s.split == "test" and s.class_name == "cable"
        if s.label:
            assert s.mask_path == tmp_path / "cable" / "ground_truth" / s.defect_type / f"{s.image_path.stem}_mask.png"
        else:
            assert s.mask_path is None
    assert load_samples(tmp_path, "test") == load_samples(tmp_path, "test")  # deterministic


def test_mvtec_single_class_root(tmp_path: Path) -> None:
    cdir = _mvtec_class(tmp_path, "hazelnut")
    assert detect_layout(cdir) == "mvtec"
    assert list_classes(cdir) == ["hazelnut"]
    assert len(load_samples(cdir, "train")) == 3
    test = load_samples(cdir, "test", classes=["hazelnut"])
    assert len(test) == 5 and all(s.class_name == "hazelnut" for s in test)


def test_root_inside_class_folder_rejected(tmp_path: Path) -> None:
    cdir = _mvtec_class(tmp_path, "bottle")
    with pytest.raises(DatasetError, match="inside the class folder"):
        load_samples(cdir / "test", "train")


def test_goodsad_mask_naming(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "drink_can", suffix="")
    assert detect_layout(tmp_path) == "goodsad"
    test = load_samples(tmp_path, "test")
    defects = [s for s in test if s.label]
    assert len(defects) == 4
    for s in defects:
        assert s.mask_path == tmp_path / "drink_can" / "ground_truth" / s.defect_type / f"{s.image_path.stem}.png"
    # the same reader handles both namings even with an explicit layout
    assert load_samples(tmp_path, "test", layout="mvtec") == test


def test_missing_mask_is_warning_not_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cdir = _mvtec_class(tmp_path, "bottle")
    (cdir / "ground_truth" / "crack" / "001_mask.png").unlink()
    with caplog.at_level(logging.WARNING, logger="gradad.data.datasets"):
        test = load_samples(tmp_path, "test")
    no_mask = [s for s in test if s.label and s.mask_path is None]
    assert [s.image_path.name for s in no_mask] == ["001.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bottle" in warnings[0].getMessage()
    img, mask = load_sample_arrays(no_mask[0], 16)
    assert img.shape == (16, 16, 3) and not mask.any()


def _visa(root: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for cls in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel, seed=i)
            rows.append(f"{cls},train,normal,{rel},")
        rel = f"{cls}/Data/Images/Normal/0100.JPG"
        _img(root / rel, seed=7)
        rows.append(f"{cls},test,normal,{rel},")
        for i in range(2):
            rel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel, seed=30 + i)
            _mask(root / mrel, value=1 + i)  # raw VisA masks hold small non-zero label values
            rows.append(f"{cls},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


def test_visa_csv(tmp_path: Path) -> None:
    _visa(tmp_path)
    assert detect_layout(tmp_path) == "visa"
    assert list_classes(tmp_path) == ["candle", "pcb1"]
    train = load_samples(tmp_path, "train")
    assert len(train) == 6 and all(s.label == 0 and s.split == "train" for s in train)
    test = load_samples(tmp_path, "test", classes=["pcb1"])
    assert [s.label for s in test] == [0, 1, 1]
    assert test[0].mask_path is None and test[0].defect_type == "good"
    assert test[1].defect_type == "anomaly"
    assert test[1].mask_path == tmp_path / "pcb1/Data/Masks/Anomaly/000.png"
    _, mask = load_sample_arrays(test[1], 32)
    assert mask.sum() == 64  # value-1 label mask counts as defect (threshold 0 for VisA)


def test_visa_missing_image_and_bad_csv(tmp_path: Path) -> None:
    _visa(tmp_path)
    (tmp_path / "candle/Data/Images/Normal/0001.JPG").unlink()
    with pytest.raises(DatasetError, match="0001.JPG"):
        load_samples(tmp_path, "train", classes=["candle"])
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,image\ncandle,train,x.png\n")
    with pytest.raises(DatasetError, match="label"):
        list_classes(tmp_path)


def test_generic_folder_deterministic_split(tmp_path: Path) -> None:
    cdir = tmp_path / "widget"
    for i in range(12):
        _img(cdir / "good" / f"g{i:02d}.png", seed=i)
    _img(cdir / "defect" / "d0.png", seed=40)
    _img(cdir / "defect" / "d1.png", seed=41)
    _img(cdir / "defect" / "dent" / "d2.jpg", seed=42)
    _mask(cdir / "masks" / "d0.png")
    _mask(cdir / "masks" / "d1_mask.png")
    _mask(cdir / "masks" / "dent" / "d2.png")
    assert detect_layout(tmp_path) == "folder"
    assert list_classes(tmp_path) == ["widget"]

    train = load_samples(tmp_path, "train")
    test = load_samples(tmp_path, "test")
    train_names = [s.image_path.name for s in train]
    test_good = [s.image_path.name for s in test if s.label == 0]
    assert test_good == ["g04.png", "g09.png"]  # every 5th sorted file (positions 5, 10)
    assert len(train_names) == 10 and not set(train_names) & set(test_good)
    defects = [s for s in test if s.label]
    assert [(s.image_path.name, s.defect_type) for s in defects] == [
        ("d0.png", "defect"),
        ("d1.png", "defect"),
        ("d2.jpg", "dent"),
    ]
    assert [s.mask_path.name for s in defects] == ["d0.png", "d1_mask.png", "d2.png"]
    assert load_samples(tmp_path, "train") == train
    # a single class folder works as root too
    assert load_samples(cdir, "train") == train


def test_generic_folder_with_test_dir(tmp_path: Path) -> None:
    cdir = tmp_path / "widget"
    for i in range(6):
        _img(cdir / "good" / f"g{i}.png", seed=i)
    _img(cdir / "test" / "good" / "t0.png")
    _img(cdir / "test" / "hole" / "h0.png")
    _mask(cdir / "ground_truth" / "hole" / "h0_mask.png")
    assert detect_layout(tmp_path) == "folder"
    assert len(load_samples(tmp_path, "train")) == 6  # all of good/ trains
    test = load_samples(tmp_path, "test")
    assert [(s.image_path.name, s.label, s.defect_type) for s in test] == [("t0.png", 0, "good"), ("h0.png", 1, "hole")]
    assert test[1].mask_path is not None and test[1].mask_path.name == "h0_mask.png"


def test_summarize(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "bottle")
    samples = load_samples(tmp_path, "train") + load_samples(tmp_path, "test")
    summary = summarize(samples)
    json.dumps(summary)
    assert summary["total"] == 8 and summary["anomalous"] == 4 and summary["with_mask"] == 4
    assert summary["splits"]["train"]["total"] == 3
    test = summary["classes"]["bottle"]["test"]
    assert test["defect_types"] == {"good": 1, "crack": 2, "scratch": 2}
    assert test["normal"] == 1 and test["anomalous"] == 4


# ------------------------------------------------------------------------------------------------- errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist.*nope"):
        load_samples(tmp_path / "nope", "train")


def test_unrecognised_layout(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    with pytest.raises(DatasetError, match="not a recognised dataset layout.*tried.*visa.*folder"):
        detect_layout(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset layout 'coco'"):
        list_classes(tmp_path, layout="coco")


def test_bad_split(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "bottle")
    with pytest.raises(DatasetError, match="split 'val'"):
        load_samples(tmp_path, "val")


def test_unknown_class_lists_available(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "bottle")
    _mvtec_class(tmp_path, "cable")
    with pytest.raises(DatasetError, match="'screw' not found.*available: bottle, cable"):
        load_samples(tmp_path, "train", classes=["screw"])


def test_empty_class(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "bottle")
    _mvtec_class(tmp_path, "cable", n_train=0)
    (tmp_path / "cable" / "train" / "good").mkdir(parents=True)
    assert list_classes(tmp_path) == ["bottle", "cable"]
    with pytest.raises(DatasetError, match="empty class 'cable'"):
        load_samples(tmp_path, "train")
    assert len(load_samples(tmp_path, "train", classes=["bottle"])) == 3


def test_corrupt_image_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DatasetError, match="cannot decode image.*broken.png"):
        read_image_rgb(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.png"):
        read_image_rgb(empty)
    with pytest.raises(DatasetError, match="not found.*missing.png"):
        read_image_rgb(tmp_path / "missing.png")
    with pytest.raises(DatasetError, match="cannot decode mask.*broken.png"):
        read_mask(bad, None)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    cdir = _mvtec_class(tmp_path, "bottle")
    _mask(cdir / "ground_truth" / "crack" / "000_mask.png", hw=(30, 40))
    sample = next(s for s in load_samples(tmp_path, "test") if s.image_path.name == "000.png" and s.label)
    with pytest.raises(DatasetError, match=r"30x40.*32x32.*000_mask\.png"):
        load_sample_arrays(sample, 16)


# ------------------------------------------------------------------------------------------- image/mask IO


def test_read_image_rgb_order_and_gray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV's BGR
    p = tmp_path / "blue ü.png"  # non-ASCII path
    cv2.imwrite(str(tmp_path / "tmp.png"), bgr)
    (tmp_path / "tmp.png").rename(p)
    rgb = read_image_rgb(p)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 2] == 255).all() and (rgb[..., 0] == 0).all()
    g = read_image_rgb(_img(tmp_path / "gray.png", hw=(6, 7), gray=True))
    assert g.shape == (6, 7, 3) and (g[..., 0] == g[..., 1]).all()


def test_mask_binarised_at_127(tmp_path: Path) -> None:
    p = tmp_path / "m.png"
    vals = np.array([[0, 1, 126, 127], [128, 200, 254, 255]], np.uint8)
    cv2.imwrite(str(p), vals)
    m = read_mask(p, expected_hw=(2, 4))
    assert m.dtype == bool
    assert m.tolist() == [[False, False, False, False], [True, True, True, True]]
    assert read_mask(p, threshold=0).tolist() == [[False, True, True, True], [True, True, True, True]]


def test_resize_varying_sizes_nearest_masks(tmp_path: Path) -> None:
    cdir = tmp_path / "tile"
    _img(cdir / "train" / "good" / "a.png", hw=(20, 50))
    for name, hw in (("wide", (24, 60)), ("tall", (90, 30)), ("small", (10, 12))):
        _img(cdir / "test" / "crack" / f"{name}.png", hw=hw)
        m = np.zeros(hw, np.uint8)
        m[: hw[0] // 2, : hw[1] // 2] = 255
        m[-1, -1] = 100  # grey edge value: background after binarising
        (cdir / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(cdir / "ground_truth" / "crack" / f"{name}_mask.png"), m)
    for s in load_samples(cdir, "test"):
        img, mask = load_sample_arrays(s, 32)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert mask.shape == (32, 32) and mask.dtype == bool
        # nearest interpolation keeps a crisp quadrant: exactly the top-left 16x16 block
        expected = np.zeros((32, 32), bool)
        expected[:16, :16] = True
        assert (mask == expected).all(), s.image_path.name
    # direct helpers
    big = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert resize_image(big, 16).shape == (16, 16, 3)
    assert resize_image(big[:10, :40], 16).shape == (16, 16, 3)  # mixed grow/shrink
    assert set(np.unique(resize_mask(np.eye(40, dtype=bool), 20))) <= {False, True}


@pytest.mark.parametrize("tall", [False, True])
def test_a_narrow_tile_is_anti_aliased_along_the_axis_that_shrinks(tall: bool) -> None:
    """A 100 x 600 tile with one-pixel stripes across its long side, resized to 256 x 256: the long axis shrinks
    2.3x and must be averaged (the stripes become a flat grey), as a tile shrinking along both axes would be;
    one bilinear pass sampled the stripes (aliasing: a beat pattern from black to white, std ~ 60+)."""
    stripes = np.zeros((100, 600, 3), np.uint8)
    stripes[:, ::2] = 255
    img = np.ascontiguousarray(stripes.transpose(1, 0, 2)) if tall else stripes
    out = resize_hw(img, 256, 256).astype(float)
    assert out.shape == (256, 256, 3)
    assert out.std() < 25.0 and abs(out.mean() - 127.5) < 3.0  # area averaging over 2.34 px: ~16 left
    # the axis that grows is interpolated as before: a horizontal ramp on a short, wide image keeps its order
    ramp = np.tile(np.linspace(0, 255, 600, dtype=np.float32).astype(np.uint8), (100, 1))[..., None].repeat(3, 2)
    row = resize_hw(ramp, 256, 256)[128, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and row[0] < 5 and row[-1] > 250


def test_sample_is_frozen() -> None:
    s = Sample(Path("a.png"), "c", "train", 0, "good", None)
    with pytest.raises(Exception):
        s.label = 1  # type: ignore[misc]
    assert s.mask_threshold == 127


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not MTD_ROOT.is_dir(), reason=f"real dataset not available: {MTD_ROOT}")
def test_mtd_real_dataset() -> None:
    assert detect_layout(MTD_ROOT) == "mvtec"
    assert list_classes(MTD_ROOT) == ["magnetic_tile"]
    train = load_samples(MTD_ROOT, "train")
    test = load_samples(MTD_ROOT, "test")
    assert len(train) == 760 and all(s.label == 0 for s in train)
    counts = summarize(test)["classes"]["magnetic_tile"]["test"]["defect_types"]
    assert counts == {"good": 96, "blowhole": 57, "break": 42, "crack": 28, "fray": 16, "uneven": 51}
    defects = [s for s in test if s.label]
    assert all(s.mask_path is not None for s in defects)
    empty = 0
    for s in defects:
        h, w = read_image_rgb(s.image_path).shape[:2]
        if not read_mask(s.mask_path, expected_hw=(h, w)).any():
            empty += 1
    assert empty == 3
