"""Frame preprocessing shared by the runtime, calibration and export parity (numpy + OpenCV)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gradad.data.images import resize_hw


def to_model_input(images_rgb: Sequence[np.ndarray] | np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB uint8 images (any size) -> float32 (N, 3, height, width) in 0..255, the bundle's input format.

    Frames are resized with the same rule as the training images (``resize_hw``).
    """
    batch = np.empty((len(images_rgb), 3, height, width), np.float32)
    for i, img in enumerate(images_rgb):
        batch[i] = resize_hw(img, height, width).transpose(2, 0, 1)
    return batch
