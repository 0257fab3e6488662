"""Frame preprocessing shared by the runtime, calibration and export parity (numpy + OpenCV)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gradad.data.images import resize_image


def to_model_input(images_rgb: Sequence[np.ndarray] | np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB uint8 images (any size) -> float32 (N, 3, height, width) in 0..255, resized like training."""
    if height != width:
        raise ValueError(f"square model inputs only, got {height}x{width}")
    batch = np.empty((len(images_rgb), 3, height, width), np.float32)
    for i, img in enumerate(images_rgb):
        if img.shape[:2] != (height, width):
            img = resize_image(img, height)
        batch[i] = img.transpose(2, 0, 1)
    return batch
