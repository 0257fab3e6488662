"""Training: stage freezing, the feature cache, checkpoints and resume, config round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradad.data.datasets import load_samples
from gradad.errors import ConfigError, DatasetError
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import (
    BackboneConfig,
    apply_set_options,
    config_to_dict,
    load_config,
    preset_config,
    save_config,
)
from gradad.training.features import FeatureCache, cache_key
from gradad.training.model import GRADModel
from gradad.training.trainer import (
    abnormal_step,
    make_optimizer,
    normal_step,
    set_stage_mode,
    stage_parameters,
    train,
)


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _bn_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for name, b in module.named_buffers() if "running" in name]


def test_stage2_freezes_abnormal_branch_and_stage1_leaves_normal_branch() -> None:
    cfg = preset_config("tiny")
    model = GRADModel(16, (8, 8), cfg.model)
    x = torch.randn(4, 16, 8, 8)
    gen = torch.Generator().manual_seed(0)

    # Stage 1: normal branch and its mapper untouched; the abnormal branch's own mapper moves.
    params = stage_parameters(model, "abnormal", cfg)
    opt = make_optimizer(model, params, cfg)
    set_stage_mode(model, "abnormal")
    normal_before = _snapshot(model.normal_parameters())
    mapper_before = _snapshot(model.mapper.parameters())
    abnormal_mapper_before = _snapshot(model.abnormal_mapper.parameters())
    abnormal_step(model, x, cfg, 1.0, gen).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(normal_before, model.normal_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(mapper_before, model.mapper.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(abnormal_mapper_before, model.abnormal_mapper.parameters()))

    # Stage 2: abnormal grids, CNN weights and BN statistics unchanged; normal branch and mapper move.
    params = stage_parameters(model, "normal", cfg)
    opt = make_optimizer(model, params, cfg)
    set_stage_mode(model, "normal")
    assert not model.abnormal_cnn.training and model.normal_cnn.training
    abnormal_before = _snapshot(model.abnormal_parameters())
    bn_before = _bn_buffers(model.abnormal_cnn)
    normal_before = _snapshot(model.normal_parameters())
    for _ in range(2):
        opt.zero_grad()
        normal_step(model, x).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(abnormal_before, model.abnormal_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bn_before, _bn_buffers(model.abnormal_cnn)))
    assert not all(torch.equal(a, b) for a, b in zip(normal_before, model.normal_parameters()))
    assert all(p.grad is None for p in model.abnormal_parameters())


def test_optimizer_gives_grids_the_grid_learning_rate() -> None:
    cfg = preset_config("tiny")
    model = GRADModel(16, (8, 8), cfg.model)
    opt = make_optimizer(model, stage_parameters(model, "normal", cfg), cfg)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.normal_grid.global_grid)] == cfg.train.lr_grid == 0.1
    assert lrs[id(model.normal_grid.local_grid)] == 0.1
    assert lrs[id(model.mapper.local_net[0].weight)] == cfg.train.lr_net == 1e-3
    assert id(model.fusion_weight) not in lrs  # "map" fusion: w is fitted in stage 3, not trained
    assert id(model.abnormal_grid.local_grid) not in lrs


def test_freeze_mapper_option() -> None:
    cfg = preset_config("tiny")
    cfg.train.freeze_mapper_stage2 = True
    model = GRADModel(16, (8, 8), cfg.model)
    params = {id(p) for p in stage_parameters(model, "normal", cfg)}
    assert not any(id(p) in params for p in model.mapper.parameters())


def test_feature_cache_hit_miss_and_invalidation(tiny_demo_root: Path, tmp_path: Path) -> None:
    samples = load_samples(tiny_demo_root, "train", ["fabric"])[:4]
    cache = FeatureCache(tmp_path / "cache")
    fe = FeatureExtractor(BackboneConfig())
    feats, hit = cache.load_or_compute(fe, samples, 64, torch.device("cpu"))
    assert not hit and feats.dtype == np.float16 and feats.shape == (4, 152, 8, 8)
    again, hit = cache.load_or_compute(fe, samples, 64, torch.device("cpu"))
    assert hit and np.array_equal(again, feats)
    # A different input size or backbone is a different key (miss), never a stale hit.
    assert cache_key(fe, 96, samples) != cache_key(fe, 64, samples)
    lite1 = FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite1"))
    assert cache_key(lite1, 64, samples) != cache_key(fe, 64, samples)
    _, hit = cache.load_or_compute(fe, samples, 96, torch.device("cpu"))
    assert not hit
    # A changed image file invalidates too.
    img = samples[0].image_path
    img.write_bytes(img.read_bytes())  # same bytes, new mtime
    import os

    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    _, hit = cache.load_or_compute(fe, samples, 64, torch.device("cpu"))
    assert not hit
    # A corrupt cache file is recomputed, not trusted.
    path = cache.path_for(cache_key(fe, 64, samples))
    path.write_bytes(b"garbage")
    feats2, hit = cache.load_or_compute(fe, samples, 64, torch.device("cpu"))
    assert not hit and np.array_equal(feats2, feats)


def _tiny_cfg(root: Path, out: Path):
    cfg = preset_config("tiny")
    cfg.data.root = str(root)
    cfg.data.cache_dir = str(out / "cache")
    cfg.output_dir = str(out / "run")
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 2, 2
    cfg.train.checkpoint_every = 1
    return cfg


def _epoch_records(run: Path) -> list[dict]:
    """train_log.jsonl lines of finished epochs (stage-end and fusion events left out)."""
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_training_writes_model_log_and_resumes(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    model_path = train(cfg)
    run = Path(cfg.output_dir)
    assert model_path.is_file() and (run / "checkpoint.pt").is_file()
    records = _epoch_records(run)
    assert [(r["stage"], r["epoch"]) for r in records] == [("abnormal", 1), ("abnormal", 2), ("normal", 1),
                                                           ("normal", 2)]
    assert all(np.isfinite(r["loss"]) for r in records)
    # seconds: since the run started (grows); epoch_seconds: that epoch's steps alone (what a speed-up changes)
    assert all(0 < r["epoch_seconds"] <= r["seconds"] for r in records)
    assert [r["seconds"] for r in records] == sorted(r["seconds"] for r in records)
    events = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    spreads = [e["coordinate_spread"] for e in events if e.get("event") == "stage_end"]
    assert len(spreads) == 2 and set(spreads[0]) == {"normal", "abnormal"}  # g spread logged per stage
    fusion = [e for e in events if e["stage"] == "fusion"]
    assert len(fusion) == 1 and set(fusion[0]["selfcheck"]) >= {"constant", "noise"}
    # The saved config reproduces the run.
    assert config_to_dict(load_config(run / "config.yaml")) == config_to_dict(cfg)
    payload = torch.load(model_path, weights_only=True)
    assert payload["classes"] == ["capsule", "fabric", "nut"]
    assert payload["feature_cache_hit"] is False

    # Resume from a stage-2 checkpoint: extend stage 2 by one epoch, only that epoch runs.
    cfg.train.stage2_epochs = 3
    save_config(cfg, run / "config.yaml")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["stage_index"], state["next_epoch"] = 1, 2
    state["config"] = config_to_dict(cfg)
    torch.save(state, run / "checkpoint.pt")
    train(cfg, resume=True)
    records = _epoch_records(run)
    # Epoch 3 ran once, and the resumed run did not append a second copy of what it redid.
    assert [(r["stage"], r["epoch"]) for r in records] == [("abnormal", 1), ("abnormal", 2), ("normal", 1),
                                                           ("normal", 2), ("normal", 3)]
    assert torch.load(model_path, weights_only=True)["feature_cache_hit"] is True

    # Resuming a finished run redoes only stage 3 (the fusion fit, e.g. after a wider weight grid): no epoch reruns.
    model_path.unlink()
    train(cfg, resume=True)
    assert model_path.is_file()
    assert [(r["stage"], r["epoch"]) for r in _epoch_records(run)] == [("abnormal", 1), ("abnormal", 2),
                                                                      ("normal", 1), ("normal", 2), ("normal", 3)]
    events = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["stage"] == "fusion"]) == 1


def test_resume_refuses_a_changed_config(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    cfg.train.stage2_epochs = 1
    train(cfg)
    cfg.model.fusion_depth = 2
    with pytest.raises(ConfigError, match=r"model.fusion_depth \(1 -> 2\).*--set model.fusion_depth=1"):
        train(cfg, resume=True)
    assert load_config(Path(cfg.output_dir) / "config.yaml").model.fusion_depth == 1  # the run's config is kept


def test_a_copied_run_resumes_with_a_new_map_head_without_retraining(tiny_demo_root: Path, tmp_path: Path) -> None:
    """Head settings (map scales, smoothing, pooling) are fitted after stage 2: a finished run copied to a new
    directory re-fits them on resume (gains logged and stored) and reruns no epoch; other changes stay refused."""
    import shutil

    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    cfg.model.map_scales = (1,)
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 1, 1
    train(cfg)
    copy = tmp_path / "run_multiscale"
    shutil.copytree(cfg.output_dir, copy)
    (copy / "model.pt").unlink()
    cfg.output_dir, cfg.model.map_scales = str(copy), (1, 3, 5)
    model_path = train(cfg, resume=True)
    assert [(r["stage"], r["epoch"]) for r in _epoch_records(copy)] == [("abnormal", 1), ("normal", 1)]
    payload = torch.load(model_path, weights_only=True)
    gains = payload["state_dict"]["map_scale_gain"].tolist()
    assert len(gains) == 3 and gains[0] == 1.0 and gains[2] > gains[1] > 1.0
    assert payload["map_scale_gain"] == pytest.approx(gains, rel=1e-5)
    events = [json.loads(line) for line in (copy / "train_log.jsonl").read_text().splitlines()]
    assert [e["scales"] for e in events if e["stage"] == "map_scales"] == [[1, 3, 5]]
    cfg.model.local_grid_size += 1
    with pytest.raises(ConfigError, match=r"model.local_grid_size"):
        train(cfg, resume=True)
    cfg.model.local_grid_size -= 1
    cfg.model.refine_mask_weight = 0.0  # shapes stage 2's loss alone: refitting the head cannot honour it
    with pytest.raises(ConfigError, match=r"model.refine_mask_weight"):
        train(cfg, resume=True)
    cfg.model.refine_mask_weight = 0.3
    cfg.model.local_grid_size += 1
    # Mid-run the stage's best epoch so far was chosen with the old head: a head change is refused there.
    cfg.model.local_grid_size -= 1
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state["stage_index"], state["next_epoch"] = 1, 1
    torch.save(state, copy / "checkpoint.pt")
    cfg.model.map_scales = (1, 3)
    with pytest.raises(ConfigError, match=r"model.map_scales"):
        train(cfg, resume=True)


def test_the_image_gaussian_can_be_switched_off_and_on_when_resuming_at_any_point(tiny_demo_root: Path,
                                                                                   tmp_path: Path) -> None:
    """No stage reads the image Gaussian: a finished run refits it (or drops it) on resume, and a run interrupted
    mid-stage resumes with the setting changed instead of being refused."""
    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 1, 2
    train(cfg)
    run = Path(cfg.output_dir)
    cfg.model.image_gaussian = False
    payload = torch.load(train(cfg, resume=True), weights_only=True)
    assert payload["image_gaussian"] is None and not any(k.startswith("image_gaussian.") for k in payload["state_dict"])
    cfg.model.image_gaussian = True
    payload = torch.load(train(cfg, resume=True), weights_only=True)
    assert sorted(payload["image_gaussian"]) == sorted(payload["classes"])
    assert payload["state_dict"]["image_gaussian.mean"].shape[0] == len(payload["classes"])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["stage_index"], state["next_epoch"] = 1, 1  # as if interrupted inside stage 2
    torch.save(state, run / "checkpoint.pt")
    cfg.model.image_gaussian = False
    payload = torch.load(train(cfg, resume=True), weights_only=True)
    assert payload["image_gaussian"] is None
    assert [(r["stage"], r["epoch"]) for r in _epoch_records(run)][-1] == ("normal", 2)


def test_grad_train_resume_of_a_copied_run_writes_the_copy_not_the_original(tiny_demo_root: Path,
                                                                              tmp_path: Path) -> None:
    """``grad-train --config COPY/config.yaml --resume`` continues the copy: its config.yaml still names the
    original run directory, whose model must not be overwritten. A finished run takes a change of the map's
    refinement as a refit (no epoch rerun)."""
    import shutil

    from click.testing import CliRunner

    from gradad.training.cli import main

    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    cfg.model.map_refine_mask_weight = 0.3
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 1, 1
    train(cfg)
    original = Path(cfg.output_dir)
    before = (original / "model.pt").read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    result = CliRunner().invoke(main, ["--config", str(copy / "config.yaml"), "--resume",
                                       "--set", "model.map_refine_mask_weight=0"])
    assert result.exit_code == 0, result.output
    assert (original / "model.pt").read_bytes() == before
    assert torch.load(copy / "model.pt", weights_only=True)["config"]["model"]["map_refine_mask_weight"] == 0.0
    assert [(r["stage"], r["epoch"]) for r in _epoch_records(copy)] == [("abnormal", 1), ("normal", 1)]
    # a run directory without a checkpoint (a NORMAL-only run from --normal-from keeps none): still the copy, whose
    # finished model a fresh run would replace, so this one (it trains epochs) is refused naming the copy
    second = tmp_path / "copy2"
    shutil.copytree(original, second)
    (second / "checkpoint.pt").unlink()
    kept = (second / "model.pt").read_bytes()
    result = CliRunner().invoke(main, ["--config", str(second / "config.yaml"), "--resume",
                                       "--set", "model.map_refine_mask_weight=0"])
    assert result.exit_code != 0 and f"no checkpoint.pt to resume in {second}" in result.output, result.output
    assert (original / "model.pt").read_bytes() == before and (second / "model.pt").read_bytes() == kept


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    cfg = preset_config("edge")
    with pytest.raises(ConfigError, match="model.fusion_block"):
        apply_set_options(cfg, ["model.fusion_block=transformer"])
    with pytest.raises(ConfigError, match="unknown setting 'model.nope'"):
        apply_set_options(cfg, ["model.nope=1"])
    with pytest.raises(ConfigError, match="unknown setting 'batch_size', did you mean train.batch_size"):
        apply_set_options(cfg, ["batch_size=8"])  # the section left out
    for bad in ("train.grad_clip=abc", "model.smoothing_sigma=abc", "train.lr_net=.nan", "train.lr_grid=.inf",
                "fbp.intensity_std_range=[1, abc]", "train.fusion_weight=true"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.") + ".*finite number"):
            apply_set_options(preset_config("edge"), [bad])
    assert apply_set_options(preset_config("edge"), ["train.fusion_weight=2"]).train.fusion_weight == 2.0
    apply_set_options(cfg, ["train.batch_size=8", "fbp.intensity_std_range=[2, 4]"])
    assert cfg.train.batch_size == 8 and cfg.fbp.intensity_std_range == (2.0, 4.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("huge")


def test_resume_after_interruption_at_the_stage_boundary(tiny_demo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """Stopped right after stage 1: the stage-2 optimizer starts fresh (no stage-1 state forced into it)."""
    import gradad.training.trainer as trainer_module

    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    real_step = trainer_module.normal_step

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "normal_step", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"holds stage normal epoch 0.*--resume"):
        train(cfg)
    state = torch.load(Path(cfg.output_dir) / "checkpoint.pt", weights_only=True)
    assert (state["stage_index"], state["next_epoch"], state["optimizer"]) == (1, 0, None)
    monkeypatch.setattr(trainer_module, "normal_step", real_step)
    train(cfg, resume=True)
    records = _epoch_records(Path(cfg.output_dir))
    assert [(r["stage"], r["epoch"]) for r in records] == [("abnormal", 1), ("abnormal", 2), ("normal", 1),
                                                           ("normal", 2)]


def test_ctrl_c_outside_the_stages_says_what_can_be_resumed(tiny_demo_root: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """Ctrl-C while the features are extracted (nothing to resume) or during the fits after the last stage (the
    checkpoint holds the end of training) gives the same TrainingInterrupted message as inside a stage."""
    import gradad.training.trainer as trainer_module

    cfg = _tiny_cfg(tiny_demo_root, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real_prepare = trainer_module.prepare_training_data
    monkeypatch.setattr(trainer_module, "prepare_training_data", interrupted)
    with pytest.raises(trainer_module.TrainingInterrupted, match="before the first checkpoint"):
        train(cfg)
    monkeypatch.setattr(trainer_module, "prepare_training_data", real_prepare)
    monkeypatch.setattr(trainer_module.Trainer, "_fit_fusion", interrupted)
    with pytest.raises(trainer_module.TrainingInterrupted, match=r"holds end of training.*--resume"):
        train(cfg)
    # a resume stopped while the features are extracted names the checkpoint's position, not stage 1 epoch 0
    monkeypatch.setattr(trainer_module, "prepare_training_data", interrupted)
    with pytest.raises(trainer_module.TrainingInterrupted, match=r"holds end of training.*--resume"):
        train(cfg, resume=True)


def test_invalid_ranges_are_config_errors(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    cfg.model.smoothing_size = 20
    with pytest.raises(ConfigError, match="model.smoothing_size"):
        train(cfg)
    assert not (Path(cfg.output_dir) / "config.yaml").exists()


def test_normal_only_ablation_skips_stage1(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = _tiny_cfg(tiny_demo_root, tmp_path)
    cfg.model.abnormal_branch = False
    model_path = train(cfg)
    records = _epoch_records(Path(cfg.output_dir))
    assert {r["stage"] for r in records} == {"normal"}
    payload = torch.load(model_path, weights_only=True)
    model = GRADModel(payload["channels"], tuple(payload["feat_hw"]), cfg.model).eval()
    model.load_state_dict(payload["state_dict"])
    x = torch.randn(2, payload["channels"], *payload["feat_hw"])
    out = model(x)
    assert torch.equal(out.x_hat, out.x_hat_normal)


def _normal_branch(path: Path) -> dict:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("mapper.", "normal_grid.", "normal_cnn."))}


def test_normal_only_run_trains_the_same_normal_branch_and_normal_from_reuses_it(tiny_demo_root: Path,
                                                                                   tmp_path: Path) -> None:
    """Stage 2 does not depend on stage 1 (own mapper, per-stage seeds, "map" fusion): the NORMAL-only ablation is
    the full model's normal branch exactly, and --normal-from can lend it to a run that only trains stage 1."""
    full = _tiny_cfg(tiny_demo_root, tmp_path / "full")
    full_path = train(full)
    alone = _tiny_cfg(tiny_demo_root, tmp_path / "alone")
    alone.model.abnormal_branch = False
    alone_path = train(alone)
    a, b = _normal_branch(full_path), _normal_branch(alone_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    reuse = _tiny_cfg(tiny_demo_root, tmp_path / "reuse")
    reuse.train.normal_from = str(alone_path)
    reuse.train.stage1_epochs = 1
    reuse_path = train(reuse)
    c = _normal_branch(reuse_path)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert {r["stage"] for r in _epoch_records(Path(reuse.output_dir))} == {"abnormal"}
    assert torch.load(reuse_path, weights_only=True)["normal_branch_from"] == str(alone_path)

    other = _tiny_cfg(tiny_demo_root, tmp_path / "other")
    other.train.normal_from = str(alone_path)
    other.model.fusion_depth = 2
    with pytest.raises(ConfigError, match=r"model.fusion_depth"):
        train(other)


def test_unified_training_over_two_roots_keeps_classes_apart(tiny_demo_root: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "line_a", tmp_path / "line_b"
    for root, classes in ((first, ("fabric",)), (second, ("nut", "capsule"))):
        root.mkdir()
        for cls in classes:
            (root / cls).symlink_to(tiny_demo_root / cls, target_is_directory=True)
    cfg = _tiny_cfg(first, tmp_path)
    cfg.data.extra_roots = [str(second)]
    payload = torch.load(train(cfg), weights_only=True)
    assert payload["classes"] == ["capsule", "fabric", "nut"]
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "fabric").symlink_to(tiny_demo_root / "fabric", target_is_directory=True)
    cfg.data.extra_roots = [str(clash)]
    with pytest.raises(DatasetError, match="'fabric' exists in both"):
        train(cfg)
