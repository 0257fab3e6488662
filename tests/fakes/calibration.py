"""A runtime backend whose scores are known by construction, and images that give chosen scores, for the
calibration tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class MeanBackend:
    """Scores an image by its mean grey level; its map is the per-pixel channel mean."""

    name = "fake"
    max_batch = 8

    @property
    def input_hw(self) -> tuple[int, int]:
        return 16, 16

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images.mean(axis=(1, 2, 3)).astype(np.float32), images.mean(axis=1).astype(np.float32)

    def close(self) -> None:
        pass


def grey_images(folder: Path, levels: list[int], suffix: str = "") -> list[Path]:
    """16x16 PNGs of the given grey levels in ``folder`` (one marked pixel each, so no two are identical)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, level in enumerate(levels):
        image = np.full((16, 16, 3), level, np.uint8)
        image[4 + i % 8, 4] = 255 - level  # no two images identical: not dropped as copies
        paths.append(folder / f"{i:03d}{suffix}.png")
        cv2.imwrite(str(paths[-1]), image)
    return paths
