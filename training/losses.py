"""Losses of the two training stages (DESIGN.md section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def truncated_l1_contrastive(similarity: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Stage-1 loss on s = channel 0 of x_hat_a.

    mean over anomalous cells of max(0, th - s) + mean over normal cells of max(0, th + s): pushes s above +th
    where FBP pasted a block and below -th elsewhere. A term with no cells contributes 0.
    """
    s = similarity.reshape(-1)
    m = mask.reshape(-1).to(s.dtype)
    anomalous = (F.relu(threshold - s) * m).sum() / m.sum().clamp_min(1.0)
    normal = (F.relu(threshold + s) * (1 - m)).sum() / (1 - m).sum().clamp_min(1.0)
    return anomalous + normal


def reconstruction_mse(x_ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss: MSE between the refined reconstruction and the features."""
    return F.mse_loss(x_ref, x)
