"""Hostile or unusual training inputs: dataset files naming paths outside their root, held-out defects, the feature
cache key, label masks, mask matching, run directories, reproducibility, config values and diverged runs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gradad.data.datasets import Sample, load_samples
from gradad.errors import DatasetError
from test_datasets import _img, _mask  # the image and mask file writers the dataset tests use


# ------------------------------------------------------------------------------- 1. VisA CSV path traversal


def _visa_csv(root: Path, cls: str = "pcb", image: str = "img/t1.png", mask: str = "img/t1_mask.png") -> Path:
    for i in range(3):
        _img(root / f"img/g{i}.png", seed=i)
    _img(root / "img/t0.png", seed=5)
    _img(root / "img/t1.png", seed=6)
    _mask(root / "img/t1_mask.png")
    rows = ["object,split,label,image,mask", *(f"pcb,train,normal,img/g{i}.png," for i in range(3)),
            "pcb,test,normal,img/t0.png,", f"{cls},test,anomaly,{image},{mask}"]
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


@pytest.mark.parametrize("cls", ["../../../escaped/pwn", "a/b", "a\\b", "..", ".hidden"])
def test_a_visa_class_name_that_is_not_one_plain_name_is_refused(tmp_path: Path, cls: str) -> None:
    _visa_csv(tmp_path, cls=cls)
    with pytest.raises(DatasetError, match=r"1cls\.csv line 6: object .* not a usable class name") as err:
        load_samples(tmp_path, "test")
    assert "\n" not in str(err.value)


def test_a_visa_row_with_an_empty_class_name_is_refused(tmp_path: Path) -> None:
    _visa_csv(tmp_path, cls="")
    with pytest.raises(DatasetError, match=r"line 6: object '' is not a usable class name \(empty\)"):
        load_samples(tmp_path, "test")


@pytest.mark.parametrize("column", ["image", "mask"])
@pytest.mark.parametrize("absolute", [False, True])
def test_visa_image_and_mask_paths_must_stay_inside_the_root(tmp_path: Path, column: str, absolute: bool) -> None:
    root = tmp_path / "visa"
    outside = _img(tmp_path / "outside.png")
    listed = str(outside) if absolute else f"img/../../{outside.name}"
    _visa_csv(root, **{column: listed})
    with pytest.raises(DatasetError, match=rf"{column} '{listed}' listed in .*1cls\.csv lies outside"):
        load_samples(root, "test")


def test_visa_files_linked_from_a_shared_store_still_read(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    _visa_csv(root)
    store = tmp_path / "store"
    store.mkdir()
    (root / "img" / "t1.png").rename(store / "t1.png")
    (root / "img" / "t1.png").symlink_to(store / "t1.png")
    assert [s.image_path.name for s in load_samples(root, "test") if s.label] == ["t1.png"]


def test_figure_file_names_cannot_leave_the_figures_folder(tmp_path: Path) -> None:
    from gradad.evaluation.evaluate import figure_file_name, save_figures

    hostile = Sample(tmp_path / "x" / "..img.png", "../../../escaped/pwn", "test", 1, "..\\..\\up", None)
    name = figure_file_name(hostile)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    figures = tmp_path / "out" / "figures"
    maps = np.zeros((1, 8, 8), np.float32)
    paths = save_figures(tmp_path / "out", [hostile], np.zeros(1), maps, np.zeros((1, 8, 8, 3), np.uint8),
                         np.zeros((1, 8, 8), bool))
    assert len(paths) == 1 and Path(paths[0]).resolve().parent == figures.resolve()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    plain = Sample(tmp_path / "000.png", "nut", "test", 1, "crack", None)
    assert figure_file_name(plain) == "nut_crack_000.png"  # ordinary names are unchanged


# ------------------------------------------------------------------- 2. defects held out of stage 1 are recorded


def _tiny_cfg(root: Path, out: Path, classes: list[str] | None = None):
    from gradad.training.config import preset_config

    cfg = preset_config("tiny")
    cfg.data.root = str(root)
    cfg.data.classes = classes
    cfg.data.cache_dir = str(out / "cache")
    cfg.output_dir = str(out / "run")
    cfg.train.device = "cpu"
    return cfg


def _link_defects(root: Path, cls: str, dest: Path) -> list[Path]:
    """grad-bench split's layout: DEST/<class>/<type>/<image> as links to the test images."""
    made = []
    for img in sorted((root / cls / "test").glob("*/*.png")):
        if img.parent.name != "good":
            link = dest / cls / img.parent.name / img.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(img)
            made.append(img.resolve())
    return made


def test_defects_held_out_for_the_self_check_are_recorded_and_never_scored(tiny_demo_root: Path,
                                                                         tmp_path: Path) -> None:
    from gradad.data.tuning_split import scoring_selection
    from gradad.training.checkpoint import read_checkpoint, trained_defect_paths, tuned_defect_paths
    from gradad.training.trainer import train

    linked = _link_defects(tiny_demo_root, "nut", tmp_path / "defects")
    cfg = _tiny_cfg(tiny_demo_root, tmp_path, ["nut"])
    cfg.data.defects = str(tmp_path / "defects")
    cfg.data.defect_holdout = 0.5
    model_path = train(cfg)
    payload = read_checkpoint(model_path)
    trained, tuned = set(payload["trained_defects"]), set(payload["tuned_defects"])
    assert tuned and trained and not tuned & trained and tuned | trained == {str(p) for p in linked}
    assert tuned_defect_paths(payload) == tuned and trained_defect_paths(payload) == trained | tuned
    # the good images held out for validation, and the training roots: what grad-calibrate's input check reads
    from gradad.export.onnx_export import training_data_section
    from gradad.training.validation import validation_indices

    goods = [s for s in load_samples(tiny_demo_root, "train", ["nut"]) if s.label == 0]
    held = sorted(str(goods[i].image_path.resolve()) for i in validation_indices(goods, cfg.data.val_fraction))
    assert held and payload["held_out_goods"] == held and payload["data_roots"] == [str(tiny_demo_root.resolve())]
    folder = str((tiny_demo_root / "nut" / "train" / "good").resolve())
    trained_goods = sorted(s.image_path.name for s in goods if str(s.image_path.resolve()) not in held)
    assert payload["trained_goods"] == {folder: trained_goods} and len(trained_goods) + len(held) == len(goods)
    # the bundle names no training-machine file: content digests of the trained goods (none of the held-out ones)
    from gradad.bundle import image_digest

    digests = sorted({image_digest(s.image_path) for s in goods if str(s.image_path.resolve()) not in held})
    assert payload["trained_good_digests"] == digests
    assert not {image_digest(p) for p in held} & set(digests)
    section = training_data_section(payload)
    assert section["trained_good_digests"] == digests and section["total"] == len(goods)
    assert not {"trained_goods", "held_out_goods", "data_roots"} & set(section)
    assert not any(str(tiny_demo_root.resolve()) in str(v) for v in section.values())

    test = load_samples(tiny_demo_root, "test", ["nut"])
    sel = scoring_selection(test, None, trained_defect_paths(payload), tuned_defect_paths(payload))
    assert (sel.n_trained, sel.n_tuned) == (len(trained), len(tuned))
    assert not {str(s.image_path.resolve()) for s in sel.kept} & (trained | tuned)
    # what grad-bench accuracy passes: the model file's list alone leaves out both
    alone = scoring_selection(test, None, trained_defect_paths(payload))
    assert alone.kept == sel.kept and alone.n_trained + alone.n_tuned == len(linked)
    # grad-eval leaves both out and counts them apart
    import json

    from click.testing import CliRunner

    from gradad.evaluation.cli import main as grad_eval

    result = CliRunner().invoke(grad_eval, [str(model_path), "-o", str(tmp_path / "eval"), "--figures", "0",
                                            "--device", "cpu"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (meta["n_trained_defects_left_out"], meta["n_tuned_defects_left_out"]) == (len(trained), len(tuned))
    assert meta["n_test_images"] == len(test) - len(linked)
    # the copy a bundle carries (grad-refine prepare) names no training-machine path: its defects by content,
    # and the tuning/scoring selection leaves out the same images by content
    from gradad.training.checkpoint import self_contained_payload

    copy = self_contained_payload(model_path)
    text = repr({k: v for k, v in copy.items() if k not in ("state_dict", "extractor_state_dict")})
    assert str(tiny_demo_root.resolve()) not in text and str(tmp_path) not in text
    assert not {"data_roots", "trained_goods", "held_out_goods"} & set(copy)
    assert all(d.startswith("digest:") for d in copy["trained_defects"] + copy["tuned_defects"])
    from_copy = scoring_selection(test, None, trained_defect_paths(copy), tuned_defect_paths(copy))
    assert from_copy.kept == sel.kept and (from_copy.n_trained, from_copy.n_tuned) == (sel.n_trained, sel.n_tuned)


# ------------------------------------------------------------------- 3. feature cache key of a weights file


def test_the_feature_cache_key_tells_weights_files_of_one_name_and_size_apart(tiny_demo_root: Path,
                                                                             tmp_path: Path) -> None:
    import os

    import torch

    from gradad.training.backbone import FeatureExtractor, packaged_weights_path, weights_fingerprint
    from gradad.training.config import BackboneConfig
    from gradad.training.features import cache_key

    state = torch.load(packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    files = []
    for sub, scale in (("a", 1.0), ("b", 0.5)):  # two fine-tunes saved under one name, same size
        (tmp_path / sub).mkdir()
        torch.save({k: v * scale if v.is_floating_point() and "_blocks.1." in k else v for k, v in state.items()},
                   tmp_path / sub / "backbone.pth")
        files.append(tmp_path / sub / "backbone.pth")
    assert files[0].stat().st_size == files[1].stat().st_size
    samples = load_samples(tiny_demo_root, "train", ["nut"])[:2]
    a, b = (FeatureExtractor(BackboneConfig(weights=str(f))) for f in files)
    assert a.weights_fingerprint != b.weights_fingerprint
    assert cache_key(a, 64, samples) != cache_key(b, 64, samples)
    # content, not name: the same bytes elsewhere give the same fingerprint; new bytes of one size in place do not
    twin = tmp_path / "backbone.pth"
    twin.write_bytes(files[0].read_bytes())
    assert weights_fingerprint(twin) == a.weights_fingerprint
    before = weights_fingerprint(twin)
    twin.write_bytes(files[1].read_bytes())
    os.utime(twin, ns=(twin.stat().st_atime_ns, twin.stat().st_mtime_ns + 10**9))
    assert weights_fingerprint(twin) != before


def test_a_model_file_never_makes_gradad_read_a_weights_file_it_names(tiny_demo_root: Path, tmp_path: Path) -> None:
    """Trained on a weights file, the model file holds the extractor; a model file that names a file instead (a
    hostile one naming any file of the user's) is refused without reading it."""
    import shutil

    import torch

    from gradad.errors import CheckpointError
    from gradad.training.backbone import packaged_weights_path
    from gradad.training.checkpoint import atomic_torch_save, load_detector, read_checkpoint
    from gradad.training.trainer import train

    weights = tmp_path / "finetuned" / "backbone.pth"
    weights.parent.mkdir()
    shutil.copy(packaged_weights_path("tf_efficientnet_lite0"), weights)
    cfg = _tiny_cfg(tiny_demo_root, tmp_path, ["nut"])
    cfg.backbone.weights = str(weights)
    cfg.train.stage1_epochs = cfg.train.stage2_epochs = 1
    model_path = train(cfg)
    weights.unlink()  # the model file travels without it
    detector, payload = load_detector(model_path)
    assert "extractor_state_dict" in payload and detector.extractor.channels == payload["channels"]

    hostile = read_checkpoint(model_path)
    del hostile["extractor_state_dict"]
    secret = tmp_path / "secret.txt"
    secret.write_text("not weights")
    hostile["config"]["backbone"]["weights"] = str(secret)
    atomic_torch_save(hostile, tmp_path / "hostile.pt")
    opened = []
    real_load = torch.load
    torch.load = lambda f, *a, **k: (opened.append(str(f)), real_load(f, *a, **k))[1]  # type: ignore[assignment]
    try:
        with pytest.raises(CheckpointError, match="never reads a file it names"):
            load_detector(tmp_path / "hostile.pt")
    finally:
        torch.load = real_load  # type: ignore[assignment]
    assert str(secret) not in opened


# --------------------------------------------------------------------------------------- 4. 0/1 label masks


def test_a_0_1_label_mask_reads_its_ones_as_defect(tmp_path: Path) -> None:
    import torch

    from gradad.data.images import read_mask
    from gradad.training.defects import cell_masks, defect_samples
    from gradad.training.features import load_images

    one = _mask(tmp_path / "masks" / "d0.png", value=1)
    assert read_mask(one).sum() == 64 and read_mask(one, threshold=200).sum() == 64
    # 0/255 masks keep the rule value > 127
    vals = np.array([[0, 1, 127, 128, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "m255.png"), vals)
    assert read_mask(tmp_path / "m255.png").tolist() == [[False, False, False, True, True]]
    # --defects with 0/1 masks: the defect is defective cells, not normal ones
    _img(tmp_path / "defects" / "d0.png")
    samples = defect_samples(tmp_path / "defects", tmp_path / "masks")
    _, masks = load_images(samples, 32)
    assert masks.sum() == 64
    assert cell_masks(torch.from_numpy(masks), (4, 4), [True]).sum() == 1
    # and in a dataset's test split (grad-eval's ground truth)
    for i in range(5):
        _img(tmp_path / "ds" / "part" / "good" / f"g{i}.png", seed=i)
    _img(tmp_path / "ds" / "part" / "defect" / "d0.png")
    _mask(tmp_path / "ds" / "part" / "masks" / "d0.png", value=1)
    _, test_masks = load_images([s for s in load_samples(tmp_path / "ds", "test") if s.label], 32)
    assert test_masks.sum() == 64


def test_a_thin_labelled_defect_marks_its_most_covered_cell() -> None:
    import torch

    from gradad.training.defects import cell_masks

    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 10, 3:30] = True  # a one-pixel scratch: at most 1/8 of any 8x8 cell
    masks[0, 9, 17:24] = True  # a little more of it in cell (1, 2)
    masks[2, 0:16, 0:16] = True  # a large defect: unchanged rule
    cells = cell_masks(masks, (4, 4), [True, True, True])
    assert cells[0].sum() == 1 and cells[0, 0, 1, 2] == 1
    assert cells[1].sum() == 0  # an empty mask stays all normal
    assert cells[2].sum() == 4


# ------------------------------------------------------------------- 5. loose mask names in the folder layout


def _folder_class(root: Path) -> Path:
    cdir = root / "part"
    for i in range(5):
        _img(cdir / "good" / f"g{i}.png", seed=i)
    return cdir


def test_an_image_without_a_mask_never_takes_another_images_mask(tmp_path: Path) -> None:
    cdir = _folder_class(tmp_path)
    _img(cdir / "defect" / "lot7.png")  # its mask was never drawn
    _img(cdir / "defect" / "lot7_b.png")
    _mask(cdir / "masks" / "lot7_b_mask.png")
    _img(cdir / "defect" / "lot9.png")
    _mask(cdir / "masks" / "lot9_v2.png")  # a loose name that no other image claims still matches
    masks = {s.image_path.name: s.mask_path and s.mask_path.name for s in load_samples(tmp_path, "test") if s.label}
    assert masks == {"lot7.png": None, "lot7_b.png": "lot7_b_mask.png", "lot9.png": "lot9_v2.png"}


def test_a_mask_two_images_claim_is_refused(tmp_path: Path) -> None:
    cdir = _folder_class(tmp_path)
    _img(cdir / "defect" / "lot7.png")
    _img(cdir / "defect" / "lot7_b.png")
    _mask(cdir / "masks" / "lot7_b_x.png")  # loose for both lot7 and lot7_b
    with pytest.raises(DatasetError, match=r"mask .*lot7_b_x\.png matches two images, .*lot7\.png and .*lot7_b\.png"):
        load_samples(tmp_path, "test")
    # the same with a test/ folder (MVTec-style folders, masks in masks/)
    other = tmp_path / "other"
    cdir = _folder_class(other)
    _img(cdir / "test" / "good" / "t0.png")
    _img(cdir / "test" / "dent" / "lot7.png")
    _img(cdir / "test" / "dent" / "lot7_b.png")
    _mask(cdir / "masks" / "dent" / "lot7_b_x.png")
    with pytest.raises(DatasetError, match="matches two images"):
        load_samples(other, "test")


# ------------------------------------------------------------------- 6./9. run directories a run would destroy


def test_resume_without_a_checkpoint_never_replaces_the_finished_model(tiny_demo_root: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gradad.errors import ConfigError
    from gradad.training.cli import main
    from gradad.training.trainer import train

    cfg = _tiny_cfg(tiny_demo_root, tmp_path, ["nut"])
    model_path = train(cfg)
    run = Path(cfg.output_dir)
    (run / "checkpoint.pt").unlink()  # deleted to save space
    before = model_path.read_bytes()
    with pytest.raises(ConfigError, match=rf"no checkpoint\.pt to resume in {run}.*--overwrite to train afresh"):
        train(cfg, resume=True)
    result = CliRunner().invoke(main, ["--config", str(run / "config.yaml"), "--resume"])
    assert result.exit_code == 2 and "no checkpoint.pt to resume" in result.output
    assert len(result.output.strip().splitlines()) == 1 and model_path.read_bytes() == before
    # --resume --overwrite: nothing to resume, so a fresh run as asked
    result = CliRunner().invoke(main, ["--config", str(run / "config.yaml"), "--resume", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.pt").is_file()


def test_a_users_config_and_log_in_the_run_directory_are_refused(tiny_demo_root: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gradad.training.cli import main

    run = tmp_path / "myproject"
    run.mkdir()
    mine = f"# my settings, with comments\npreset: tiny\ndata:\n  root: {tiny_demo_root}\n  classes: [nut]\n"
    (run / "config.yaml").write_text(mine)
    (run / "train_log.jsonl").write_text('{"note": "mine"}\n')
    args = ["--config", str(run / "config.yaml"), "-o", str(run), "--device", "cpu",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "already holds config.yaml and train_log.jsonl" in result.output and "--overwrite" in result.output
    assert "--resume" not in result.output  # no checkpoint there: nothing to resume
    assert (run / "config.yaml").read_text() == mine and "mine" in (run / "train_log.jsonl").read_text()
    (run / "config.yaml").unlink()
    result = CliRunner().invoke(main, args[2:] + ["--preset", "tiny", "--data", str(tiny_demo_root)])
    assert result.exit_code == 2 and "already holds train_log.jsonl" in result.output

    # a run that stopped before its first checkpoint starts again with the same command; it then holds a model
    fresh = tmp_path / "fresh"
    args = ["--preset", "tiny", "--data", str(tiny_demo_root), "--classes", "nut", "-o", str(fresh), "--device",
            "cpu", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    from gradad.training.config import config_text, preset_config

    fresh.mkdir()
    cfg = preset_config("tiny")
    cfg.data.root, cfg.data.classes, cfg.output_dir = str(tiny_demo_root), ["nut"], str(fresh)
    cfg.train.device, cfg.data.cache_dir = "cpu", str(tmp_path / "cache")
    (fresh / "config.yaml").write_text(config_text(cfg))
    (fresh / "train_log.jsonl").write_text('{"stage": "abnormal", "epoch": 1, "loss": 1.0}\n')
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # a finished run continues with --resume (config.yaml and log kept)
    result = CliRunner().invoke(main, ["--config", str(fresh / "config.yaml"), "--resume"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "already holds model.pt, checkpoint.pt and train_log.jsonl" in result.output
    assert result.output.startswith("error: ") and "Usage:" not in result.output  # one line, like every refusal


def test_a_refused_dataset_leaves_no_run_folder(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gradad.training.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["--data", str(tmp_path / "missing"), "-o", str(out), "--preset", "tiny"])
    assert result.exit_code == 2 and "dataset root does not exist" in result.output
    assert not out.exists()


# ------------------------------------------------------------------- 7. one seed, one model, cold or warm cache


def test_one_seed_trains_the_same_model_with_a_cold_and_a_warm_feature_cache(tiny_demo_root: Path,
                                                                            tmp_path: Path) -> None:
    import torch

    from gradad.training.checkpoint import read_checkpoint
    from gradad.training.trainer import train

    states, hits = [], []
    for run in ("cold", "warm"):
        cfg = _tiny_cfg(tiny_demo_root, tmp_path, ["nut"])  # one cache folder: the second run hits it
        cfg.output_dir = str(tmp_path / run)
        payload = read_checkpoint(train(cfg))
        states.append(payload["state_dict"])
        hits.append(payload["feature_cache_hit"])
    assert hits == [False, True]
    assert [k for k in states[0] if not torch.equal(states[0][k], states[1][k])] == []


# ------------------------------------------------------------------------------------------ 8. config values


@pytest.mark.parametrize("setting", ["train.batch_size=", "model.map_scales=", "data.root=", "train.seed=",
                                     "fbp.kinds=", "model.fusion_block=", "backbone.weights="])
def test_an_empty_value_is_refused_for_a_setting_that_needs_one(setting: str) -> None:
    from gradad.errors import ConfigError
    from gradad.training.config import apply_set_options, preset_config

    key = setting.rstrip("=").replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^setting {key} is empty: it needs a value"):
        apply_set_options(preset_config("tiny"), [setting])


def test_empty_optional_settings_stay_none() -> None:
    from gradad.training.config import apply_set_options, preset_config

    cfg = apply_set_options(preset_config("tiny"), ["data.classes=", "train.normal_from=", "backbone.mean=",
                                                    "fbp.kind_weights="])
    assert (cfg.data.classes, cfg.train.normal_from, cfg.backbone.mean, cfg.fbp.kind_weights) == (None,) * 4


def test_list_and_tuple_values_are_coerced_and_counted() -> None:
    import torch

    from gradad.errors import ConfigError
    from gradad.training.config import apply_set_options, preset_config
    from gradad.training.fbp import synthesize_anomalies

    cfg = apply_set_options(preset_config("tiny"), ["fbp.kind_weights=1,2,1", "train.lr_net=1e-4",
                                                    "fbp.intensity_std_range=1,2e0", "data.classes=01,nut"])
    assert cfg.fbp.kind_weights == [1.0, 2.0, 1.0] and all(type(w) is float for w in cfg.fbp.kind_weights)
    assert cfg.train.lr_net == 1e-4 and cfg.fbp.intensity_std_range == (1.0, 2.0)
    assert cfg.data.classes == ["01", "nut"]
    cfg.validate()
    synthesize_anomalies(torch.randn(2, 4, 8, 8), cfg.fbp, torch.ones(4), torch.Generator().manual_seed(0))
    for bad, why in (("fbp.intensity_std_range=3", "expected 2 values, got 1"),
                     ("backbone.out_indices=2,3,4", "expected 2 values, got 3"),
                     ("fbp.kind_weights=1,x", "finite number"), ("train.lr_net=1e-4x", "finite number"),
                     ("data.classes=[1, 2]", "expected str")):
        with pytest.raises(ConfigError, match=why):
            apply_set_options(preset_config("tiny"), [bad])


@pytest.mark.parametrize("setting, why", [
    ("fbp.kinds=scaled,pastee", "fbp.kinds .*one or more of constant"),
    ("fbp.kind_weights=[1,1]", r"fbp.kind_weights .*one weight >= 0 per kind of fbp.kinds \(3\)"),
    ("fbp.kind_weights=0,0,0", "fbp.kind_weights"),
    ("fbp.blocks_per_image=2,1", "fbp.blocks_per_image .*lo <= hi"),
    ("fbp.intensity_std_range=3,1", "fbp.intensity_std_range .*lo <= hi"),
    ("data.val_fraction=2", r"data.val_fraction .*\[0, 1\)"),
    ("data.val_fraction=-0.5", r"data.val_fraction .*\[0, 1\)"),
    ("fbp.max_block=0", "fbp.max_block .*>= 1"),
    ("train.lr_net=-1", "train.lr_net .*> 0"),
    ("train.lr_grid=0", "train.lr_grid .*> 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train.fusion_fit_kinds=real,nosie", "train.fusion_fit_kinds"),
    ("data.defect_masks=runs/split/masks", "data.defect_masks .*--masks needs --defects"),
])
def test_validate_refuses_values_that_types_allow(setting: str, why: str) -> None:
    from gradad.errors import ConfigError
    from gradad.training.config import apply_set_options, preset_config

    cfg = apply_set_options(preset_config("tiny"), [setting])
    with pytest.raises(ConfigError, match=why):
        cfg.validate()


# ------------------------------------------------------------------------------------------ 10. diverged runs


def test_a_diverged_run_stops_with_one_line_naming_stage_and_epoch(tiny_demo_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import gradad.training.trainer as trainer_module
    from gradad.errors import GradError

    cfg = _tiny_cfg(tiny_demo_root, tmp_path, ["nut"])
    real_step = trainer_module.normal_step
    monkeypatch.setattr(trainer_module, "normal_step", lambda model, x: real_step(model, x) * float("nan"))
    with pytest.raises(GradError, match=r"^training diverged in stage 2 \(normal\) epoch 1: loss nan; lower "
                                        r"train\.lr_grid") as err:
        trainer_module.train(cfg)
    assert "\n" not in str(err.value) and not (Path(cfg.output_dir) / "model.pt").exists()

    # a finite loss whose step overflows the weights is caught at the end of its epoch
    monkeypatch.setattr(trainer_module, "normal_step", real_step)
    real_optimizer_step = trainer_module.optimizer_step

    def overflowing(loss, optimizer, params, grad_clip):
        value = real_optimizer_step(loss, optimizer, params, grad_clip)
        params[0].data.fill_(float("inf"))
        return value

    monkeypatch.setattr(trainer_module, "optimizer_step", overflowing)
    monkeypatch.setattr(trainer_module, "_batches", lambda n, size, gen: iter([torch.arange(n)]))  # one step
    cfg.output_dir = str(tmp_path / "run2")
    with pytest.raises(GradError, match=r"stage 1 \(abnormal\) epoch 1: non-finite weights"):
        trainer_module.train(cfg)


def test_an_onnx_model_given_as_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from gradad.errors import CheckpointError
    from gradad.training.checkpoint import read_checkpoint

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx_path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(onnx_path))
    renamed = tmp_path / "model.pt"  # the protobuf's first byte gives it away without the suffix too
    renamed.write_bytes(onnx_path.read_bytes())
    for path in (onnx_path, renamed):
        with pytest.raises(CheckpointError, match=r"looks like an ONNX model .* give the model\.pt from grad-train"):
            read_checkpoint(path)


def test_a_run_folder_or_its_config_given_as_checkpoint_points_at_model_pt(trained_tiny: Path,
                                                                            tmp_path: Path) -> None:
    """The files users mix up with model.pt: the run folder and the run's config.yaml; the message names the
    model.pt beside them."""
    import shutil

    from gradad.errors import CheckpointError
    from gradad.training.checkpoint import read_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_tiny, run / "model.pt")
    (run / "config.yaml").write_text("preset: edge\ndata:\n  roots: [demo_data]\n")
    with pytest.raises(CheckpointError, match=rf"{run} is a folder, not a checkpoint: give {run / 'model.pt'}"):
        read_checkpoint(run)
    with pytest.raises(CheckpointError, match=rf"config.yaml is a text file .* give {run / 'model.pt'}"):
        read_checkpoint(run / "config.yaml")
    assert read_checkpoint(run / "model.pt")["format"]


def test_bad_device_and_count_options_are_one_line_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gradad.devices import resolve_torch_device
    from gradad.errors import ConfigError
    from gradad.evaluation.cli import main as eval_main

    with pytest.raises(ConfigError, match=r"--device = 'gpu0' is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_torch_device("gpu0", "--device")
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    for args in (["--batch-size", "0"], ["--batch-size", "-3"], ["--figures", "-1"]):
        result = CliRunner().invoke(eval_main, [str(model), *args])
        assert result.exit_code == 2 and "Traceback" not in result.output and args[0] in result.output


def test_a_normal_branch_or_checkpoint_trained_on_other_goods_is_refused(trained_tiny: Path, tmp_path: Path) -> None:
    """The same data settings can name other files (a relative root run from another folder): the recorded content
    digests of the training goods decide."""
    from gradad.errors import ConfigError
    from gradad.training.checkpoint import atomic_torch_save, read_checkpoint
    from gradad.training.config import config_from_dict
    from gradad.training.model import GRADModel
    from gradad.training.trainer import load_normal_branch, refuse_other_goods

    payload = read_checkpoint(trained_tiny)
    digests = list(payload["trained_good_digests"])
    assert digests
    cfg = config_from_dict(payload["config"])
    model = GRADModel(payload["channels"], tuple(payload["feat_hw"]), cfg.model)
    cfg.train.normal_from = str(trained_tiny)
    load_normal_branch(model, cfg, digests)  # the same goods: taken
    other = digests[1:] + ["0" * 16]
    with pytest.raises(ConfigError, match=r"trained on other good images: 1 of its \d+ are not among this run's"):
        load_normal_branch(model, cfg, other)
    with pytest.raises(ConfigError, match="cannot resume .* it was trained on other good images"):
        refuse_other_goods(payload, other, "cannot resume X: it")
    del payload["trained_good_digests"]  # a model from before digests: the settings comparison is all there is
    old = tmp_path / "old.pt"
    atomic_torch_save(payload, old)
    cfg.train.normal_from = str(old)
    load_normal_branch(model, cfg, other)


def test_test_goods_that_are_copies_of_training_goods_are_not_scored(tmp_path: Path) -> None:
    from gradad.bundle import image_digest
    from gradad.data.tuning_split import scoring_selection

    trained = _img(tmp_path / "train" / "000.png", seed=10)
    copy = tmp_path / "test" / "good_000.png"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(trained.read_bytes())  # e.g. a folder layout whose test goods moved after goods were added
    fresh = _img(tmp_path / "test" / "good_001.png", seed=20)
    defect = _img(tmp_path / "test" / "bad_000.png", seed=10)
    defect.write_bytes(trained.read_bytes())  # a defect image is never dropped by this rule
    samples = [Sample(copy, "nut", "test", 0, "good", None), Sample(fresh, "nut", "test", 0, "good", None),
               Sample(defect, "nut", "test", 1, "crack", None)]
    selection = scoring_selection(samples, None, set(), frozenset(), frozenset({image_digest(trained)}))
    assert [s.image_path for s in selection.kept] == [fresh, defect] and selection.n_trained_goods == 1
    assert len(scoring_selection(samples, None, set()).kept) == 3


def test_grad_eval_finds_a_relative_training_root_from_another_folder(trained_tiny: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from gradad.evaluation.cli import main as eval_main
    from gradad.training.checkpoint import atomic_torch_save, read_checkpoint

    payload = read_checkpoint(trained_tiny)
    payload["config"]["data"]["root"] = "demo_data_as_typed"  # what a relative --data leaves in the config
    model = tmp_path / "model.pt"
    atomic_torch_save(payload, model)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(eval_main, [str(model), "--device", "cpu", "--figures", "0", "-o", "eval"])
    assert result.exit_code == 0, result.output  # the absolute root the model recorded, not the typed one
