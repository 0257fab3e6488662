"""grad-train walkthrough (session 21): labelled defects that are training goods or have empty masks, --overwrite
then Ctrl-C, a full disk, resuming with the data root spelled another way, a resume refused for new images,
classes without validation images and an unwritable run folder."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradad.training.trainer as trainer_module
from gradad.errors import ConfigError, DatasetError, GradError
from gradad.training.cli import main
from gradad.training.config import preset_config
from gradad.training.features import FeatureCache
from gradad.training.trainer import TrainingInterrupted, train


def _cfg(root: Path, out: Path, classes: list[str] | None = None):
    cfg = preset_config("tiny")
    cfg.data.root = str(root)
    cfg.data.classes = classes or ["nut"]
    cfg.data.cache_dir = str(out / "cache")
    cfg.output_dir = str(out / "run")
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 1, 1
    cfg.train.checkpoint_every = 1
    return cfg


def _no_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make feature extraction fail loudly: a refusal must come before it (minutes on real data)."""
    def extract(*args, **kwargs):
        raise AssertionError("features were extracted before the refusal")

    monkeypatch.setattr(FeatureCache, "load_or_compute", extract)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def finished_run(tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1+1-epoch run on the nut class (its checkpoint holds the end of training). Copy before changing."""
    out = tmp_path_factory.mktemp("s21_run")
    train(_cfg(tiny_demo_root, out))
    return out / "run"


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------ 1. labelled defects that are training goods


def test_defects_that_are_training_goods_are_refused_before_features(tiny_demo_root: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: --defects naming the training goods trained them as defective in stage 1 and as good in stage 2."""
    _no_features(monkeypatch)
    cfg = _cfg(tiny_demo_root, tmp_path)
    cfg.data.defects = str(tiny_demo_root / "nut" / "train")
    with pytest.raises(DatasetError, match=r"--defects .*train: 8 of its 8 image\(s\) are copies of good images.*"
                                           r"a part cannot be both good and defective: .*000\.png \(= "):
        train(cfg)
    assert not Path(cfg.output_dir).exists()
    # one training good (or a held-out validation good) copied among real defects: refused the same
    for good in ("000.png", "005.png"):  # 005.png is the nut class's validation image
        defects = tmp_path / f"defects_{good}" / "nut" / "spot"
        defects.mkdir(parents=True)
        shutil.copy(tiny_demo_root / "nut" / "test" / "spot" / "000.png", defects / "a.png")
        shutil.copy(tiny_demo_root / "nut" / "train" / "good" / good, defects / "zz_good.png")
        cfg.data.defects = str(defects.parents[1])
        with pytest.raises(DatasetError, match=rf"1 of its 2 image\(s\).*zz_good\.png \(= .*{good}\)"):
            train(cfg)


# ------------------------------------------------------------------------------------- 2. empty defect masks


def _defects_with_masks(root: Path, dest: Path, empty: set[str]) -> tuple[Path, Path]:
    """The nut test defects as --defects/--masks folders; the masks named in ``empty`` all zero."""
    images, masks = dest / "img", dest / "msk"
    for img in sorted((root / "nut" / "test").glob("*/*.png")):
        if img.parent.name == "good":
            continue
        name = f"{img.parent.name}_{img.name}"
        (images / "nut" / "d").mkdir(parents=True, exist_ok=True)
        (masks / "nut" / "d").mkdir(parents=True, exist_ok=True)
        shutil.copy(img, images / "nut" / "d" / name)
        mask = cv2.imread(str(root / "nut" / "ground_truth" / img.parent.name / f"{img.stem}_mask.png"), 0)
        if name in empty or "*" in empty:
            mask[:] = 0
        cv2.imwrite(str(masks / "nut" / "d" / f"{Path(name).stem}_mask.png"), mask)
    return images, masks


def test_defects_with_empty_masks_are_left_out_of_stage_1(tiny_demo_root: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Old: an all-zero mask trained its defect as normal (cell_masks' fallback needs a non-zero pixel)."""
    from gradad.training.checkpoint import read_checkpoint

    images, masks = _defects_with_masks(tiny_demo_root, tmp_path / "one", {"crack_000.png"})
    cfg = _cfg(tiny_demo_root, tmp_path)
    cfg.data.defects, cfg.data.defect_masks = str(images), str(masks)
    with caplog.at_level(logging.WARNING, logger="gradad.training.defects"):
        payload = read_checkpoint(train(cfg))
    used = {Path(p).name for p in payload["trained_defects"] + payload["tuned_defects"]}
    assert len(used) == 7 and "crack_000.png" not in used
    assert "1 labelled defect(s) left out of stage 1" in caplog.text and "crack_000.png" in caplog.text
    shutil.rmtree(cfg.output_dir)
    # every mask empty: nothing could train as a defect; one line naming the --masks folder
    images, masks = _defects_with_masks(tiny_demo_root, tmp_path / "all", {"*"})
    cfg.data.defects, cfg.data.defect_masks = str(images), str(masks)
    with pytest.raises(DatasetError, match=rf"--masks {masks}: every mask of the 8 labelled defect\(s\) is empty"):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


def test_a_thin_defect_lost_by_the_resize_still_marks_a_cell(tmp_path: Path) -> None:
    """A one-pixel line that nearest-neighbour shrinking drops is redrawn from the full-size mask, not left out."""
    from gradad.data.datasets import Sample
    from gradad.training.defects import drop_empty_masks

    mask = np.zeros((256, 256), np.uint8)
    mask[101, 20:200] = 255  # row 101: nearest-neighbour to 64 px samples rows 1, 5, 9, ... (4k + 1)
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    sample = Sample(tmp_path / "i.png", "nut", "train", 1, "d", tmp_path / "m.png")
    resized = np.zeros((1, 64, 64), bool)  # what load_images gave
    kept, masks = drop_empty_masks([sample], resized, tmp_path)
    assert kept == [sample] and masks[0, 25].any()


# ---------------------------------------------------------------------------------- 3. --overwrite, then Ctrl-C


def test_overwrite_then_ctrl_c_before_the_first_checkpoint_keeps_the_old_run(finished_run: Path, tiny_demo_root: Path,
                                                                              tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: config.yaml was rewritten and train_log.jsonl deleted at the start, the old model.pt/checkpoint.pt kept,
    and the message offered a --resume that the changed settings then refused."""
    run = _copy_run(finished_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cfg = _cfg(tiny_demo_root, tmp_path)
    cfg.train.seed = 7
    monkeypatch.setattr(trainer_module, "abnormal_step", _interrupt)
    with pytest.raises(TrainingInterrupted) as caught:
        train(cfg)
    message = str(caught.value)
    assert "nothing saved" in message and "untouched" in message and "--resume" not in message
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # no pending log left either
    # the CLI: the same as every command's Ctrl-C line, with what was kept; exit 130
    result = CliRunner().invoke(main, ["--config", str(run / "config.yaml"), "-o", str(run), "--overwrite",
                                       "--set", "train.seed=7"])
    assert result.exit_code == 130, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("interrupted (Ctrl-C): stopped before the first checkpoint: nothing saved")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_old_run_at_its_first_checkpoint(finished_run: Path, tiny_demo_root: Path,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the new run's checkpoint is written, the folder is the new run's alone and --resume continues it."""
    run = _copy_run(finished_run, tmp_path / "run")
    cfg = _cfg(tiny_demo_root, tmp_path)
    cfg.train.seed = 7
    real_step = trainer_module.normal_step
    monkeypatch.setattr(trainer_module, "normal_step", _interrupt)
    with pytest.raises(TrainingInterrupted, match=r"holds stage normal epoch 0; continue with: .*--resume"):
        train(cfg)
    assert not (run / "model.pt").exists()  # the old run's model is gone with its checkpoint
    assert "seed: 7" in (run / "config.yaml").read_text()
    assert [line for line in (run / "train_log.jsonl").read_text().splitlines()]  # this run's stage-1 lines
    assert not list(run.glob(".train_log*"))
    monkeypatch.setattr(trainer_module, "normal_step", real_step)
    assert train(cfg, resume=True).is_file()


# --------------------------------------------------------------------------------------------- 4. a full disk


def test_a_full_disk_writing_a_checkpoint_is_one_error_naming_the_file(finished_run: Path, tiny_demo_root: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: torch's RuntimeError "[enforce fail at inline_container.cc:672] . unexpected pos" as a traceback."""
    import gradad.training.checkpoint as checkpoint_module

    def full(obj, fh):
        fh.write(b"PK")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    target = tmp_path / "out" / "checkpoint.pt"
    with pytest.raises(GradError, match=rf"cannot write {target}: No space left on device \(disk full\?\)"):
        checkpoint_module.atomic_torch_save({"a": 1}, target)
    assert not list(target.parent.iterdir())  # neither the file nor its temporary
    cfg = _cfg(tiny_demo_root, tmp_path)
    result = CliRunner().invoke(main, ["--data", str(tiny_demo_root), "--classes", "nut", "-o", str(tmp_path / "r"),
                                       "--preset", "tiny", "--epochs", "1", "1",
                                       "--set", f"data.cache_dir={cfg.data.cache_dir}"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: cannot write ")
    assert "checkpoint.pt" in result.output and "disk full?" in result.output


def test_a_full_disk_writing_the_feature_cache_is_a_warning(tiny_demo_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Old: numpy's errno-less OSError "Not enough free space to write N bytes" as a traceback."""
    import gradad.training.features as features_module

    def full(fh, array):
        fh.write(b"\x93NUMPY")
        raise OSError(f"Not enough free space to write {array.nbytes} bytes")

    monkeypatch.setattr(features_module.np, "save", full)
    cfg = _cfg(tiny_demo_root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="gradad.training.features"):
        assert train(cfg).is_file()  # trained on the features in memory
    assert "could not write the feature cache" in caplog.text and "disk full?" in caplog.text
    assert not list(Path(cfg.data.cache_dir).iterdir())  # no partial file, no temporary


# ------------------------------------------------------------------------ 5. the data root spelled another way


def test_resume_accepts_the_same_images_by_another_path(finished_run: Path, tiny_demo_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: data.root was compared as text: 'root/' or the path from another folder were refused."""
    run = _copy_run(finished_run, tmp_path / "run")
    cfg = _cfg(tiny_demo_root, tmp_path)
    cfg.data.root = str(tiny_demo_root) + "/"
    cfg.data.cache_dir = str(tmp_path / "other_cache")  # where the features are cached changes nothing either
    cfg.train.checkpoint_every = 0
    assert train(cfg, resume=True).is_file()
    # from another folder: a relative root that is not there gets a hint; the path from here resumes
    monkeypatch.chdir(tiny_demo_root.parent)
    cfg.data.root = tiny_demo_root.name
    assert train(cfg, resume=True).is_file()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=rf"dataset root does not exist: {tiny_demo_root.name} \(a relative path, "
                                           r"read from the current folder .*: pass --data with its path from here\)"):
        train(cfg, resume=True)
    # a setting that changes the model is still refused, before any feature is extracted
    _no_features(monkeypatch)
    cfg.data.root = str(tiny_demo_root)
    cfg.train.lr_net = 0.5
    with pytest.raises(ConfigError, match=r"settings differ from the interrupted run: train\.lr_net"):
        train(cfg, resume=True)
    assert run.is_dir()


def test_a_checkpoint_without_digests_still_refuses_another_root(finished_run: Path, tiny_demo_root: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviewer: a checkpoint from before the content digests has nothing but the root text to tell the images
    apart, so there the root stays a setting a resume must keep (the digest rule made it resume on other data)."""
    run = _copy_run(finished_run, tmp_path / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["trained_good_digests"]
    torch.save(state, run / "checkpoint.pt")
    _no_features(monkeypatch)
    cfg = _cfg(tiny_demo_root, tmp_path)
    other = tmp_path / "other_root"
    shutil.copytree(tiny_demo_root, other)
    cfg.data.root = str(other)
    with pytest.raises(ConfigError, match=r"settings differ from the interrupted run: data\.root"):
        train(cfg, resume=True)


def test_a_failure_while_replacing_the_old_run_loses_none_of_it(finished_run: Path, tiny_demo_root: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Reviewer: a full disk while the first checkpoint replaced the old run's files deleted its model.pt first and
    then failed on config.yaml, leaving a mix and an orphaned pending log. The old model now goes last, config.yaml
    is written atomically, and the failed run's log is kept and named."""
    run = _copy_run(finished_run, tmp_path / "run")
    old_model = (run / "model.pt").read_bytes()
    old_config = (run / "config.yaml").read_text()
    cfg = _cfg(tiny_demo_root, tmp_path)
    cfg.train.seed = 7

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_config", full)
    with caplog.at_level(logging.WARNING, logger="gradad.training.trainer"), pytest.raises(OSError, match="No space"):
        train(cfg)
    assert (run / "model.pt").read_bytes() == old_model and (run / "config.yaml").read_text() == old_config
    pending = run / ".train_log.jsonl.pending"
    assert pending.is_file() and str(pending) in caplog.text


# ---------------------------------------------------------------------------------- 6. new images on resume


def test_a_resume_refused_for_new_good_images_names_them(tiny_demo_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: 'it was trained on other good images: 0 of its 7 are not among this run's 8', naming nothing new."""
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root / "nut", root / "nut")
    cfg = _cfg(root, tmp_path)
    train(cfg)
    good = root / "nut" / "train" / "good"
    image = cv2.imread(str(good / "000.png"))
    cv2.imwrite(str(good / "100.png"), 255 - image)  # sorts last: the validation split keeps its image
    _no_features(monkeypatch)
    with pytest.raises(ConfigError, match=r"other good images: 0 of its 7 are not among this run's 8; 1 image\(s\) "
                                          r"of this run are new to it \(.*100\.png\)"):
        train(cfg, resume=True)


# ------------------------------------------------------------------------- 7. classes without validation images


def test_a_class_too_small_for_a_validation_image_is_named(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Old: '0 held out for validation', then stage 3 fitted w = 0 without a word."""
    from test_datasets import _img

    for cls, n in (("big", 8), ("few", 5)):
        for i in range(n):
            _img(tmp_path / "ds" / cls / "train" / "good" / f"{i:03d}.png", seed=i)
    cfg = _cfg(tmp_path / "ds", tmp_path, ["big", "few"])
    cfg.model.image_gaussian = False  # it needs more images than the classes have
    with caplog.at_level(logging.WARNING, logger="gradad.training.trainer"):
        train(cfg)
    assert "few (5) hold out no validation image" in caplog.text and "at least 6 good images" in caplog.text
    assert "big (" not in caplog.text
    caplog.clear()
    cfg.data.classes = ["few"]
    cfg.output_dir = str(tmp_path / "few_only")
    with caplog.at_level(logging.WARNING, logger="gradad.training.trainer"):
        train(cfg)
    assert "no validation images" in caplog.text and "w = 0" in caplog.text and "few (5)" in caplog.text


# ------------------------------------------------------------------------------------ 8. an unwritable -o


def test_an_unwritable_output_folder_is_refused_before_features(tiny_demo_root: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: the error came only after the features were extracted."""
    import gradad.cli_utils as cli_utils

    _no_features(monkeypatch)
    cfg = _cfg(tiny_demo_root, tmp_path)
    (tmp_path / "afile").write_text("x")
    cfg.output_dir = str(tmp_path / "afile" / "run")
    with pytest.raises(GradError, match=r"output folder \(-o / output_dir\) .*afile/run: .*afile is a file"):
        train(cfg)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli_utils.tempfile, "NamedTemporaryFile", read_only)
    cfg.output_dir = str(tmp_path / "new" / "run")
    with pytest.raises(GradError, match=r"cannot write there \(Read-only file system\)"):
        train(cfg)
    assert not (tmp_path / "new").exists()


def test_normal_from_is_checked_before_features_and_takes_the_same_images_by_another_path(
        finished_run: Path, tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: --normal-from compared data.root as text (as resume did) and refused only after the features were
    extracted (minutes on real data)."""
    cfg = _cfg(tiny_demo_root, tmp_path)
    cfg.train.normal_from = str(finished_run / "model.pt")
    cfg.data.root = str(tiny_demo_root) + "/."  # the same images, spelled otherwise
    cfg.train.stage1_epochs = 1
    assert train(cfg).is_file()
    _no_features(monkeypatch)
    other = _cfg(tiny_demo_root, tmp_path / "other")
    other.train.normal_from = str(finished_run / "model.pt")
    other.model.fusion_depth = 2
    with pytest.raises(ConfigError, match=r"train.normal_from = .* was trained with other settings: model.fusion_depth"):
        train(other)


def test_ctrl_c_inside_a_checkpoint_write_is_an_interrupt_not_a_full_disk(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Verifier: a SIGINT while torch.save wrote came back as RuntimeError "unexpected pos" (its context the
    KeyboardInterrupt), which the full-disk rule reported as "cannot write ... (disk full?)", exit 2."""
    import gradad.training.checkpoint as checkpoint_module

    def interrupted(obj, fh):
        fh.write(b"PK")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted)
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.atomic_torch_save({"a": 1}, target)
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary
