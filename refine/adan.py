"""Adan (adaptive Nesterov momentum; Xie et al. 2022) as an update-direction generator for pixel tensors.

Not a ``torch.optim.Optimizer``: F2PAD transforms the gradient (sharing), scales the step per pixel and clamps it
before applying it, and images of a batch stop at different iterations, so the caller asks for a direction for
the still-active rows and applies it itself. Follows the reference implementation's bias corrections.
"""

from __future__ import annotations

import torch


class AdanDirection:
    """Keeps Adan's three moments for a (B, ...) tensor; :meth:`direction` returns the normalised step direction."""

    def __init__(self, shape: torch.Size, betas: tuple[float, float, float], eps: float,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, per_row_scale: bool = False,
                 row_floor: float = 0.0) -> None:
        self.betas = betas
        # per_row_scale: one second-moment scale per row (image) instead of per element, so an element's step is
        # proportional to its gradient (see RefineConfig.adan_scale).
        self.per_row_scale = per_row_scale
        # row_floor > 0 (with per_row_scale False): each element's second moment is floored at row_floor x its row's
        # mean, so elements with a weak gradient take steps up to 1/sqrt(row_floor) x the per-row step, not more.
        self.row_floor = row_floor
        self.eps = eps
        self.step_count = 0
        self.exp_avg = torch.zeros(shape, device=device, dtype=dtype)
        self.exp_avg_diff = torch.zeros_like(self.exp_avg)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.prev_grad = torch.zeros_like(self.exp_avg)

    def direction(self, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Update the moments of ``rows`` with their gradient ``grad`` (len(rows), ...) and return the direction
        (m / bc1 + beta2 * v / bc2) / (sqrt(n / bc3) + eps) for those rows. All active rows advance one step."""
        b1, b2, b3 = self.betas
        self.step_count += 1
        k = self.step_count
        prev = grad if k == 1 else self.prev_grad[rows]
        diff = grad - prev
        nesterov = grad + b2 * diff
        m = self.exp_avg[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.exp_avg_diff[rows].mul_(b2).add_(diff, alpha=1 - b2)
        n = self.exp_avg_sq[rows].mul_(b3).addcmul_(nesterov, nesterov, value=1 - b3)
        self.exp_avg[rows], self.exp_avg_diff[rows], self.exp_avg_sq[rows] = m, v, n
        self.prev_grad[rows] = grad
        if self.per_row_scale:
            n = n.mean(dim=tuple(range(1, n.dim())), keepdim=True)
        elif self.row_floor > 0:
            n = torch.maximum(n, self.row_floor * n.mean(dim=tuple(range(1, n.dim())), keepdim=True))
        denom = (n / (1 - b3**k)).sqrt_().add_(self.eps)
        return (m / (1 - b1**k) + b2 * v / (1 - b2**k)) / denom
