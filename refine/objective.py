"""The F2PAD penalty terms (DESIGN.md §3), each per image and averaged over the optimisation region R.

All inputs are (B, 3, H, W) images in the model's normalised colour space; ``region`` is (B, 1, H, W) float {0, 1}.
Averaging over R (instead of summing) keeps the weights independent of the defect size and the image size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Keeps d||a||/da finite at a = 0 (sqrt has an infinite slope there); far below any meaningful pixel difference.
_NORM_EPS = 1e-12


def region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) per-pixel values -> (B,) mean over the region's pixels."""
    return (values * region).sum(dim=(1, 2, 3)) / region.sum(dim=(1, 2, 3)).clamp_min(1.0)


def pixel_norm(a: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) Euclidean norm over colour channels."""
    return (a.pow(2).sum(dim=1, keepdim=True) + _NORM_EPS).sqrt()


def log_sparsity(a: torch.Tensor, region: torch.Tensor, eps: float, smoothing: float = 0.0) -> torch.Tensor:
    """Mean over R of log(n + sqrt(n^2 + eps)): the paper's log-sum sparsity penalty on the anomaly.

    n = sqrt(||a_ij||^2 + smoothing^2): with smoothing > 0 the penalty is a smooth bowl at a = 0 instead of the
    norm's kink, which gradient steps would otherwise cross back and forth (every pixel jitters by one step).
    The value at a = 0 is subtracted (a constant: same minimiser), so the penalty is >= 0 and the objective's
    size reflects progress, which the relative early-stopping rule relies on.
    """
    floor = max(smoothing**2, _NORM_EPS)
    n = (a.pow(2).sum(dim=1, keepdim=True) + floor).sqrt()
    at_zero = math.log(math.sqrt(floor) + math.sqrt(floor + eps))
    return region_mean(torch.log(n + (n.pow(2) + eps).sqrt()) - at_zero, region)


def mog_penalty(x_n: torch.Tensor, region: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    """Mean over R of the minimum squared Mahalanobis distance of each pixel to the K mixture components.

    ``means`` (K, 3), ``precisions`` (K, 3, 3) inverse covariances.
    """
    diff = x_n.unsqueeze(1) - means.view(1, -1, 3, 1, 1)  # (B, K, 3, H, W)
    d = torch.einsum("bkihw,kij,bkjhw->bkhw", diff, precisions, diff)
    return region_mean(d.amin(dim=1, keepdim=True), region)


def total_variation(x_n: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: sum over channels of |horizontal| + |vertical| differences, for neighbour pairs with at least
    one pixel in R (each pair counted once, at its top/left pixel), divided by |R|."""
    dh = (x_n[..., :, 1:] - x_n[..., :, :-1]).abs().sum(dim=1, keepdim=True)
    dv = (x_n[..., 1:, :] - x_n[..., :-1, :]).abs().sum(dim=1, keepdim=True)
    rh = torch.maximum(region[..., :, 1:], region[..., :, :-1])
    rv = torch.maximum(region[..., 1:, :], region[..., :-1, :])
    total = (dh * rh).sum(dim=(1, 2, 3)) + (dv * rv).sum(dim=(1, 2, 3))
    return total / region.sum(dim=(1, 2, 3)).clamp_min(1.0)


def validity_penalty(x_n: torch.Tensor, region: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Mean over R of the squared excursion outside the displayable range; ``low``/``high`` (3,) per channel."""
    lo = low.view(1, 3, 1, 1)
    hi = high.view(1, 3, 1, 1)
    excess = F.relu(x_n - hi).pow(2) + F.relu(lo - x_n).pow(2)
    return region_mean(excess.sum(dim=1, keepdim=True), region)


def feature_loss(anomaly_map: torch.Tensor, region: torch.Tensor, pixel_threshold: float) -> torch.Tensor:
    """L(x_n): GRAD's anomaly map on x_n, mean over R, in units of the calibrated pixel threshold."""
    return region_mean(anomaly_map, region) / pixel_threshold


def linear_readout_weights(postprocess, lowres_shape: tuple[int, ...], region: torch.Tensor,
                           pixel_threshold: float) -> torch.Tensor:
    """Weights W with sum(W * lowres_map) == feature_loss(postprocess(lowres_map), region, threshold).

    The map post-processing (bilinear up-sampling + mean/Gaussian smoothing) is linear, so the region mean of the
    full-resolution map is a fixed weighted sum of the feature-resolution map. Computing W once per image (one
    backward pass of the linear map) removes the full-resolution up-sampling and smoothing from every iteration.
    """
    probe = torch.zeros(lowres_shape, dtype=region.dtype, device=region.device, requires_grad=True)
    _, full = postprocess(probe)
    (weights,) = torch.autograd.grad(feature_loss(full, region, pixel_threshold).sum(), probe)
    return weights
