"""The exported graph: raw RGB frames in, (score, anomaly_map) out, with everything else inside."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradad.training.model import GRADDetector


class ExportModule(nn.Module):
    """image (N, 3, H, W) uint8 RGB -> score (N,), anomaly_map (N, 1, H, W) float32.

    The cast to float32 is the graph's first node, so the host sends one byte per channel and does no float math
    per pixel (bundle schema 2). A float32 tensor of 0..255 values gives the same result (the cast is then a
    no-op in PyTorch). Normalisation, the anomaly map's smoothing and the image score are inside the graph. When the input size
    (H, W) differs from the model's, a bilinear resize to the model size (and of the map back to H, W) is in the
    graph too; at the default (input size = model size) the caller resizes with the same OpenCV routine as
    training (``gradad.data.images.resize_image``), which anti-aliases large down-scales.
    """

    def __init__(self, detector: GRADDetector, mean: Sequence[float], std: Sequence[float],
                 input_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.detector = detector.eval()
        self.model_hw = tuple(detector.head.image_hw)
        self.input_hw = tuple(input_hw) if input_hw else self.model_hw
        # Scale folded in so the graph takes 0..255 pixels directly.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image.to(torch.float32) - self.mean) * self.inv_std
        if self.input_hw != self.model_hw:
            x = F.interpolate(x, size=self.model_hw, mode="bilinear", align_corners=False)
        score, amap = self.detector(x)
        if self.input_hw != self.model_hw:
            amap = F.interpolate(amap, size=self.input_hw, mode="bilinear", align_corners=False)
        return score, amap
