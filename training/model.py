"""The GRAD model (DESIGN.md section 2): coordinate mappers, normal and abnormal continuous grids, fusion CNNs,
pair similarity of the abnormal branch, similarity refinement and the anomaly-map/score head.

``GRADModel`` works on extractor features x (B, C, H, W); ``GRADDetector`` wraps extractor + model + head and
maps normalised images to (score, anomaly_map), which is the graph that gets exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradad.training.config import ModelConfig
from gradad.training.image_gaussian import ImageGaussian


class CoordinateMapper(nn.Module):
    """g = tanh(L(tanh(L(avgpool x)))) per image, u = tanh(c1(tanh(c1(x)))) per position; both in [-1, 1]^2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.global_net = nn.Sequential(nn.Linear(channels, channels), nn.Tanh(), nn.Linear(channels, 2), nn.Tanh())
        self.local_net = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.Tanh(), nn.Conv2d(channels, 2, 1), nn.Tanh()
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return global coordinates (B, 1, 1, 2) and local coordinates (B, H, W, 2) in grid_sample layout."""
        g = self.global_net(x.mean(dim=(2, 3)))
        u = self.local_net(x).permute(0, 2, 3, 1)
        return g[:, None, None, :], u


class BiGridMemory(nn.Module):
    """One local + global grid pair (continuous memory) sampled with bilinear grid_sample, zero padding."""

    def __init__(self, channels: int, feat_hw: tuple[int, int], local_size: int, global_size: int,
                 global_span: str = "tanh") -> None:
        super().__init__()
        h, w = feat_hw
        self.channels, self.feat_hw = channels, (h, w)
        # ModelConfig.global_coord_span: "cells" keeps g between the outer cell centres (no fade into the padding)
        self.global_scale = (global_size - 1) / global_size if global_span == "cells" else 1.0
        self.local_grid = nn.Parameter(torch.empty(1, channels, local_size, local_size))
        self.global_grid = nn.Parameter(torch.empty(1, channels * h * w, global_size, global_size))
        nn.init.xavier_normal_(self.local_grid)
        nn.init.xavier_normal_(self.global_grid)

    def forward(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Query q = concat(global sample, local sample) -> (B, 2C, H, W).

        All images sample the single (batch-1) local grid in one grid_sample call (their points laid side by side),
        so the grids are never copied per image; the global grid is read through :func:`bilinear_weights`.
        """
        b, h, w, _ = u.shape
        local = F.grid_sample(
            self.local_grid, u.reshape(1, b * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (1, C, B*H, W)
        local = local.reshape(self.channels, b, h, w).transpose(0, 1)
        points = g.reshape(b, 2) * self.global_scale if self.global_scale != 1.0 else g.reshape(b, 2)
        glob = bilinear_weights(points, self.global_grid.shape[-2:]) @ self.global_grid.flatten(2)[0].T
        return torch.cat([glob.reshape(b, self.channels, h, w), local], dim=1)


def bilinear_weights(points: torch.Tensor, grid_hw: torch.Size | tuple[int, int]) -> torch.Tensor:
    """(B, 2) points in [-1, 1] (x, y) -> (B, R_h*R_w) weights of every grid cell for bilinear sampling.

    Exactly grid_sample's bilinear interpolation with zero padding and align_corners=False, written as the tent
    kernel max(0, 1 - |distance|) per axis. The global grid holds C*H*W channels at only R_g^2 cells, and
    grid_sample's kernels loop over channels per sample point (on CUDA one thread walks all 155k channels: ~115 ms
    per call on an H100); as weights @ cells it is one small matrix product, on every backend.
    """
    rh, rw = int(grid_hw[0]), int(grid_hw[1])
    x = ((points[:, :1] + 1.0) * rw - 1.0) / 2.0  # pixel coordinates, align_corners=False
    y = ((points[:, 1:] + 1.0) * rh - 1.0) / 2.0
    cols = torch.arange(rw, dtype=points.dtype, device=points.device).view(1, rw)
    rows = torch.arange(rh, dtype=points.dtype, device=points.device).view(1, rh)
    wx = (1.0 - (x - cols).abs()).clamp_min(0.0)  # (B, R_w)
    wy = (1.0 - (y - rows).abs()).clamp_min(0.0)  # (B, R_h)
    return (wy[:, :, None] * wx[:, None, :]).reshape(points.shape[0], rh * rw)


class InvertedResidual(nn.Module):
    """MobileNetV3-style block: 1x1 expand, 3x3 depthwise, 1x1 project, BN, hard-swish, identity skip."""

    def __init__(self, channels: int, expand: float) -> None:
        super().__init__()
        hidden = max(8, int(round(channels * expand)))
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class BasicBlock(nn.Module):
    """ResNet BasicBlock (two 3x3 convs) as in the paper's fusion CNN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def fusion_cnn(channels: int, cfg: ModelConfig) -> nn.Sequential:
    """Residual blocks on 2C channels followed by a 1x1 projection 2C -> C."""
    wide = 2 * channels
    if cfg.fusion_block == "inverted_residual":
        blocks: list[nn.Module] = [InvertedResidual(wide, cfg.fusion_expand) for _ in range(cfg.fusion_depth)]
    else:
        blocks = [BasicBlock(wide) for _ in range(cfg.fusion_depth)]
    return nn.Sequential(*blocks, nn.Conv2d(wide, channels, 1))


def standardize_per_channel(q: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero-mean, unit-std per (image, channel) over the spatial positions."""
    mean = q.mean(dim=(2, 3), keepdim=True)
    std = q.var(dim=(2, 3), keepdim=True, unbiased=False).add(eps).sqrt()
    return (q - mean) / std


def similarity_refine(x_hat: torch.Tensor, x: torch.Tensor, cfg: ModelConfig,
                      mask_weight: float | None = None) -> torch.Tensor:
    """x_ref = S*x + (1-S)*x_hat with S = a*M + b*cos(x_hat, x), M = [scale*mean_c (x_hat-x)^2 < thr]; a is
    ``mask_weight`` (default: the loss's ``cfg.refine_mask_weight``)."""
    a = cfg.refine_mask_weight if mask_weight is None else mask_weight
    s = cfg.refine_cos_weight * F.cosine_similarity(x_hat, x, dim=1, eps=1e-8).unsqueeze(1)
    if a:  # the hard mask is left out of the graph when its weight is 0 (the map's default)
        m = (x_hat - x).pow(2).mean(dim=1, keepdim=True)
        s = s + a * (cfg.refine_m_scale * m < cfg.refine_m_threshold).to(x.dtype)
    return s * x + (1.0 - s) * x_hat


@dataclass
class GRADOutput:
    """Everything one forward pass produces (training needs the intermediate tensors)."""

    x_hat: torch.Tensor  # fused reconstruction (feature-space fusion forms) or x_hat_normal ("map" form)
    x_hat_normal: torch.Tensor
    x_hat_abnormal: torch.Tensor
    x_ref: torch.Tensor  # after the map's similarity refinement (stage 2's loss refines x_hat with its own mask)
    abnormal_score: torch.Tensor  # (B, 1, H, W) stage-1 score: pair similarity or channel 0 (zeros if no branch)


def pair_similarity(x_hat_a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d = cos(x_hat_a, x) per position (GRAD Eq. 4): high where x looks like the abnormal memory. (B, 1, H, W)."""
    return F.cosine_similarity(x_hat_a, x, dim=1, eps=1e-6).unsqueeze(1)


# Parameterless wrappers of the model's own arithmetic. They hold no weights (checkpoints and numerics are
# unchanged); they exist so the exported graph names these ops by scope (``/model/refine/``, ...), which the
# reduced-precision rule of ``gradad.export.precision`` keeps in FP32 (FP16 ONNX, INT8 QDQ, TensorRT pins).


class ChannelStandardize(nn.Module):
    """:func:`standardize_per_channel` as a named module (the abnormal query's standardisation)."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return standardize_per_channel(q)


class SimilarityRefinement(nn.Module):
    """:func:`similarity_refine` of the anomaly map (mask weight ``cfg.map_refine_mask_weight``) as a named
    module (its cosine, and its hard mask where enabled)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return similarity_refine(x_hat, x, self.cfg, self.cfg.map_refine_mask_weight)


class PairSimilarity(nn.Module):
    """:func:`pair_similarity` as a named module."""

    def forward(self, x_hat_a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pair_similarity(x_hat_a, x)


def residual_scale_maps(x_ref: torch.Tensor, x: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """||avgpool_k(x_ref - x)||_2 over channels (B, 1, h, w) for every scale k (1 = the plain map).

    Averaging the residual vectors over k x k cells cancels the cell-to-cell noise of good data, so a large faint
    defect whose residuals point the same way stands out at a coarse scale while it is lost in the noise at scale 1.
    """
    residual = x_ref - x
    maps = []
    for k in scales:
        r = residual if k == 1 else F.avg_pool2d(residual, k, stride=1, padding=k // 2, count_include_pad=False)
        maps.append(r.pow(2).sum(dim=1, keepdim=True).sqrt())
    return maps


class MapFusion(nn.Module):
    """Feature-resolution map: max over scales of gain_k*||avgpool_k(x_ref - x)|| (+ w*relu(d) in the "map"
    fusion form) as a named module."""

    def __init__(self, scales: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.scales = tuple(scales)

    def forward(self, x_ref: torch.Tensor, x: torch.Tensor, abnormal_score: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, gains: torch.Tensor | None = None) -> torch.Tensor:
        if self.scales == (1,):
            amap = AnomalyHead.lowres_map(x_ref, x)
        else:
            maps = residual_scale_maps(x_ref, x, self.scales)
            amap = torch.stack([m * gains[i] for i, m in enumerate(maps)]).amax(dim=0)
        if abnormal_score is not None:
            amap = amap + weight * F.relu(abnormal_score)
        return amap


class GRADModel(nn.Module):
    """Bi-grid reconstruction of extractor features x (B, C, H, W)."""

    def __init__(self, channels: int, feat_hw: tuple[int, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.channels, self.feat_hw = channels, tuple(feat_hw)
        self.mapper = CoordinateMapper(channels)
        self.normal_grid = BiGridMemory(channels, self.feat_hw, cfg.local_grid_size, cfg.global_grid_size,
                                        cfg.global_coord_span)
        self.normal_cnn = fusion_cnn(channels, cfg)
        if cfg.abnormal_branch:
            if cfg.abnormal_mapper == "separate":
                self.abnormal_mapper = CoordinateMapper(channels)
            self.abnormal_grid = BiGridMemory(channels, self.feat_hw, cfg.local_grid_size, cfg.global_grid_size,
                                              cfg.global_coord_span)
            self.abnormal_cnn = fusion_cnn(channels, cfg)
        self.fusion_weight = nn.Parameter(torch.tensor(float(cfg.fusion_weight_init)))
        # Named scopes of the model's own arithmetic (no weights): see MapFusion.
        self.standardize = ChannelStandardize()
        self.pair_similarity = PairSimilarity()
        self.refine = SimilarityRefinement(cfg)
        self.map_fusion = MapFusion(cfg.map_scales)
        # gain_k of every map scale (see ModelConfig.map_scales); ones until fit_map_scale_gains after stage 2
        self.register_buffer("map_scale_gain", torch.ones(len(cfg.map_scales)))
        # image-level Gaussian added to the image score (fitted after stage 3; see training/image_gaussian.py)
        self.image_gaussian = ImageGaussian(cfg.image_gaussian_stats) if cfg.image_gaussian else None

    @property
    def separate_mapper(self) -> bool:
        return self.cfg.abnormal_branch and self.cfg.abnormal_mapper == "separate"

    def _jitter(self, u: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.jitter_prob > 0 and torch.rand(()) < self.cfg.jitter_prob:
            u = u + torch.randn_like(u) * self.cfg.jitter_std
        return u

    def coordinates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal-branch global and local coordinates, with training-time jitter on the local ones."""
        g, u = self.mapper(x)
        return g, self._jitter(u)

    def abnormal_coordinates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The abnormal branch's coordinates: its own mapper, or the shared one."""
        if not self.separate_mapper:
            return self.coordinates(x)
        g, u = self.abnormal_mapper(x)
        return g, self._jitter(u)

    def abnormal_branch(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x_hat_a: abnormal grids -> per-channel standardised query -> abnormal CNN."""
        return self.abnormal_cnn(self.standardize(self.abnormal_grid(g, u)))

    def abnormal_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat_a, stage-1 score (B, 1, H, W)) of features x."""
        x_hat_a = self.abnormal_branch(*self.abnormal_coordinates(x))
        if self.cfg.abnormal_score == "pair_similarity":
            return x_hat_a, self.pair_similarity(x_hat_a, x)
        return x_hat_a, x_hat_a[:, :1]

    def fuse(self, x_hat_n: torch.Tensor, x_hat_a: torch.Tensor) -> torch.Tensor:
        """Feature-space fusion: x_n + w*x_a (additive), lam*x_n + (1-lam)*x_a (lambda), x_n ("map" form)."""
        if self.cfg.fusion_form == "lambda":
            return self.fusion_weight * x_hat_n + (1.0 - self.fusion_weight) * x_hat_a
        if self.cfg.fusion_form == "additive":
            return x_hat_n + self.fusion_weight * x_hat_a
        return x_hat_n

    def normal_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat_n: normal mapper -> normal grids -> normal CNN."""
        g, u = self.coordinates(x)
        return self.normal_cnn(self.normal_grid(g, u))

    def normal_refined(self, x: torch.Tensor, for_loss: bool = False) -> torch.Tensor | None:
        """The map's x_ref (``for_loss``: stage 2's, with the loss's hard-mask weight) from the normal branch
        alone, or None when the fusion form mixes x_hat_a into the features.

        In the "map" form (and NORMAL-only) stage 2 needs nothing else, so it neither runs the abnormal branch nor
        draws its random numbers: the normal branch trains exactly as in a NORMAL-only run with the same seed.
        """
        if self.cfg.abnormal_branch and self.cfg.fusion_form != "map":
            return None
        x_hat = self.normal_reconstruction(x)
        return similarity_refine(x_hat, x, self.cfg) if for_loss else self.refine(x_hat, x)

    def forward(self, x: torch.Tensor) -> GRADOutput:
        x_hat_n = self.normal_reconstruction(x)
        if self.cfg.abnormal_branch:
            x_hat_a, score = self.abnormal_forward(x)
            x_hat = self.fuse(x_hat_n, x_hat_a)
        else:  # NORMAL-only ablation
            x_hat_a, x_hat = torch.zeros_like(x_hat_n), x_hat_n
            score = x_hat_n.new_zeros(x_hat_n.shape[0], 1, *x_hat_n.shape[2:])
        return GRADOutput(x_hat, x_hat_n, x_hat_a, self.refine(x_hat, x), score)

    def residual_map(self, x_ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The normal-branch map (B, 1, h, w): max over map scales of gain_k * ||avgpool_k(x_ref - x)||."""
        return self.map_fusion(x_ref, x, gains=self.map_scale_gain)

    def lowres_map(self, out: GRADOutput, x: torch.Tensor) -> torch.Tensor:
        """Feature-resolution anomaly map (B, 1, h, w): :meth:`residual_map`, plus w*relu(d) in the "map" fusion
        form.

        relu keeps the abnormal branch out of cells it calls normal (d < 0), so it can only raise the map where
        the branch recognises an anomaly; w is fitted on anomalies (stage 3) and is 0 until then.
        """
        if self.cfg.abnormal_branch and self.cfg.fusion_form == "map":
            return self.map_fusion(out.x_ref, x, out.abnormal_score, self.fusion_weight, self.map_scale_gain)
        return self.map_fusion(out.x_ref, x, gains=self.map_scale_gain)

    def abnormal_parameters(self) -> list[nn.Parameter]:
        """Stage-1 parameters: abnormal grids and CNN, and the abnormal mapper when separate."""
        if not self.cfg.abnormal_branch:
            return []
        mapper = list(self.abnormal_mapper.parameters()) if self.separate_mapper else []
        return [*mapper, *self.abnormal_grid.parameters(), *self.abnormal_cnn.parameters()]

    def normal_parameters(self) -> list[nn.Parameter]:
        """Stage-2 parameters (without the normal mapper); the fusion weight trains here in feature-space forms."""
        params = [*self.normal_grid.parameters(), *self.normal_cnn.parameters()]
        return params + ([self.fusion_weight] if self.cfg.fusion_form != "map" else [])


def _box_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Separable 'same' mean filter that averages only valid pixels at the borders."""
    pad = size // 2
    x = F.avg_pool2d(x, (1, size), stride=1, padding=(0, pad), count_include_pad=False)
    return F.avg_pool2d(x, (size, 1), stride=1, padding=(pad, 0), count_include_pad=False)


def _gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(4 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


class AnomalyHead(nn.Module):
    """map = ||x_ref - x||_2 over channels -> bilinear up-sample -> smoothing; score = max of pooled map."""

    def __init__(self, cfg: ModelConfig, image_hw: tuple[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_hw = tuple(image_hw)

    def forward(self, x_ref: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.postprocess(self.lowres_map(x_ref, x))

    @property
    def score_pool(self) -> int:
        """Side of the mean pool whose maximum is the image score (the configured pool, at most the image)."""
        return min(self.cfg.score_pool, *self.image_hw)

    @staticmethod
    def lowres_map(x_ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Feature-resolution map (B, 1, h, w) = ||x_ref - x||_2 over channels."""
        return (x_ref - x).pow(2).sum(dim=1, keepdim=True).sqrt()

    def postprocess(self, amap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature-resolution map (B, 1, h, w) -> (score (B,), smoothed map (B, 1, H, W)); shared with baselines."""
        amap = F.interpolate(amap, size=self.image_hw, mode="bilinear", align_corners=False)
        if self.cfg.smoothing == "mean":
            amap = _box_filter(amap, self.cfg.smoothing_size)
        elif self.cfg.smoothing == "gaussian":
            amap = _gaussian_filter(amap, self.cfg.smoothing_sigma)
        score = F.avg_pool2d(amap, self.score_pool, stride=1).amax(dim=(1, 2, 3))
        return score, amap


class GRADDetector(nn.Module):
    """Normalised image (B, 3, H, W) -> (score (B,), anomaly_map (B, 1, H, W)); eval-mode graph for export."""

    def __init__(self, extractor: nn.Module, model: GRADModel, image_hw: tuple[int, int]) -> None:
        super().__init__()
        self.extractor = extractor
        self.model = model
        self.head = AnomalyHead(model.cfg, image_hw)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_features(self.extractor(images))

    def from_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as forward, starting at cached features."""
        score, amap = self.head.postprocess(self.model.lowres_map(self.model(x), x))
        if self.model.image_gaussian is not None:
            score = self.model.image_gaussian(x, score)
        return score, amap

    def lowres_map(self, images: torch.Tensor) -> torch.Tensor:
        """The map before up-sampling and smoothing (B, 1, h, w); ``head.postprocess`` of it equals forward's map."""
        x = self.extractor(images)
        return self.model.lowres_map(self.model(x), x)
