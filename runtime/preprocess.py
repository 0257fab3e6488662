"""Frame preprocessing shared by the runtime, calibration and export parity (numpy + OpenCV)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gradad.data.images import resize_hw

#: The bundle's input format (schema 2): uint8 RGB, (N, 3, H, W). The graph casts and normalises.
INPUT_DTYPE = np.uint8


def to_model_input(images_rgb: Sequence[np.ndarray] | np.ndarray, height: int, width: int,
                   dtype: type | np.dtype = INPUT_DTYPE) -> np.ndarray:
    """RGB uint8 images (any size) -> (N, 3, height, width) of ``dtype`` (default uint8), the bundle's input.

    Frames are resized with the same rule as the training images (``resize_hw``) and written straight into the
    batch (one uint8 copy per frame, no float math).
    """
    batch = np.empty((len(images_rgb), 3, height, width), dtype)
    for i, img in enumerate(images_rgb):
        write_model_input(batch[i], img)
    return batch


def write_model_input(slot: np.ndarray, image_rgb: np.ndarray) -> None:
    """Resize one RGB frame by the training rule into ``slot`` (3, H, W), e.g. a row of a pinned batch buffer."""
    _, h, w = slot.shape
    slot[...] = resize_hw(image_rgb, h, w).transpose(2, 0, 1)


def as_input_dtype(images: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``images`` in the graph's input dtype: uint8 frames for a float32 graph (bundle schema 1) are cast; float
    frames of 0..255 values for a uint8 graph (older callers) are rounded and clipped. No copy when it matches."""
    if images.dtype == dtype:
        return np.ascontiguousarray(images)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(images.dtype, np.floating):
        return np.clip(np.rint(images), 0, 255).astype(dtype)
    return np.ascontiguousarray(images, dtype)
