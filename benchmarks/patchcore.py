"""PatchCore baseline on the same frozen extractor and the same map post-processing as GRAD.

Memory bank = locally aware patch features (3x3 average of the stride-8 features x) of all good training images,
reduced by greedy k-center coreset selection on a random projection (Roth et al., CVPR 2022). Patch score = distance
to the nearest memory-bank feature; the patch map then goes through GRAD's ``AnomalyHead.postprocess`` (bilinear
up-sampling, mean filter, max of the 32x32 mean-pooled map), so the two methods differ only in how they score
features.

    python -m gradad.benchmarks.patchcore --data ../shared/datasets/mtd -o benchmarks/results --name mtd_patchcore
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gradad.cli_utils import CLI_CONTEXT, setup_logging, user_errors_as_exit
from gradad.data.datasets import Sample, load_samples_from_roots
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import BackboneConfig, ModelConfig, preset_config
from gradad.training.features import FeatureCache, load_images, to_tensor
from gradad.training.model import AnomalyHead

log = logging.getLogger(__name__)


#: PatchCore's own map head: the head GRAD used before (21x21 mean filter, 32x32 score pool)
PATCHCORE_HEAD = ModelConfig(smoothing="mean", smoothing_size=21, score_pool=32)


@dataclass(frozen=True)
class PatchCoreConfig:
    """Coreset size and search settings."""

    coreset_ratio: float = 0.01  # fraction of all training patches kept (PatchCore: 1-10%)
    projection_dim: int = 128  # random projection used only for the coreset selection
    max_candidates: int = 200_000  # coreset is selected from a uniform subsample of at most this many patches
    neighbourhood: int = 3  # locally aware patch features: mean over this window
    seed: int = 0


def patch_features(x: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C) locally aware patch features."""
    x = F.avg_pool2d(x.float(), neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def greedy_coreset(points: torch.Tensor, n: int, projection_dim: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` points chosen by greedy k-center (farthest point) selection in a random projection."""
    gen = torch.Generator().manual_seed(seed)
    if n >= len(points):
        return torch.arange(len(points))
    proj = (torch.randn(points.shape[1], projection_dim, generator=gen) / projection_dim**0.5).to(points.device)
    z = points @ proj
    sq = z.pow(2).sum(1)

    def dist_to(i: int) -> torch.Tensor:  # |z|^2 - 2 z.c + |c|^2: one mat-vec, no (n, d) temporary
        return sq - 2.0 * (z @ z[i]) + sq[i]

    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(len(z), (1,), generator=gen))  # noqa: the generator lives on the CPU
    min_dist = dist_to(int(chosen[0]))
    for i in tqdm(range(1, n), desc="coreset", unit="pt", leave=False, disable=n < 500):
        chosen[i] = int(torch.argmax(min_dist))
        torch.minimum(min_dist, dist_to(int(chosen[i])), out=min_dist)
    return chosen


class PatchCore:
    """Fit on good-image features, score images by nearest-neighbour patch distance."""

    def __init__(self, cfg: PatchCoreConfig, head: AnomalyHead) -> None:
        self.cfg = cfg
        self.head = head
        self.bank: torch.Tensor | None = None

    def fit(self, features: torch.Tensor) -> "PatchCore":
        """Build the memory bank from training features (N, C, H, W)."""
        patches = patch_features(features, self.cfg.neighbourhood)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        if len(patches) > self.cfg.max_candidates:
            patches = patches[torch.randperm(len(patches), generator=gen)[: self.cfg.max_candidates]]
        n_keep = max(1, int(round(self.cfg.coreset_ratio * len(features) * features.shape[2] * features.shape[3])))
        self.bank = patches[greedy_coreset(patches, n_keep, self.cfg.projection_dim, self.cfg.seed)].contiguous()
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, 1, H_img, W_img)) for features (B, C, h, w)."""
        if self.bank is None:
            raise RuntimeError("PatchCore.predict before fit")
        b, _, h, w = features.shape
        patches = patch_features(features, self.cfg.neighbourhood)
        dists = torch.cat([torch.cdist(patches[i : i + chunk], self.bank).amin(dim=1)
                           for i in range(0, len(patches), chunk)])
        return self.head.postprocess(dists.view(b, 1, h, w))


class PatchCoreGraph(torch.nn.Module):
    """PatchCore as one exportable graph (extractor -> locally aware patches -> nearest bank row -> map head), for
    timing it on the same engine as GRAD (ONNX Runtime). The distance is |p|^2 - 2 p.b + |b|^2 (one matrix product,
    as an inference engine runs it), not ``torch.cdist``; it has ``head``, ``extractor`` and a (score, map)
    forward like a GRAD detector, so ``gradad.export.graph.ExportModule`` wraps it unchanged."""

    def __init__(self, extractor: FeatureExtractor, bank: torch.Tensor, head: AnomalyHead, neighbourhood: int) -> None:
        super().__init__()
        self.extractor, self.head, self.neighbourhood = extractor.eval(), head.eval(), neighbourhood
        self.register_buffer("bank_t", bank.t().contiguous())
        self.register_buffer("bank_sq", (bank * bank).sum(dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor(x)
        b, _, h, w = features.shape
        patches = patch_features(features, self.neighbourhood)
        sq = (patches * patches).sum(dim=1, keepdim=True) - 2.0 * patches @ self.bank_t + self.bank_sq
        dists = sq.amin(dim=1).clamp_min(0.0).sqrt()
        return self.head.postprocess(dists.view(b, 1, h, w))


def run_patchcore(data_roots: str | Sequence[str], classes: list[str] | None, cfg: PatchCoreConfig,
                  image_size: int = 256, cache_dir: str = "cache/features", model_cfg: ModelConfig | None = None,
                  test: Sequence[Sample] | None = None, backbone: BackboneConfig | None = None,
                  keep_predictions: bool = False) -> dict[str, Any]:
    """Unified protocol: one memory bank for all classes of every root; returns per-class metrics and timings.

    ``model_cfg`` sets the map head (default: PatchCore's own, the 21x21 mean filter and 32x32 score pool);
    ``test`` replaces the roots' test split (e.g. without a tuning split); ``backbone`` is the extractor (default:
    the edge preset's), which a comparison sets to the GRAD model's own so both rows see the same features;
    ``keep_predictions`` adds ``"predictions"`` = (scores, maps, masks) of the test images.
    """
    from gradad.evaluation.evaluate import evaluate_predictions

    roots = [data_roots] if isinstance(data_roots, (str, Path)) else list(data_roots)
    extractor = FeatureExtractor(backbone or preset_config("edge").backbone)
    device = torch.device("cpu")
    train = [s for s in load_samples_from_roots(roots, "train", classes) if s.label == 0]
    feats, _ = FeatureCache(cache_dir).load_or_compute(extractor, train, image_size, device)
    head = AnomalyHead(model_cfg or PATCHCORE_HEAD, (image_size, image_size))
    t0 = time.perf_counter()
    model = PatchCore(cfg, head).fit(torch.from_numpy(feats))
    fit_s = time.perf_counter() - t0
    test = list(test) if test is not None else load_samples_from_roots(roots, "test", classes)
    images, masks = load_images(test, image_size, desc="reading test images")
    scores, maps = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(0, len(test), 16), desc="patchcore", unit="batch"):
            x = extractor(to_tensor(images[i : i + 16], extractor.mean, extractor.std))
            s, m = model.predict(x)
            scores.append(s.numpy())
            maps.append(m[:, 0].numpy())
    predict_s = time.perf_counter() - t0
    scores, maps = np.concatenate(scores), np.concatenate(maps)
    metrics = evaluate_predictions(test, scores, maps, masks)
    extra = {"predictions": (scores, maps, masks)} if keep_predictions else {}
    return {**extra, "metrics": metrics, "fit_seconds": round(fit_s, 1), "seconds_per_image": round(predict_s / len(test), 4),
            "memory_bank": list(model.bank.shape), "config": asdict(cfg), "n_train": len(train),
            "backbone": {"name": extractor.spec.name, "out_indices": list(extractor.spec.out_indices),
                         "weights": extractor.weights_fingerprint, "mean": list(extractor.mean),
                         "std": list(extractor.std), "exposure": extractor.spec.exposure,
                         **({"exposure_max_gain": extractor.exposure_max_gain}
                            if extractor.exposure_max_gain is not None else {})}}


@click.command(context_settings=CLI_CONTEXT)
@click.option("--data", "data_root", required=True, type=click.Path())
@click.option("--classes", help="Comma-separated classes [default: all, one memory bank].")
@click.option("--coreset-ratio", type=float, default=0.01)
@click.option("--image-size", type=int, default=256)
@click.option("--backbone", default=None,
              help="timm name of the extractor [default: the edge preset's, tf_efficientnet_lite0]; packaged "
                   "weights: tf_efficientnet_lite0/1/2.")
@click.option("--cache-dir", default="cache/features", help="Feature cache shared with grad-train.")
@click.option("-o", "--output", "out_dir", default="benchmarks/results", type=click.Path(file_okay=False))
@click.option("--name", default="patchcore")
@user_errors_as_exit
def main(data_root, classes, coreset_ratio, image_size, backbone, cache_dir, out_dir, name) -> None:
    """Evaluate the PatchCore baseline (same extractor as GRAD's edge preset unless --backbone says otherwise).
    `grad-bench accuracy --patchcore` runs it on the compared GRAD model's own extractor and input size."""
    setup_logging()
    from gradad.evaluation.evaluate import write_evaluation
    from gradad.evaluation.report import markdown_table

    wanted = [c.strip() for c in classes.split(",")] if classes else None
    spec = BackboneConfig(name=backbone) if backbone else None
    result = run_patchcore(data_root, wanted, PatchCoreConfig(coreset_ratio=coreset_ratio), image_size, cache_dir,
                           backbone=spec)
    meta = {k: v for k, v in result.items() if k != "metrics"}
    meta.update({"method": f"PatchCore ({result['backbone']['name']} strides 8+16)", "data_root": data_root,
                 "image_size": image_size, "command": " ".join(["python -m gradad.benchmarks.patchcore",
                                                                 *sys.argv[1:]])})
    write_evaluation(out_dir, name, result["metrics"], meta)
    click.echo(markdown_table(result["metrics"]))


if __name__ == "__main__":
    main()
