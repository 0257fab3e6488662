"""Local gradient sharing: each pixel moves along a bilateral-weighted mean of its k x k neighbours' gradients.

Weights depend only on the (fixed) input image, so they are computed once per image:
w_ij,kl ∝ exp(-d_space^2 / 2 sigma_s^2) * exp(-||I_ij - I_kl||^2 / 2 sigma_c^2), neighbours outside the image get 0,
and the weights of each pixel sum to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bilateral_weights(guide: torch.Tensor, kernel: int, sigma_space: float, sigma_color: float) -> torch.Tensor:
    """(B, C, H, W) guide image -> (B, k*k, H, W) normalised neighbour weights (row-major neighbour order)."""
    b, c, h, w = guide.shape
    pad = kernel // 2
    patches = F.unfold(guide, kernel, padding=pad).view(b, c, kernel * kernel, h, w)
    inside = F.unfold(torch.ones(1, 1, h, w, dtype=guide.dtype, device=guide.device), kernel, padding=pad)
    inside = inside.view(1, kernel * kernel, h, w)
    offsets = torch.arange(kernel, dtype=guide.dtype, device=guide.device) - pad
    d2 = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2).reshape(1, -1, 1, 1)
    color2 = (patches - guide.unsqueeze(2)).pow(2).sum(dim=1)  # (B, k*k, H, W)
    weights = torch.exp(-d2 / (2 * sigma_space**2) - color2 / (2 * sigma_color**2)) * inside
    return weights / weights.sum(dim=1, keepdim=True)


def share_gradients(grad: torch.Tensor, weights: torch.Tensor, step_min: float, step_max: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared gradient and adaptive step multiplier.

    grad (B, C, H, W), weights (B, k*k, H, W) from :func:`bilateral_weights`. Returns (shared (B, C, H, W),
    step (B, 1, H, W)) with step = clip(1 + 2 * coherence, step_min, step_max), coherence =
    ||sum_kl w g_kl|| / sum_kl w ||g_kl|| in [0, 1] (1 when all neighbours push the same way).
    """
    b, c, h, w = grad.shape
    kk = weights.shape[1]
    kernel = int(round(kk**0.5))
    neighbours = F.unfold(grad, kernel, padding=kernel // 2).view(b, c, kk, h, w)
    shared = torch.einsum("bckhw,bkhw->bchw", neighbours, weights)
    # neighbours' gradient norms: unfold the 1-channel norm map rather than squaring the c*k*k neighbour tensor
    norms = F.unfold(grad.pow(2).sum(dim=1, keepdim=True).sqrt(), kernel, padding=kernel // 2).view(b, kk, h, w)
    spread = (norms * weights).sum(dim=1, keepdim=True)
    coherence = shared.pow(2).sum(dim=1, keepdim=True).sqrt() / spread.clamp_min(1e-20)
    step = (1.0 + 2.0 * coherence).clamp(step_min, step_max)
    return shared, step
