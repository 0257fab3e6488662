"""GRAD training on cached extractor features (DESIGN.md section 2, "Losses and training").

Stage 1 trains the abnormal branch (its own coordinate mapper by default, grids, CNN) with synthetic anomalies
(plus labelled real defects when given) and the truncated-L1 contrastive loss on its score. Stage 2 freezes it
(BN in eval) and trains the normal mapper, grids and CNN with MSE on the refined reconstruction. Stage 3 fits the
fusion weight of the abnormal score on validation anomalies (the "map" fusion form). A validation split of the
good training images picks the best epoch of each stage and runs the stage-1 self-check; test images are never
read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gradad.cli_utils import check_output_folder
from gradad.data.datasets import Sample, summarize
from gradad.devices import resolve_torch_device
from gradad.errors import ConfigError, GradError
from gradad.text import first_few, one_line, shown_value
from gradad.training.backbone import NAMED_WEIGHTS, FeatureExtractor
from gradad.training.checkpoint import atomic_torch_save, model_payload, read_checkpoint
from gradad.training.config import RunConfig, config_to_dict, save_config
from gradad.training.fbp import synthesize_anomalies
from gradad.training.defects import DefectSet, cell_masks
from gradad.training.features import FeatureCache
from gradad.training.image_gaussian import fit_image_gaussian, require_training_images
from gradad.training.losses import reconstruction_mse, truncated_l1_contrastive
from gradad.training.model import AnomalyHead, GRADModel, similarity_refine
from gradad.training.run_folder import previous_run_files
from gradad.training.training_images import TrainingImages, select_training_images
from gradad.training.validation import (
    ValidationSet,
    detection_score,
    evaluating,
    fit_map_scale_gains,
    fit_fusion_weight,
    heldout_auroc,
    selfcheck,
)

log = logging.getLogger(__name__)

STAGES = ("abnormal", "normal")
#: model settings of the map head only (fitted after stage 2 or 3), not of what the stages learn: a finished run may be
#: resumed with other values, and a reused normal branch may differ in them
HEAD_SETTINGS = frozenset({"map_scales", "map_refine_mask_weight", "smoothing", "smoothing_size", "smoothing_sigma",
                           "score_pool", "image_gaussian", "image_gaussian_stats"})
#: head settings that no stage's model selection or fit reads (fitted after stage 3): a run may be resumed with
#: other values at any point
POST_TRAINING_SETTINGS = frozenset({"image_gaussian", "image_gaussian_stats"})
#: settings of the similarity refinement that shape both the map and stage 2's loss, so a reused normal branch must
#: match them; a *finished* run may still be refitted with other values (its branches keep what they learnt under
#: the old loss; logged). refine_mask_weight shapes the loss alone, so it never changes after training.
REFINE_SETTINGS = frozenset({"refine_m_scale", "refine_m_threshold", "refine_cos_weight"})


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grid_parameters(model: GRADModel) -> set[int]:
    grids = [model.normal_grid] + ([model.abnormal_grid] if model.cfg.abnormal_branch else [])
    return {id(p) for mem in grids for p in mem.parameters()}


def make_optimizer(model: GRADModel, params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with the grids at lr_grid and every other parameter at lr_net."""
    grid_ids = _grid_parameters(model)
    grids = [p for p in params if id(p) in grid_ids]
    nets = [p for p in params if id(p) not in grid_ids]
    groups = [g for g in ({"params": grids, "lr": cfg.train.lr_grid}, {"params": nets, "lr": cfg.train.lr_net})
              if g["params"]]
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


def stage_parameters(model: GRADModel, stage: str, cfg: RunConfig) -> list[nn.Parameter]:
    """Parameters trained in ``stage``; sets requires_grad accordingly on the whole model."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None  # no stale gradients from the previous stage
    if stage == "abnormal":
        shared = [] if model.separate_mapper else list(model.mapper.parameters())
        params = [*shared, *model.abnormal_parameters()]
    else:
        params = model.normal_parameters()
        if not cfg.train.freeze_mapper_stage2:
            params += list(model.mapper.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def set_stage_mode(model: GRADModel, stage: str) -> None:
    """Train mode, except that the frozen abnormal branch keeps its BN statistics in stage 2."""
    model.train()
    if stage == "normal" and model.cfg.abnormal_branch:
        model.abnormal_cnn.eval()


def abnormal_step(model: GRADModel, x: torch.Tensor, cfg: RunConfig, channel_std: torch.Tensor,
                  gen: torch.Generator, real: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Stage-1 loss of one batch: synthetic anomalies (plus real defects, when given) against their masks.

    ``real`` = (features, masks at feature resolution) of labelled defect images, appended to the batch as is.
    """
    x_anom, mask = synthesize_anomalies(x, cfg.fbp, channel_std, gen)
    if real is not None:
        x_anom, mask = torch.cat([x_anom, real[0]]), torch.cat([mask, real[1].to(mask)])
    _, score = model.abnormal_forward(x_anom)
    return truncated_l1_contrastive(score, mask, cfg.train.contrastive_threshold)


def normal_step(model: GRADModel, x: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss of one batch: MSE(x_ref, x) with the loss's refinement (the normal branch alone where the
    fusion form allows)."""
    x_ref = model.normal_refined(x, for_loss=True)
    return reconstruction_mse(similarity_refine(model(x).x_hat, x, model.cfg) if x_ref is None else x_ref, x)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   grad_clip: float) -> float:
    """Backward, optional grad-norm clip, step; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


def stage_seed(seed: int, stage_index: int) -> int:
    """Every stage starts from its own seed, so stage 2 of a full run and of a NORMAL-only run draw the same
    batches and jitter (stage 1 consumes a varying amount of randomness)."""
    return seed + 1000 * stage_index


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) >= 2 or n < 2:  # BatchNorm needs >1 sample; drop a final singleton batch
            yield idx


@dataclass
class TrainingData:
    """Cached features of the training images (split into train and validation) and their statistics."""

    features: torch.Tensor  # float16 (N, C, H, W), on CPU: the images stages 1 and 2 train on
    samples: list[Sample]  # every good training image (train + validation), for the model file's summary
    val_features: torch.Tensor  # float16 (V, C, H, W): held-out good training images
    val_classes: list[str]  # class name of every validation image
    train_classes: list[str]  # class name of every image of ``features``
    channel_std: torch.Tensor  # (C,) per-channel standard deviation of the training features
    defects: DefectSet | None  # labelled defects stage 1 trains on
    heldout_defects: DefectSet | None  # labelled defects kept for the self-check and the fusion fit
    cache_hit: bool
    val_files: list[str] = field(default_factory=list)  # resolved paths of the held-out good training images

    @property
    def feature_std(self) -> float:
        """Global feature sigma (root mean channel variance)."""
        return float(self.channel_std.pow(2).mean().sqrt())


def _load_defects(cfg: RunConfig, extractor: FeatureExtractor, device: torch.device,
                  feat_hw: tuple[int, int], images: TrainingImages) -> DefectSet | None:
    if images.defects is None or images.defect_masks is None:
        return None
    samples, masks = images.defects, images.defect_masks
    feats, _ = FeatureCache(cfg.data.cache_dir).load_or_compute(extractor, samples, cfg.data.image_size, device)
    cells = cell_masks(torch.from_numpy(masks), feat_hw, [s.mask_path is not None for s in samples])
    log.info("real-defect supervision: %d images from %s (%.1f%% defective cells)", len(samples), cfg.data.defects,
             100 * float(cells.mean()))
    return DefectSet(torch.from_numpy(feats), cells, samples)


def trained_goods_by_folder(samples: Sequence[Sample], held_out: Sequence[str]) -> dict[str, list[str]]:
    """The good images the model trains on (``samples`` less the ``held_out`` resolved paths), as resolved folder ->
    sorted file names: compact enough for bundle.json, exact where training and test goods share a folder."""
    skip = set(held_out)
    out: dict[str, list[str]] = {}
    for s in samples:
        path = s.image_path.resolve()
        if str(path) not in skip:
            out.setdefault(str(path.parent), []).append(path.name)
    return {folder: sorted(names) for folder, names in sorted(out.items())}


def trained_defect_files(defects: DefectSet | None) -> list[str]:
    """Resolved paths (symlinks followed) of the labelled defect images stage 1 trains on, sorted."""
    return sorted(str(s.image_path.resolve()) for s in defects.samples) if defects is not None else []


_NAMES_LOGGED = 12  # held-out defect files named in the log; a large synthetic set would flood it


def _split_defects(defects: DefectSet | None, holdout: float) -> tuple[DefectSet | None, DefectSet | None]:
    if defects is None:
        return None, None
    train, held = defects.split(holdout)
    if held is not None:
        names = [str(Path(s.image_path.parent.name, s.image_path.name)) for s in held.samples]
        shown = ", ".join(names[:_NAMES_LOGGED]) + (f", ... ({len(names) - _NAMES_LOGGED} more)"
                                                     if len(names) > _NAMES_LOGGED else "")
        log.info("labelled defects: %d train stage 1, %d held out for the self-check and the fusion fit (%s)",
                 len(train.samples), len(held.samples), shown)
    return train, held


def prepare_training_data(cfg: RunConfig, extractor: FeatureExtractor, device: torch.device,
                          images: TrainingImages | None = None) -> TrainingData:
    """The cached (or freshly extracted) features of the good training images (``images``, chosen by
    :func:`select_training_images` when not given), the validation split and the optional labelled defects."""
    images = images if images is not None else select_training_images(cfg)
    samples, val_idx = images.samples, images.val_idx
    feats, hit = FeatureCache(cfg.data.cache_dir).load_or_compute(extractor, samples, cfg.data.image_size, device)
    features = torch.from_numpy(feats)
    keep = np.setdiff1d(np.arange(len(samples)), val_idx)
    train_feats = features[torch.from_numpy(keep)]
    sub = train_feats[:: max(1, len(train_feats) // 64)].float()
    channel_std = sub.transpose(0, 1).reshape(sub.shape[1], -1).std(dim=1).clamp_min(1e-6)
    defects, heldout = _split_defects(_load_defects(cfg, extractor, device, tuple(features.shape[-2:]), images),
                                      cfg.data.defect_holdout)
    log.info("training on %d good images, %d held out for validation", len(keep), len(val_idx))
    return TrainingData(train_feats, samples, features[torch.from_numpy(val_idx)],
                        [samples[i].class_name for i in val_idx], [samples[i].class_name for i in keep],
                        channel_std, defects, heldout, hit,
                        val_files=images.val_files)


def coordinate_spread(model: GRADModel, x: torch.Tensor) -> dict[str, list[float]]:
    """Std and mean of the global coordinate g over images, per mapper: a collapsed mapper has std ~ 0."""
    with torch.no_grad():
        out = {}
        mappers = {"normal": model.mapper}
        if model.separate_mapper:
            mappers["abnormal"] = model.abnormal_mapper
        for name, mapper in mappers.items():
            with evaluating(mapper):
                g, _ = mapper(x)
            g = g.reshape(-1, 2)
            out[name] = {"g_std": [round(v, 4) for v in g.std(0).tolist()],
                         "g_mean": [round(v, 4) for v in g.mean(0).tolist()]}
    return out


@dataclass(frozen=True)
class SettingDifference:
    """One setting whose value differs between two config dicts; prints as "key (old -> new)"."""

    key: str  # dotted name, e.g. "model.map_scales"
    old: Any
    new: Any

    def __str__(self) -> str:  # values may come from someone else's model file: shortened
        return f"{self.key} ({shown_value(self.old)} -> {shown_value(self.new)})"

    @property
    def restoring_option(self) -> str:
        """``--set key=old``: the option that gives the setting its old value back (a config.yaml from before a
        setting existed loads its new default, while a checkpoint keeps the value its run had)."""
        old = ",".join(map(str, self.old)) if isinstance(self.old, (list, tuple)) else str(self.old)
        return f"--set {self.key}={one_line(old, 200)}"


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[SettingDifference]:
    """The settings whose values differ between two config dicts, by dotted name."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(SettingDifference(f"{prefix}{key}", a, b))
    return diffs


#: model settings that only the abnormal branch or the map head read: a reused normal branch may differ in them
ABNORMAL_ONLY_SETTINGS = {"fusion_form", "abnormal_branch", "fusion_weight_init", "abnormal_mapper", "abnormal_score",
                          *HEAD_SETTINGS}
NORMAL_BRANCH_PREFIXES = ("mapper.", "normal_grid.", "normal_cnn.")


def refuse_other_goods(payload: dict[str, Any], digests: Sequence[str], what: str,
                       names: dict[str, str] | None = None) -> None:
    """A model or checkpoint recorded the content digests of the good images it trained on: refuse to continue it
    on other images (the same ``data.root`` text can name other files, e.g. a relative root from another folder).
    ``names`` (digest -> file name of this run's images) names the first images it never saw."""
    recorded = payload.get("trained_good_digests")
    if recorded is None:  # from before digests were recorded: the settings comparison is all there is
        return
    theirs, mine = set(recorded), set(digests)
    if theirs != mine:
        new = sorted((names or {}).get(d, d) for d in mine - theirs)
        added = f"; {len(new)} image(s) of this run are new to it ({first_few(new)})" if new else ""
        raise ConfigError(f"{what} was trained on other good images: {len(theirs - mine)} of its {len(theirs)} are "
                          f"not among this run's {len(mine)}{added} (same data settings, other files: check --data "
                          f"and the folder you run from)")


def check_normal_source(cfg: RunConfig, digests: Sequence[str]) -> dict[str, Any]:
    """Read ``cfg.train.normal_from`` and refuse a model trained otherwise, by settings or on other good images
    (``digests``: this run's), before any feature is extracted; returns its payload for :func:`load_normal_branch`.
    Its dataset roots may be spelled otherwise (another path to the same images) when it records the content
    digests that decide whether the images are the same."""
    path = cfg.train.normal_from
    payload = read_checkpoint(path)
    source = payload["config"]
    mine = config_to_dict(cfg)
    source_model = source["model"]
    if source_model.get("abnormal_branch", True) and (source_model.get("fusion_form") != "map"
                                                      or source_model.get("abnormal_mapper") != "separate"):
        raise ConfigError(f"train.normal_from = {path}: its normal branch depends on its abnormal branch "
                          "(fusion form or shared mapper); only a \"map\"-form model with separate mappers or a "
                          "NORMAL-only model can lend its normal branch")
    diffs = config_differences({k: v for k, v in source["model"].items() if k not in ABNORMAL_ONLY_SETTINGS},
                               {k: v for k, v in mine["model"].items() if k not in ABNORMAL_ONLY_SETTINGS}, "model.")
    data_free = {"defects", "defect_masks", "cache_dir"}
    if payload.get("trained_good_digests") is not None:
        data_free |= {"root", "extra_roots"}
    for section, skip in (("data", data_free), ("backbone", set())):
        diffs += config_differences({k: v for k, v in source[section].items() if k not in skip},
                                    {k: v for k, v in mine[section].items() if k not in skip}, f"{section}.")
    if diffs:
        raise ConfigError(f"train.normal_from = {path} was trained with other settings: "
                          f"{'; '.join(map(str, diffs[:5]))}")
    refuse_other_goods(payload, digests, f"train.normal_from = {path}")
    return payload


def load_normal_branch(model: GRADModel, cfg: RunConfig, digests: Sequence[str],
                       payload: dict[str, Any] | None = None) -> str:
    """Copy the normal branch of ``cfg.train.normal_from`` into ``model`` (``payload``: its file as
    :func:`check_normal_source` read and checked it; read and checked here when not given)."""
    path = cfg.train.normal_from
    payload = payload if payload is not None else check_normal_source(cfg, digests)
    state = {k: v for k, v in payload["state_dict"].items() if k.startswith(NORMAL_BRANCH_PREFIXES)}
    missing = [k for k in model.state_dict() if k.startswith(NORMAL_BRANCH_PREFIXES) and k not in state]
    if missing or tuple(payload["feat_hw"]) != model.feat_hw or payload["channels"] != model.channels:
        raise ConfigError(f"train.normal_from = {path}: its normal branch does not fit this model ({missing[:3]})")
    model.load_state_dict(state, strict=False)
    log.info("normal branch taken from %s: stage 2 skipped", path)
    return str(path)


#: settings a run may be resumed with other values of, as they leave the model the same: the dataset roots (the
#: same images by another path, e.g. from another folder; the content digests guard that the images are the same),
#: the feature cache folder (a cold and a warm cache train the same model), how often a checkpoint is written (no
#: randomness or selection depends on it) and the run folder (a run folder moved or copied resumes where it is)
RESUME_FREE_SETTINGS = frozenset({"data.root", "data.extra_roots", "data.cache_dir", "train.checkpoint_every",
                                  "output_dir"})
#: the same for a checkpoint from before the content digests were recorded: its roots must be the same text
RESUME_FREE_WITHOUT_DIGESTS = RESUME_FREE_SETTINGS - {"data.root", "data.extra_roots"}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; its message says which checkpoint exists and how to resume."""


@dataclass
class _Best:
    """The best validation score of the running stage and the model state that reached it."""

    score: float = -np.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None

    def offer(self, score: float, epoch: int, model: GRADModel) -> bool:
        if np.isnan(score) or score < self.score:
            return False
        self.score, self.epoch = score, epoch
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True


class Trainer:
    """Runs the stages with checkpoints after every ``checkpoint_every`` epochs; ``resume`` continues a run."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.device = resolve_torch_device(cfg.train.device, "train.device")
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        # (stage index, next epoch) of the newest checkpoint; None until this run restored or wrote one
        self.position: tuple[int, int] | None = None
        self._resuming = False
        # files of another run in the run folder that this fresh run replaces at its first checkpoint, not before
        self._previous: list[str] = []
        # where this run logs while the previous run's train_log.jsonl is kept (None: train_log.jsonl itself)
        self._pending_log: Path | None = None

    @property
    def state_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def model_path(self) -> Path:
        return self.run_dir / "model.pt"

    @property
    def log_path(self) -> Path:
        return self._pending_log or self.run_dir / "train_log.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _resume_refusals(self, state: dict[str, Any], images: TrainingImages) -> list[SettingDifference]:
        """Refuse to resume checkpoint ``state`` with changed settings (naming them) or on other good images, before
        any feature is extracted; returns the map-head settings a finished run refits (changed, but allowed)."""
        # the roots may differ only where the content digests can tell the images apart (not in older checkpoints)
        free = RESUME_FREE_SETTINGS if state.get("trained_good_digests") is not None else RESUME_FREE_WITHOUT_DIGESTS
        diffs = [d for d in config_differences(state["config"], config_to_dict(self.cfg))
                 if d.key.removeprefix("model.") not in POST_TRAINING_SETTINGS and d.key not in free]
        refittable = {f"model.{name}" for name in HEAD_SETTINGS | REFINE_SETTINGS}
        head_only = [d for d in diffs if d.key in refittable]
        diffs = [d for d in diffs if d.key not in refittable]
        if head_only and int(state["stage_index"]) < len(STAGES):
            # mid-run, the stage's best epoch so far was chosen with the old head: keep the head of the run
            diffs, head_only = diffs + head_only, []
        if diffs:
            raise ConfigError(f"cannot resume {self.state_path}: settings differ from the interrupted run: "
                              f"{first_few(diffs, 5, '; ')} (to resume it as "
                              f"it was: {' '.join(d.restoring_option for d in diffs)})")
        # after the settings: they say why. The data roots are no setting to compare (the same images may be
        # reached by another path); the digests are what must match
        what = f"cannot resume {self.state_path}: it"
        refuse_other_goods(state, images.trained_digests, what, images.names_by_digest())
        classes = sorted({s.class_name for s in images.samples})
        if state.get("classes") is not None and list(state["classes"]) != classes:
            raise ConfigError(f"{what} was trained on classes {', '.join(state['classes'])}; the same images give "
                              f"this run the classes {', '.join(classes)} (check --data)")
        return head_only

    def _restore(self, model: GRADModel, gen: torch.Generator, state: dict[str, Any],
                 head_only: list[SettingDifference]) -> tuple[int, int, Any, _Best]:
        """Load checkpoint ``state`` (checked by :meth:`_resume_refusals`) into model/gen; drop log lines that the
        resumed epochs will write again."""
        if model.image_gaussian is None:  # switched off: the statistics in the file have no module to go to
            for weights in (state["state_dict"], (state.get("best") or {}).get("state")):
                for key in [k for k in (weights or {}) if k.startswith("image_gaussian.")]:
                    del weights[key]
        if head_only:  # a finished run: the head is fitted after stage 2, what the stages learnt does not use it
            log.info("resuming a finished run with a changed map head: %s", "; ".join(map(str, head_only)))
            if any(d.key.removeprefix("model.") in REFINE_SETTINGS for d in head_only):
                log.warning("the refinement changed after training: the branches keep what they learnt under the "
                            "old stage-2 loss; only the map gains, the fusion weight and the image Gaussian are "
                            "refitted")
            for weights in (state["state_dict"], (state.get("best") or {}).get("state")):
                if weights is not None:
                    weights["map_scale_gain"] = model.map_scale_gain.clone()  # refitted before stage 3
        model.load_state_dict(state["state_dict"])
        stage, epoch = int(state["stage_index"]), int(state["next_epoch"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best = _Best(**state["best"]) if state.get("best") else _Best()
        self._truncate_log(stage, epoch)
        where = (f"stage {STAGES[stage]} epoch {epoch}" if stage < len(STAGES) else
                 "the end of stage 2: both stages are trained, so only the fits after them run again (map scales, "
                 "fusion weight, image Gaussian) and model.pt is written again")
        log.info("resuming %s at %s", self.state_path, where)
        self.position = (stage, epoch)
        return stage, epoch, state["optimizer"], best

    def _truncate_log(self, stage: int, epoch: int) -> None:
        if not self.log_path.is_file():
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("stage") in STAGES and (STAGES.index(rec["stage"]), rec.get("epoch", 0)) <= (stage, epoch):
                kept.append(line)
        self.log_path.write_text("".join(f"{line}\n" for line in kept))

    def _start_files(self, restored: bool) -> None:
        """Write config.yaml and start the log. A fresh run in a folder holding another run's files keeps them as
        they are until its own first checkpoint (:meth:`_replace_previous_run`): Ctrl-C, an error or a crash
        before it leaves that run whole (its model, checkpoint, config.yaml and log agree)."""
        if self._previous and not restored:
            self._pending_log = self.run_dir / ".train_log.jsonl.pending"
            self._pending_log.unlink(missing_ok=True)  # a crashed run's
            log.info("%s holds another run's %s: kept until this run's first checkpoint replaces them", self.run_dir,
                     ", ".join(self._previous))
            return
        save_config(self.cfg, self.run_dir / "config.yaml")  # after the resume check: a refused resume keeps it
        if not restored and self.log_path.exists():
            self.log_path.unlink()

    def _replace_previous_run(self) -> None:
        """This run wrote its first checkpoint (or, training no epoch, its model file): the previous run's files go
        now, so the folder holds one run, never a mix: its config.yaml and log are replaced first (atomically), its
        model file (and its checkpoint, when this run keeps none) removed last, so the checkpoint always has its
        config.yaml beside it."""
        pending = self._pending_log
        if pending is None:
            return
        save_config(self.cfg, self.run_dir / "config.yaml")
        if pending.exists():
            os.replace(pending, self.run_dir / "train_log.jsonl")
        else:
            (self.run_dir / "train_log.jsonl").unlink(missing_ok=True)
        self._pending_log = None
        if self.position is None:  # no checkpoint of this run: the one there is the previous run's
            self.state_path.unlink(missing_ok=True)
        else:
            self.model_path.unlink(missing_ok=True)  # a model this run has not written yet
        log.info("the previous run's %s in %s replaced by this run's", ", ".join(self._previous), self.run_dir)
        self._previous = []

    def _drop_pending_log(self) -> None:
        """A run stopped by Ctrl-C before replacing the previous one leaves no log of its own beside it."""
        if self._pending_log is not None:
            with contextlib.suppress(OSError):
                self._pending_log.unlink(missing_ok=True)
            self._pending_log = None

    def run(self, resume: bool = False) -> Path:
        """Train and return the path of the final model file; Ctrl-C anywhere (feature extraction, a stage, the
        fits after the stages) raises :class:`TrainingInterrupted` saying what can be resumed."""
        self._resuming = resume
        try:
            return self._run(resume)
        except KeyboardInterrupt as exc:
            if not isinstance(exc, TrainingInterrupted) and self.position is not None:
                self._replace_previous_run()  # stopped between writing the first checkpoint and replacing the rest
            self._drop_pending_log()
            if isinstance(exc, TrainingInterrupted):
                raise
            raise TrainingInterrupted(self._interrupt_message()) from None
        except BaseException:
            # a failed run's log is its only diagnostic: kept (a later fresh run in the folder starts a new one)
            if self._pending_log is not None and self._pending_log.exists():
                log.warning("this run's log until it failed: %s", self._pending_log)
            raise

    def _run(self, resume: bool) -> Path:
        cfg = self.cfg
        restoring = resume and self.state_path.is_file()
        # a resume continues the run in the folder: its files are not another run's
        self._previous = [] if resume else previous_run_files(self.run_dir, cfg)
        seed_everything(cfg.train.seed)
        cfg.validate()
        if resume:
            self._check_resumable()
        t0 = time.perf_counter()
        # everything that can refuse the run comes before the features are extracted (minutes on real data)
        images = select_training_images(cfg)
        state = read_checkpoint(self.state_path) if restoring else None
        head_only = self._resume_refusals(state, images) if state is not None else []
        normal_source = (check_normal_source(cfg, images.trained_digests) if cfg.train.normal_from
                         else None)
        check_output_folder(self.run_dir, "output folder (-o / output_dir)")
        if cfg.model.image_gaussian:  # before the stages, not after an hour of training
            try:
                require_training_images(images.train_classes)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        extractor = FeatureExtractor(cfg.backbone)
        data = prepare_training_data(cfg, extractor, self.device, images)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # after the data checks: a refused run leaves no folder
        normalisation = {"mean": list(extractor.mean), "std": list(extractor.std)}
        # a model file never names a file to read when it is opened (training/checkpoint.py): weights from a
        # file travel inside it
        embedded = None if cfg.backbone.weights in NAMED_WEIGHTS else {
            k: v.detach().cpu() for k, v in extractor.state_dict().items()}
        del extractor  # features are cached; free the backbone during training
        _, c, h, w = data.features.shape
        model = GRADModel(c, (h, w), cfg.model).to(self.device)
        digests = images.trained_digests
        normal_from = (load_normal_branch(model, cfg, digests, normal_source) if normal_source is not None
                       else None)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        start_stage, start_epoch, opt_state, best = 0, 0, None, _Best()
        if state is not None:
            start_stage, start_epoch, opt_state, best = self._restore(model, gen, state, head_only)
        elif resume:  # nothing of a finished run is lost (checked above): nothing trained yet, or no epoch to train
            log.warning("--resume: no checkpoint at %s: starting from scratch", self.state_path)
        self._start_files(restored=state is not None)
        val = ValidationSet.build(data.val_features, cfg.fbp, data.channel_std,
                                  data.heldout_defects or data.defects,
                                  defects_trained=data.heldout_defects is None,
                                  clean_classes=data.val_classes).to(self.device) \
            if len(data.val_features) else None
        head = AnomalyHead(cfg.model, (cfg.data.image_size, cfg.data.image_size))
        meta_base = self._model_metadata(data, digests, embedded, normalisation, normal_from,
                                         validated=val is not None)
        ctx = _StageContext(model, data, val, head, gen, meta_base, t0)
        for stage_index in range(start_stage, len(STAGES)):
            first = start_epoch if stage_index == start_stage else 0
            self._run_stage(ctx, stage_index, first, opt_state if stage_index == start_stage else None,
                            best if stage_index == start_stage else _Best())
        gains = self._fit_map_scales(ctx)
        fusion = self._fit_fusion(ctx)
        model.eval()
        image_gaussian = self._fit_image_gaussian(ctx)
        meta = {**meta_base, "train_seconds": round(time.perf_counter() - t0, 1),
                "feature_cache_hit": data.cache_hit, "final_losses": _final_losses(self.log_path),
                "validation": {"n_images": int(len(data.val_features)), **fusion}, "map_scale_gain": gains,
                "image_gaussian": image_gaussian}
        atomic_torch_save(model_payload(cfg, model.cpu(), meta), self.model_path)
        self._replace_previous_run()  # a run that trained no epoch wrote no checkpoint: the model is its first file
        log.info("model written to %s (%.1f s)", self.model_path, meta["train_seconds"])
        return self.model_path

    def _model_metadata(self, data: TrainingData, digests: Sequence[str], embedded: dict[str, torch.Tensor] | None,
                        normalisation: dict[str, list[float]], normal_from: Any, validated: bool) -> dict[str, Any]:
        """What the model file records besides its weights and settings: classes, feature statistics, the images
        it trained on and held out (by folder and by content digest), the labelled defects stage 1 trained on and
        those that chose its epochs (``validated``), the extractor's weights when they came from a file."""
        return {
            "classes": sorted({s.class_name for s in data.samples}),
            "feature_std": data.feature_std,
            "data_summary": summarize(data.samples),
            # the training roots, the good images trained on (by folder, whatever the dataset layout) and the ones
            # held out for validation, so grad-calibrate can tell a folder of held-out goods from training images
            "data_roots": [str(Path(r).resolve()) for r in self.cfg.data.roots],
            "trained_goods": trained_goods_by_folder(data.samples, data.val_files),
            "held_out_goods": data.val_files,
            "trained_good_digests": digests,
            **({} if embedded is None else {"extractor_state_dict": embedded}),
            "normalisation": normalisation,
            "normal_branch_from": normal_from,
            # the labelled defects stage 1 trained on, as the files they link to: their maps are better than an
            # unseen defect's, so grad-refine tune leaves them out of its tuning images
            "trained_defects": trained_defect_files(data.defects) if self._stage_epochs("abnormal") else [],
            # the labelled defects held out of stage 1 (data.defect_holdout) chose its epoch and fitted the fusion
            # weight: scoring them would flatter the model too, so grad-eval and grad-bench leave them out as well
            "tuned_defects": trained_defect_files(data.heldout_defects) if validated else [],
        }

    def _check_resumable(self) -> None:
        """A resume without checkpoint.pt would train from scratch and replace the run's model.pt: refuse it,
        unless the run trains no epoch (a NORMAL-only run from train.normal_from keeps no checkpoint; resuming
        it only refits the head)."""
        trains = self._stage_epochs("abnormal") + self._stage_epochs("normal") > 0
        if trains and self.model_path.is_file() and not self.state_path.is_file():
            raise ConfigError(f"no checkpoint.pt to resume in {self.run_dir} (it holds a finished model.pt that a "
                              "fresh run would replace); --overwrite to train afresh")

    def _interrupt_message(self) -> str:
        """What a Ctrl-C leaves: --resume is offered only for a checkpoint of this run (one it restored or wrote);
        another run's files in the folder are untouched until this run's first checkpoint."""
        ours = self.position is not None or (self._resuming and self.state_path.is_file())
        if not ours and self._previous:
            return (f"stopped before the first checkpoint: nothing saved; the files already in {self.run_dir} "
                    f"({', '.join(self._previous)}) are untouched")
        if not ours:
            return f"stopped before the first checkpoint: nothing to resume in {self.run_dir}"
        if self.position is None:  # stopped before this run read or wrote it (e.g. while extracting features)
            state = read_checkpoint(self.state_path)  # safe_torch_load's checks: the run folder may be handed over
            self.position = (int(state["stage_index"]), int(state["next_epoch"]))
        stage, epoch = self.position
        where = f"stage {STAGES[stage]} epoch {epoch}" if stage < len(STAGES) else "end of training"
        return (f"checkpoint {self.state_path} holds {where}; continue with: "
                f"grad-train --config {self.run_dir / 'config.yaml'} --resume")

    def _stage_epochs(self, stage: str) -> int:
        if stage == "abnormal":
            return self.cfg.train.stage1_epochs if self.cfg.model.abnormal_branch else 0
        return 0 if self.cfg.train.normal_from else self.cfg.train.stage2_epochs

    def _selection_score(self, ctx: "_StageContext", stage: str) -> tuple[float, dict[str, Any]]:
        """Validation score of the running stage: abnormal-score AUROC over every kind (stage 1), detection by the
        normal map alone (stage 2)."""
        if ctx.val is None:
            return float("nan"), {}
        if stage == "abnormal":
            check = selfcheck(ctx.model, ctx.val)
            score = float(np.nanmean([v["abnormal_auroc"] for v in check.values()]))
            return score, {"selfcheck": check, "heldout_auroc": round(heldout_auroc(check), 4)}
        return detection_score(ctx.model, ctx.val, ctx.head), {}

    def _run_stage(self, ctx: "_StageContext", stage_index: int, first_epoch: int, opt_state: Any,
                   best: _Best) -> None:
        cfg, model, data = self.cfg, ctx.model, ctx.data
        stage = STAGES[stage_index]
        epochs = self._stage_epochs(stage)
        params = stage_parameters(model, stage, cfg)
        optimizer = make_optimizer(model, params, cfg)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, int(round(cfg.train.lr_step_fraction * epochs))), gamma=0.1)
        if opt_state is not None and first_epoch > 0:
            optimizer.load_state_dict(opt_state["optimizer"])
            scheduler.load_state_dict(opt_state["scheduler"])
        if first_epoch == 0:
            ctx.gen.manual_seed(stage_seed(cfg.train.seed, stage_index))
            torch.manual_seed(stage_seed(cfg.train.seed, stage_index))
        bar = tqdm(range(first_epoch, epochs), desc=f"stage {stage_index + 1}/3 ({stage})", unit="epoch")
        n = len(data.features)
        channel_std = data.channel_std.to(self.device)  # once, not per batch
        for epoch in bar:
            set_stage_mode(model, stage)
            losses = []
            epoch_t0 = time.perf_counter()
            for idx in _batches(n, cfg.train.batch_size, ctx.gen):
                x = data.features[idx].to(self.device, torch.float32, non_blocking=True)
                if stage == "abnormal":
                    real = None if data.defects is None else data.defects.batch(
                        max(1, cfg.train.batch_size // 4), ctx.gen, self.device)
                    loss = abnormal_step(model, x, cfg, channel_std, ctx.gen, real)
                else:
                    loss = normal_step(model, x)
                if not torch.isfinite(loss.detach()):  # before the step: a NaN would spread into every weight
                    raise self._diverged(stage_index, epoch, f"loss {float(loss.detach())}")
                losses.append(optimizer_step(loss, optimizer, params, cfg.train.grad_clip))
            if not all(bool(torch.isfinite(p).all()) for p in params):  # a step from a finite loss overflowed
                raise self._diverged(stage_index, epoch, "non-finite weights")
            scheduler.step()
            last = epoch + 1 == epochs
            record = {"stage": stage, "epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                      "lr_grid": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - ctx.t0, 2),  # since the run started
                      "epoch_seconds": round(time.perf_counter() - epoch_t0, 2)}  # this epoch's steps alone
            if last or (cfg.train.val_every > 0 and (epoch + 1) % cfg.train.val_every == 0):
                score, extra = self._selection_score(ctx, stage)
                record.update(val_score=round(score, 4), best=best.offer(score, epoch + 1, model), **extra)
            self._log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if last or (cfg.train.checkpoint_every > 0 and (epoch + 1) % cfg.train.checkpoint_every == 0):
                if last and best.state is not None and cfg.train.select_best:
                    model.load_state_dict(best.state)  # the stage ends at its best validation epoch
                    log.info("stage %s: keeping epoch %d (validation score %.4f)", stage, best.epoch, best.score)
                nxt = (stage_index + 1, 0) if last else (stage_index, epoch + 1)
                self._save_state(model, optimizer, scheduler, nxt, ctx.gen, ctx.meta_base, None if last else best)
        spread = coordinate_spread(model, data.features[: min(64, n)].to(self.device, torch.float32))
        self._log({"stage": stage, "epoch": epochs, "event": "stage_end", "coordinate_spread": spread,
                   "best_epoch": best.epoch})
        log.info("stage %d (%s) done; global-coordinate spread %s", stage_index + 1, stage, spread)

    def _diverged(self, stage_index: int, epoch: int, what: str) -> GradError:
        """The one line for a run whose training diverged (nothing written after the last good checkpoint)."""
        return GradError(f"training diverged in stage {stage_index + 1} ({STAGES[stage_index]}) epoch {epoch + 1}: "
                         f"{what}; lower train.lr_grid / train.lr_net or set train.grad_clip > 0 "
                         f"(run {self.run_dir})")

    def _fit_map_scales(self, ctx: "_StageContext") -> list[float]:
        """After stage 2: put every residual scale of the map in the plain map's units (before the fusion fit,
        whose weight is in those units). Stage 2's epoch selection ran with gains of 1, i.e. on a map close to the
        plain one: the gains depend on the trained branch, so they cannot be fitted before it exists."""
        if tuple(self.cfg.model.map_scales) == (1,):
            return [1.0]
        gains = fit_map_scale_gains(ctx.model, ctx.data.features)
        self._log({"stage": "map_scales", "scales": list(self.cfg.model.map_scales), "gains": gains})
        log.info("map scales %s: gains %s", list(self.cfg.model.map_scales), gains)
        return gains

    def _fit_fusion(self, ctx: "_StageContext") -> dict[str, Any]:
        """Stage 3 ("map" fusion form): fit w on validation anomalies; the model stores it in fusion_weight."""
        model, cfg = ctx.model, self.cfg
        if not (cfg.model.abnormal_branch and cfg.model.fusion_form == "map"):
            return {}
        if ctx.val is None or cfg.train.fusion_weight is not None:
            weight = float(cfg.train.fusion_weight or 0.0)
            table: dict[str, float] = {}
        else:
            weight, table = fit_fusion_weight(model, ctx.val, ctx.head, kinds=cfg.train.fusion_fit_kinds or None)
        with torch.no_grad():
            model.fusion_weight.fill_(weight)
        check = selfcheck(model, ctx.val) if ctx.val is not None else {}
        result = {"fusion_weight": round(weight, 6), "fusion_fit": table, "selfcheck": check,
                  "heldout_auroc": round(heldout_auroc(check), 4) if check else None}
        self._log({"stage": "fusion", **result})
        log.info("stage 3 (fusion): w = %.4f; abnormal-score AUROC on kinds stage 1 never saw: %s", weight,
                 result["heldout_auroc"])
        return result

    def _fit_image_gaussian(self, ctx: "_StageContext") -> dict[str, Any] | None:
        """After stage 3: the per-class image Gaussians and the normalisation of both score parts (the map score
        is the finished model's, fusion weight included)."""
        model = ctx.model
        if model.image_gaussian is None:
            return None

        def map_scores(f: torch.Tensor) -> torch.Tensor:
            f = f.to(self.device)
            return ctx.head.postprocess(model.lowres_map(model(f), f))[0]

        with torch.no_grad():
            stats = fit_image_gaussian(ctx.data.features, ctx.data.train_classes, ctx.data.val_features,
                                       ctx.data.val_classes, map_scores, model.image_gaussian.stats)
        model.image_gaussian.set_statistics(stats)
        summary = stats.summary()
        self._log({"stage": "image_gaussian", "classes": summary})
        log.info("image Gaussian fitted for %d class(es): %s", len(summary),
                 "; ".join(f"{c}: shrinkage {v['shrinkage']}, score parts normalised on {v['reference']}"
                           for c, v in summary.items()))
        return summary

    def _save_state(self, model: GRADModel, optimizer: torch.optim.Optimizer, scheduler: Any,
                    nxt: tuple[int, int], gen: torch.Generator, meta: dict[str, Any], best: _Best | None) -> None:
        payload = model_payload(self.cfg, model, meta)
        payload.update({
            "stage_index": nxt[0],
            "next_epoch": nxt[1],
            # A checkpoint at a stage boundary starts the next stage with a fresh optimizer of other parameters.
            "optimizer": ({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                          if nxt[1] > 0 else None),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best": None if best is None or best.state is None else
            {"score": float(best.score), "epoch": best.epoch, "state": best.state},
        })
        atomic_torch_save(payload, self.state_path)
        self.position = nxt
        self._replace_previous_run()  # the folder now holds this run's checkpoint: the previous run's files go


@dataclass
class _StageContext:
    """What every stage reads: the model, the data, validation, the map head, the generator and timing."""

    model: GRADModel
    data: TrainingData
    val: ValidationSet | None
    head: AnomalyHead
    gen: torch.Generator
    meta_base: dict[str, Any]
    t0: float


def _final_losses(log_path: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("loss") is not None:
                last[rec["stage"]] = rec["loss"]
    return last


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train a GRAD model as configured; returns the final model file path."""
    return Trainer(cfg).run(resume=resume)
