"""Feature Block Paste (DESIGN.md section 2): synthetic anomalies painted in feature space for stage 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradad.training.config import FBPConfig

_FOUR_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


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


def sample_fbp_masks(
    batch: int, feat_hw: tuple[int, int], cfg: FBPConfig, feature_std: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one block per image.

    Returns (paint, mask): paint (B, 1, H, W) is intensity on the marked cells, Gaussian-blurred (3x3, sigma);
    mask (B, 1, H, W) is the un-blurred binary mask of the marked cells (all zero for skipped images).
    """
    h, w = feat_hw
    mask = torch.zeros(batch, 1, h, w)
    paint = torch.zeros(batch, 1, h, w)
    max_block = max(1, min(cfg.max_block, (min(h, w) - 1) // 2))
    lo, hi = cfg.intensity_std_range
    for i in range(batch):
        if cfg.probability < 1.0 and float(torch.rand((), generator=gen)) >= cfg.probability:
            continue
        block = int(torch.randint(1, max_block + 1, (1,), generator=gen))
        # The centre is chosen so the whole (2B+1)^2 window fits inside the map.
        cy = int(torch.randint(block, h - block, (1,), generator=gen))
        cx = int(torch.randint(block, w - block, (1,), generator=gen))
        intensity = (lo + (hi - lo) * float(torch.rand((), generator=gen))) * feature_std
        for dy, dx in _walk_cells(block, cfg, gen):
            mask[i, 0, cy + dy, cx + dx] = 1.0
        paint[i] = mask[i] * intensity
    if cfg.blur_sigma > 0:
        paint = F.conv2d(paint, gaussian_kernel3(cfg.blur_sigma).view(1, 1, 3, 3), padding=1)
    return paint, mask


def feature_block_paste(
    x: torch.Tensor, cfg: FBPConfig, feature_std: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a blurred block of constant intensity to every channel of x; return (x_pasted, binary mask)."""
    paint, mask = sample_fbp_masks(x.shape[0], tuple(x.shape[-2:]), cfg, feature_std, gen)
    paint, mask = paint.to(x.device, x.dtype), mask.to(x.device, x.dtype)
    return x + paint, mask
