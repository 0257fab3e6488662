"""Two-stage GRAD training on cached extractor features (DESIGN.md section 2, "Losses and training").

Stage 1 trains the abnormal grids + abnormal CNN + coordinate mapper with FBP and the truncated-L1 contrastive
loss. Stage 2 freezes the abnormal branch (BN in eval) and trains the normal grids + normal CNN + mapper + fusion
weight with MSE on the refined reconstruction.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gradad.data.datasets import Sample, load_samples, summarize
from gradad.errors import ConfigError, DatasetError
from gradad.training.backbone import FeatureExtractor
from gradad.training.checkpoint import atomic_torch_save, model_payload, read_checkpoint
from gradad.training.config import RunConfig, config_to_dict, save_config
from gradad.training.fbp import feature_block_paste
from gradad.training.features import FeatureCache
from gradad.training.losses import reconstruction_mse, truncated_l1_contrastive
from gradad.training.model import GRADModel

log = logging.getLogger(__name__)

STAGES = ("abnormal", "normal")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable explicit device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grid_parameters(model: GRADModel) -> set[int]:
    return {id(p) for mem in (model.normal_grid, model.abnormal_grid) for p in mem.parameters()}


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
        params = [*model.mapper.parameters(), *model.abnormal_parameters()]
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
    if stage == "normal":
        model.abnormal_cnn.eval()


def abnormal_step(model: GRADModel, x: torch.Tensor, cfg: RunConfig, feature_std: float,
                  gen: torch.Generator) -> torch.Tensor:
    """Stage-1 loss of one batch: FBP, then s = channel 0 of x_hat_a against the paste mask."""
    x_fbp, mask = feature_block_paste(x, cfg.fbp, feature_std, gen)
    g, u = model.coordinates(x_fbp)
    x_hat_a = model.abnormal_branch(g, u)
    return truncated_l1_contrastive(x_hat_a[:, :1], mask, cfg.train.contrastive_threshold)


def normal_step(model: GRADModel, x: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss of one batch: MSE(x_ref, x)."""
    return reconstruction_mse(model(x).x_ref, x)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) >= 2 or n < 2:  # BatchNorm needs >1 sample; drop a final singleton batch
            yield idx


@dataclass
class TrainingData:
    """Cached features of the training images and a short description for the model file."""

    features: torch.Tensor  # float16 (N, C, H, W), on CPU
    samples: list[Sample]
    feature_std: float
    cache_hit: bool


def prepare_training_data(cfg: RunConfig, extractor: FeatureExtractor, device: torch.device) -> TrainingData:
    """Load the training samples and their cached (or freshly extracted) features."""
    samples = [s for s in load_samples(cfg.data.root, "train", cfg.data.classes, cfg.data.layout) if s.label == 0]
    if len(samples) < 2:
        raise DatasetError(f"need at least 2 good training images under {cfg.data.root}, found {len(samples)}")
    feats, hit = FeatureCache(cfg.data.cache_dir).load_or_compute(extractor, samples, cfg.data.image_size, device)
    features = torch.from_numpy(feats)
    sub = features[:: max(1, len(features) // 64)].float()
    return TrainingData(features, samples, float(sub.std()), hit)


class Trainer:
    """Runs both stages with checkpoints after every ``checkpoint_every`` epochs; ``resume`` continues a run."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)

    @property
    def state_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def model_path(self) -> Path:
        return self.run_dir / "model.pt"

    def run(self, resume: bool = False) -> Path:
        """Train and return the path of the final model file."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        cfg.validate()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        extractor = FeatureExtractor(cfg.backbone)
        data = prepare_training_data(cfg, extractor, self.device)
        normalisation = {"mean": list(extractor.mean), "std": list(extractor.std)}
        del extractor  # features are cached; free the backbone during training
        n, c, h, w = data.features.shape
        model = GRADModel(c, (h, w), cfg.model).to(self.device)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        start_stage, start_epoch, opt_state = 0, 0, None
        if resume and self.state_path.is_file():
            state = read_checkpoint(self.state_path)
            if state["config"] != config_to_dict(cfg):
                raise ConfigError(f"cannot resume {self.state_path}: the run's config differs from config.yaml")
            model.load_state_dict(state["state_dict"])
            start_stage, start_epoch, opt_state = state["stage_index"], state["next_epoch"], state["optimizer"]
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            log.info("resuming %s at stage %s epoch %d", self.state_path, STAGES[start_stage], start_epoch)
        elif resume:
            log.info("no checkpoint at %s: starting from scratch", self.state_path)
        save_config(cfg, self.run_dir / "config.yaml")  # after the resume check: a refused resume keeps the old one
        log_path = self.run_dir / "train_log.jsonl"
        if start_stage == 0 and start_epoch == 0 and log_path.exists():
            log_path.unlink()
        meta_base = {
            "classes": sorted({s.class_name for s in data.samples}),
            "feature_std": data.feature_std,
            "data_summary": summarize(data.samples),
            "normalisation": normalisation,
        }
        history: list[dict[str, Any]] = []
        for stage_index in range(start_stage, len(STAGES)):
            stage = STAGES[stage_index]
            epochs = cfg.train.stage1_epochs if stage == "abnormal" else cfg.train.stage2_epochs
            if stage == "abnormal" and not cfg.model.abnormal_branch:
                epochs = 0  # NORMAL-only ablation: nothing to train in stage 1
            params = stage_parameters(model, stage, cfg)
            optimizer = make_optimizer(model, params, cfg)
            step_at = max(1, int(round(cfg.train.lr_step_fraction * epochs)))
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_at, gamma=0.1)
            first_epoch = start_epoch if stage_index == start_stage else 0
            if opt_state is not None and stage_index == start_stage and first_epoch > 0:
                optimizer.load_state_dict(opt_state["optimizer"])
                scheduler.load_state_dict(opt_state["scheduler"])
            bar = tqdm(range(first_epoch, epochs), desc=f"stage {stage_index + 1}/2 ({stage})", unit="epoch")
            for epoch in bar:
                set_stage_mode(model, stage)
                losses = []
                for idx in _batches(n, cfg.train.batch_size, gen):
                    x = data.features[idx].to(self.device, torch.float32, non_blocking=True)
                    if stage == "abnormal":
                        loss = abnormal_step(model, x, cfg, data.feature_std, gen)
                    else:
                        loss = normal_step(model, x)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.train.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                    optimizer.step()
                    losses.append(float(loss.detach()))
                scheduler.step()
                record = {"stage": stage, "epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                          "lr_grid": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2)}
                history.append(record)
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                log.debug("%s", record)
                last = epoch + 1 == epochs
                if last or (cfg.train.checkpoint_every > 0 and (epoch + 1) % cfg.train.checkpoint_every == 0):
                    next_stage, next_epoch = (stage_index + 1, 0) if last else (stage_index, epoch + 1)
                    self._save_state(model, optimizer, scheduler, next_stage, next_epoch, gen, meta_base)
            log.info("stage %d (%s) done: final loss %s", stage_index + 1, stage,
                     history[-1]["loss"] if history else "n/a")
            opt_state = None
        model.eval()
        meta = {**meta_base, "train_seconds": round(time.perf_counter() - t0, 1),
                "feature_cache_hit": data.cache_hit, "final_losses": _final_losses(log_path)}
        atomic_torch_save(model_payload(cfg, model.cpu(), meta), self.model_path)
        log.info("model written to %s (%.1f s)", self.model_path, meta["train_seconds"])
        return self.model_path

    def _save_state(self, model: GRADModel, optimizer: torch.optim.Optimizer, scheduler: Any,
                    next_stage: int, next_epoch: int, gen: torch.Generator, meta: dict[str, Any]) -> None:
        payload = model_payload(self.cfg, model, meta)
        payload.update({
            "stage_index": next_stage,
            "next_epoch": next_epoch,
            # A checkpoint at a stage boundary starts the next stage with a fresh optimizer of other parameters.
            "optimizer": ({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                          if next_epoch > 0 else None),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        })
        atomic_torch_save(payload, self.state_path)


def _final_losses(log_path: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            last[rec["stage"]] = rec["loss"]
    return last


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train a GRAD model as configured; returns the final model file path."""
    return Trainer(cfg).run(resume=resume)
