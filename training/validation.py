"""Validation on held-out good training images only: model selection, the stage-1 self-check and the stage-3
fit of the fusion weight. Test images are never read here.

Every check compares clean validation features with the same features carrying synthetic anomalies (fixed seed,
so epochs are compared on identical data). The self-check reports the abnormal score's cell AUROC per anomaly
kind, marking the kinds stage 1 did *not* train on: the honest measure of whether it learned "anomalous" or only
"looks like FBP".
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gradad.data.datasets import Sample
from gradad.evaluation.metrics import auroc
from gradad.training.config import FBPConfig
from gradad.training.defects import DefectSet
from gradad.training.fbp import KINDS, synthesize_anomalies
from gradad.training.model import AnomalyHead, GRADModel, residual_scale_maps

log = logging.getLogger(__name__)

VALIDATION_SEED = 1234
#: candidate fusion weights, in units of the median normal-branch map value on clean validation images
FUSION_WEIGHT_GRID = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def validation_indices(samples: Sequence[Sample], fraction: float) -> np.ndarray:
    """Indices of every round(1/fraction)-th good image of each class (sorted order); empty when fraction is 0."""
    if fraction <= 0:
        return np.zeros(0, dtype=int)
    step = max(2, int(round(1.0 / fraction)))
    seen: dict[str, int] = {}
    picked = []
    for i, s in enumerate(samples):
        k = seen.get(s.class_name, 0)
        seen[s.class_name] = k + 1
        if k % step == step // 2:  # not the first of a class, so tiny classes keep their first images for training
            picked.append(i)
    return np.asarray(picked, dtype=int)


@dataclass
class ValidationSet:
    """Clean validation features and, per anomaly kind, the same features with synthetic anomalies."""

    clean: torch.Tensor
    anomalous: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # kind -> (x, mask)
    trained_kinds: tuple[str, ...] = ()
    # class name of every image: "clean" and each kind -> one name per image (empty: a single class). A unified
    # model's detection is scored class by class and averaged, as the benchmark does: pooled, one class's
    # clean images would be ranked against another's defects on a scale the two need not share.
    classes: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, features: torch.Tensor, fbp: FBPConfig, channel_std: torch.Tensor,
              defects: DefectSet | None = None, defects_trained: bool = True,
              clean_classes: Sequence[str] | None = None) -> "ValidationSet":
        """Synthesize every kind once with a fixed seed; real defects (when given) are the kind ``"real"``,
        marked trained unless they were held out of stage 1 (``defects_trained=False``). ``clean_classes`` names
        the class of every clean image (synthetic kinds inherit them; real defects carry their own)."""
        gen = torch.Generator().manual_seed(VALIDATION_SEED)
        clean = features.float()
        trained_real = ("real",) if defects is not None and defects_trained else ()
        out = cls(clean, trained_kinds=tuple(fbp.kinds) + trained_real)
        for kind in KINDS:
            out.anomalous[kind] = synthesize_anomalies(clean, fbp, channel_std, gen, kinds=(kind,))
        if defects is not None:
            out.anomalous["real"] = (defects.features.float(), defects.masks.float())
        if clean_classes is not None:
            if len(clean_classes) != len(clean):
                raise ValueError(f"{len(clean_classes)} class names for {len(clean)} validation images")
            out.classes = {"clean": list(clean_classes), **{kind: list(clean_classes) for kind in KINDS}}
            if defects is not None:
                out.classes["real"] = [s.class_name for s in defects.samples]
                known, labelled = set(clean_classes), set(out.classes["real"])
                if labelled - known:
                    log.warning("labelled defects of no validation class (%s) are ranked against every class's "
                                "good images", ", ".join(sorted(labelled - known)))
                if known - labelled:
                    log.warning("no labelled defects of class %s: scores on real defects (the fusion fit) do not "
                                "see that class", ", ".join(sorted(known - labelled)))
        return out

    def to(self, device: torch.device) -> "ValidationSet":
        moved = {k: (x.to(device), m.to(device)) for k, (x, m) in self.anomalous.items()}
        return ValidationSet(self.clean.to(device), moved, self.trained_kinds, self.classes)

    def class_groups(self, kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(clean indices, ``kind`` indices) per class of the ``kind`` images: the clean images of that class, or
        every clean image for images of no known class (defects from a folder that does not name one); one group
        of everything when the set has no class names."""
        n_clean, n_kind = len(self.clean), len(self.anomalous[kind][0])
        if not self.classes:
            return [(np.arange(n_clean), np.arange(n_kind))]
        clean, anomalous = np.asarray(self.classes["clean"]), np.asarray(self.classes[kind])
        known = set(clean.tolist())
        return [(np.flatnonzero(clean == c) if c in known else np.arange(n_clean), np.flatnonzero(anomalous == c))
                for c in sorted(set(anomalous.tolist()))]


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for the block, then the mode the module had (validation runs between training epochs)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def _maps(model: GRADModel, x: torch.Tensor, batch: int = 64, normal: bool = True,
          abnormal: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(normal map (:meth:`GRADModel.residual_map`), relu of the abnormal score) at feature resolution, on the
    CPU; a branch that is not asked for is not run (None)."""
    normal_maps, abnormal_maps = [], []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        if not normal:
            abnormal_maps.append(F.relu(model.abnormal_forward(xb)[1]).cpu())
            continue
        x_ref = None if abnormal else model.normal_refined(xb)
        if x_ref is None:  # both branches wanted, or a feature-space fusion form mixes them
            out = model(xb)
            x_ref = out.x_ref
            if abnormal:
                abnormal_maps.append(F.relu(out.abnormal_score).cpu())
        normal_maps.append(model.residual_map(x_ref, xb).cpu())
    return (torch.cat(normal_maps) if normal else None), (torch.cat(abnormal_maps) if abnormal else None)


def _cell_auroc(mask: torch.Tensor, score: torch.Tensor) -> float:
    labels = mask.reshape(-1).numpy() > 0
    return float(auroc(labels.astype(int), score.reshape(-1).numpy())) if 0 < labels.sum() < labels.size else float("nan")


def _image_auroc(clean_scores: torch.Tensor, anomalous_scores: torch.Tensor) -> float:
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(anomalous_scores))]
    return float(auroc(labels, np.r_[clean_scores.numpy(), anomalous_scores.numpy()]))


def selfcheck(model: GRADModel, val: ValidationSet) -> dict[str, dict[str, float | bool]]:
    """Cell AUROC of the abnormal score per anomaly kind on validation images; ``trained`` marks the kinds stage 1
    saw. The number that matters is the AUROC on the kinds it did not see. Runs the abnormal branch only."""
    result: dict[str, dict[str, float | bool]] = {}
    with evaluating(model):
        for kind, (x, mask) in val.anomalous.items():
            _, d = _maps(model, x, normal=False)
            result[kind] = {"abnormal_auroc": round(_cell_auroc(mask.cpu(), d), 4),
                            "trained": kind in val.trained_kinds}
    return result


def heldout_auroc(check: dict[str, dict[str, float | bool]]) -> float:
    """Mean abnormal-score AUROC over the kinds stage 1 did not train on (nan when it trained on all)."""
    values = [float(v["abnormal_auroc"]) for v in check.values() if not v["trained"]]
    return float(np.nanmean(values)) if values else float("nan")


def _all_maps(model: GRADModel, val: ValidationSet, kinds: Sequence[str],
              abnormal: bool = True) -> dict[str, tuple[torch.Tensor, ...]]:
    """Normal map and relu(d) (zeros without ``abnormal``) of the clean images and of every requested kind."""

    def maps_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, d = _maps(model, x, abnormal=abnormal)
        return e, (d if d is not None else torch.zeros_like(e))

    with evaluating(model):
        maps: dict[str, tuple[torch.Tensor, ...]] = {"clean": maps_of(val.clean)}
        for kind in kinds:
            x, mask = val.anomalous[kind]
            maps[kind] = (*maps_of(x), mask.cpu())
    return maps


def _detection(maps: dict[str, tuple[torch.Tensor, ...]], head: AnomalyHead, weight: float,
               val: ValidationSet) -> float:
    """Mean over kinds of the mean over classes of (image AUROC + cell AUROC) / 2."""
    e_clean, d_clean = maps["clean"]
    scale = float(e_clean.median())
    clean_scores, _ = head.postprocess(e_clean + weight * scale * d_clean)
    values = []
    for kind, (e, d, mask) in ((k, v) for k, v in maps.items() if k != "clean"):
        fused = e + weight * scale * d
        scores, _ = head.postprocess(fused)
        per_class = []
        for clean_idx, idx in val.class_groups(kind):
            image = _image_auroc(clean_scores[clean_idx], scores[idx])
            per_class.append(np.nanmean([image, _cell_auroc(mask[idx], fused[idx])]))
        values.append(np.nanmean(per_class))
    return float(np.nanmean(values))


def detection_score(model: GRADModel, val: ValidationSet, head: AnomalyHead, weight: float = 0.0,
                    kinds: Sequence[str] | None = None) -> float:
    """Mean over kinds of (image AUROC clean vs anomalous + cell AUROC) / 2 of map = normal + weight * relu(d),
    class by class (clean images of a class against that class's anomalies) and averaged over classes.

    ``weight`` is in units of the median normal map on clean images. Used for model selection (weight 0 in
    stage 2: the normal branch alone) and for the stage-3 fusion fit.
    """
    maps = _all_maps(model, val, list(kinds or val.anomalous), abnormal=weight != 0)
    return _detection(maps, head, weight, val)


def fit_fusion_weight(model: GRADModel, val: ValidationSet, head: AnomalyHead,
                      grid: Sequence[float] = FUSION_WEIGHT_GRID,
                      kinds: Sequence[str] | None = None) -> tuple[float, dict[str, float]]:
    """Stage 3: the fusion weight w (absolute units) that best separates validation anomalies (of ``kinds``) from
    clean validation images; ties go to the smaller weight. Default kinds: held-out real defects when there are
    any (synthetic kinds stage 1 never saw say little about real ones), else the synthetic kinds stage 1 never
    saw, else all. Returns (w, {relative weight: score})."""
    if not kinds:
        unseen = [k for k in val.anomalous if k not in val.trained_kinds]
        kinds = ["real"] if "real" in unseen else (unseen or list(val.anomalous))
    maps = _all_maps(model, val, kinds)
    scale = float(maps["clean"][0].median())
    table = {f"{g:g}": round(_detection(maps, head, g, val), 4) for g in grid}
    best = max(grid, key=lambda g: (table[f"{g:g}"], -g))
    return best * scale, table


@torch.no_grad()
def fit_map_scale_gains(model: GRADModel, features: torch.Tensor, max_images: int = 256,
                        batch: int = 32) -> list[float]:
    """Set gain_k = mean plain map / mean scale-k map over good training images (at most ``max_images``, evenly
    spaced), so every scale of the residual map is in the units of the plain one; returns the gains."""
    scales = model.cfg.map_scales
    device = model.map_scale_gain.device
    idx = np.linspace(0, len(features) - 1, min(max_images, len(features))).round().astype(int)
    sums = torch.zeros(len(scales), dtype=torch.float64)
    with evaluating(model):
        for i in range(0, len(idx), batch):
            x = features[idx[i : i + batch]].to(device, torch.float32)
            x_ref = model.normal_refined(x)
            x_ref = model(x).x_ref if x_ref is None else x_ref
            sums += torch.stack([m.double().mean().cpu() for m in residual_scale_maps(x_ref, x, scales)])
    if not float(sums[0]) > 0:  # a perfect reconstruction of every image: nothing to scale, keep the plain map
        return [round(float(g), 6) for g in model.map_scale_gain.fill_(1.0)]
    gains = (sums[0] / sums.clamp_min(1e-12)).float()
    model.map_scale_gain.copy_(gains.to(device))
    return [round(float(g), 6) for g in gains]
