"""Feature Block Paste (DESIGN.md section 2): synthetic anomalies painted in feature space for stage 1.

A block's shape is a random walk (the paper's N in [B, 2B] eight-neighbour steps, or the public code's 100
four-neighbour steps) inside a (2B+1)^2 window. What is written into the block is one of several *kinds*, mixed
per block by ``FBPConfig.kinds`` / ``kind_weights``:

- ``constant``  — the same positive value on every channel in units of the global feature sigma (the original
  FBP; a trivial task for this backbone, kept for ablations and as a held-out check);
- ``scaled``    — every channel moves by its own sigma times I with a random sign per channel;
- ``direction`` — a random unit direction in channel space, scaled per channel by sigma_c, length I*sqrt(C);
- ``paste``     — the features of another training image at another position, blended in (foreign texture);
- ``noise``     — i.i.d. Gaussian noise per cell and channel of sigma_c * I / 2 (held-out kind for self-checks).

The blend weight of each cell is the binary walk mask blurred with a 3x3 Gaussian, so block borders are soft; the
returned mask is the un-blurred binary one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradad.errors import ConfigError
from gradad.training.config import FBP_KINDS, FBPConfig

_FOUR_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))
KINDS = FBP_KINDS  # one list: the config checks fbp.kinds against it


def _walk_cells(block: int, cfg: FBPConfig, gen: torch.Generator) -> list[tuple[int, int]]:
    """Cells (dy, dx) relative to the centre visited by a random walk confined to the (2B+1)^2 window."""
    cy = cx = 0
    cells = {(0, 0)}
    if cfg.walk == "paper":
        steps = int(torch.randint(block, 2 * block + 1, (1,), generator=gen))
        for _ in range(steps):
            dy, dx = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
            cy, cx = max(-block, min(block, cy + dy)), max(-block, min(block, cx + dx))
            cells.add((cy, cx))
    else:
        moves = torch.randint(0, 4, (cfg.public_steps,), generator=gen).tolist()
        for m in moves:
            dy, dx = _FOUR_NEIGHBOURS[m]
            cy, cx = max(-block, min(block, cy + dy)), max(-block, min(block, cx + dx))
            cells.add((cy, cx))
    return sorted(cells)


def gaussian_kernel3(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 3x3 Gaussian kernel."""
    t = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)
    k1 = torch.exp(-(t**2) / (2 * sigma**2))
    k = torch.outer(k1, k1)
    return k / k.sum()


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return maps
    return F.conv2d(maps, gaussian_kernel3(sigma, maps.dtype).to(maps.device).view(1, 1, 3, 3), padding=1)


def _block_mask(h: int, w: int, cfg: FBPConfig, gen: torch.Generator) -> torch.Tensor:
    """One walk block (h, w) binary mask at a random centre where the whole window fits."""
    max_block = max(1, min(cfg.max_block, (min(h, w) - 1) // 2))
    block = int(torch.randint(1, max_block + 1, (1,), generator=gen))
    cy = int(torch.randint(block, h - block, (1,), generator=gen))
    cx = int(torch.randint(block, w - block, (1,), generator=gen))
    mask = torch.zeros(h, w)
    for dy, dx in _walk_cells(block, cfg, gen):
        mask[cy + dy, cx + dx] = 1.0
    return mask


def sample_fbp_masks(
    batch: int, feat_hw: tuple[int, int], cfg: FBPConfig, feature_std: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one block per image with the ``constant`` kind (the original FBP).

    Returns (paint, mask): paint (B, 1, H, W) is intensity on the marked cells, Gaussian-blurred (3x3, sigma);
    mask (B, 1, H, W) is the un-blurred binary mask of the marked cells (all zero for skipped images).
    """
    h, w = feat_hw
    mask = torch.zeros(batch, 1, h, w)
    paint = torch.zeros(batch, 1, h, w)
    lo, hi = cfg.intensity_std_range
    for i in range(batch):
        if cfg.probability < 1.0 and float(torch.rand((), generator=gen)) >= cfg.probability:
            continue
        mask[i, 0] = _block_mask(h, w, cfg, gen)
        intensity = (lo + (hi - lo) * float(torch.rand((), generator=gen))) * feature_std
        paint[i] = mask[i] * intensity
    return _blur(paint, cfg.blur_sigma), mask


def _kind_probabilities(cfg: FBPConfig) -> torch.Tensor:
    weights = cfg.kind_weights or [1.0] * len(cfg.kinds)
    if len(weights) != len(cfg.kinds):  # a shorter list would silently never draw the last kinds
        raise ConfigError(f"setting fbp.kind_weights = {list(weights)!r}: needs one weight per kind of fbp.kinds "
                          f"{list(cfg.kinds)!r}")
    p = torch.tensor(weights, dtype=torch.float64)
    return p / p.sum()


def _anomaly_values(kind: str, x: torch.Tensor, i: int, intensity: float, channel_std: torch.Tensor,
                    gen: torch.Generator) -> torch.Tensor:
    """The (C, H, W) feature map a block of ``kind`` blends into image ``i`` of x (cells outside are ignored)."""
    c, h, w = x.shape[1:]
    sigma = channel_std.view(c, 1, 1)
    if kind == "constant":
        global_sigma = float(channel_std.pow(2).mean().sqrt())
        return x[i] + intensity * global_sigma
    if kind == "scaled":
        signs = torch.randint(0, 2, (c,), generator=gen).to(x) * 2 - 1
        return x[i] + intensity * sigma * signs.view(c, 1, 1)
    if kind == "direction":
        z = torch.randn(c, generator=gen).to(x)
        z = z / z.norm().clamp_min(1e-8) * c**0.5
        return x[i] + intensity * sigma * z.view(c, 1, 1)
    if kind == "noise":
        return x[i] + 0.5 * intensity * sigma * torch.randn(c, h, w, generator=gen).to(x)
    if kind == "paste":
        # Another image (itself when the batch has one) rolled so that a different position lands here.
        j = (i + 1 + int(torch.randint(0, max(1, x.shape[0] - 1), (1,), generator=gen))) % x.shape[0]
        sy, sx = (int(v) for v in torch.randint(1, max(2, min(h, w)), (2,), generator=gen))
        return torch.roll(x[j], shifts=(sy, sx), dims=(1, 2))
    raise ValueError(f"unknown FBP kind {kind!r}; known: {', '.join(KINDS)}")


def synthesize_anomalies(
    x: torch.Tensor,
    cfg: FBPConfig,
    channel_std: torch.Tensor | float,
    gen: torch.Generator,
    kinds: tuple[str, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend 1..``cfg.blocks_per_image`` blocks of mixed kinds into each image; return (x_anomalous, mask).

    ``kinds`` overrides ``cfg.kinds`` with a uniform mix (used by the self-check on held-out kinds).
    The mask (B, 1, H, W) is the binary union of the blocks; intensities are in per-channel sigma units.
    """
    b, _, h, w = x.shape
    kinds = tuple(kinds or cfg.kinds)
    probs = _kind_probabilities(cfg) if kinds == tuple(cfg.kinds) else torch.full((len(kinds),), 1.0 / len(kinds))
    channel_std = torch.as_tensor(channel_std).to(x).expand(x.shape[1])  # a float: the same sigma everywhere
    lo, hi = cfg.intensity_std_range
    out = x.clone()
    union = torch.zeros(b, 1, h, w, dtype=x.dtype, device=x.device)
    lo_n, hi_n = cfg.blocks_per_image
    for i in range(b):
        if cfg.probability < 1.0 and float(torch.rand((), generator=gen)) >= cfg.probability:
            continue
        for _ in range(int(torch.randint(lo_n, hi_n + 1, (1,), generator=gen))):
            kind = kinds[int(torch.multinomial(probs, 1, generator=gen))]
            mask = _block_mask(h, w, cfg, gen).to(x)
            alpha = _blur(mask.view(1, 1, h, w), cfg.blur_sigma)[0]
            if kind == "paste":  # blend strength instead of intensity: at least half foreign
                alpha = alpha * (0.5 + 0.5 * float(torch.rand((), generator=gen)))
            intensity = lo + (hi - lo) * float(torch.rand((), generator=gen))
            target = _anomaly_values(kind, out, i, intensity, channel_std, gen)
            out[i] = out[i] + alpha * (target - out[i])
            union[i, 0] = torch.maximum(union[i, 0], mask)
    return out, union


def feature_block_paste(
    x: torch.Tensor, cfg: FBPConfig, feature_std: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original FBP: a blurred block of constant intensity on every channel; returns (x_pasted, mask)."""
    paint, mask = sample_fbp_masks(x.shape[0], tuple(x.shape[-2:]), cfg, feature_std, gen)
    paint, mask = paint.to(x.device, x.dtype), mask.to(x.device, x.dtype)
    return x + paint, mask
