"""Batch inference of a PyTorch detector over dataset samples (used by grad-eval and the benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from gradad.data.datasets import Sample
from gradad.training.features import load_images, to_tensor
from gradad.training.model import GRADDetector


@dataclass
class Predictions:
    """Scores and maps of N images, with the resized inputs and ground truth they were computed on."""

    samples: list[Sample]
    scores: np.ndarray  # (N,) float32
    maps: np.ndarray  # (N, H, W) float32
    images: np.ndarray  # (N, H, W, 3) uint8, resized
    masks: np.ndarray  # (N, H, W) bool, resized

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


@torch.no_grad()
def predict(
    detector: GRADDetector,
    samples: Sequence[Sample],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> Predictions:
    """Run ``detector`` over ``samples`` in batches; returns scores, maps and the resized images/masks."""
    samples = list(samples)
    images, masks = load_images(samples, image_size, desc="reading test images")
    scores = np.empty(len(samples), np.float32)
    maps = np.empty((len(samples), image_size, image_size), np.float32)
    detector = detector.to(device).eval()
    for start in tqdm(range(0, len(samples), batch_size), desc="inference", unit="batch"):
        x = to_tensor(images[start : start + batch_size], mean, std).to(device)
        score, amap = detector(x)
        scores[start : start + len(x)] = score.float().cpu().numpy()
        maps[start : start + len(x)] = amap[:, 0].float().cpu().numpy()
    return Predictions(samples, scores, maps, images, masks)
