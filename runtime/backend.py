"""The backend protocol every inference engine implements (ONNX Runtime, TensorRT)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """images (N, 3, H, W) float32 RGB in 0..255 -> (scores (N,), maps (N, H, W)), both float32."""

    name: str  # e.g. "onnxruntime:CPUExecutionProvider", "tensorrt"
    max_batch: int  # largest batch one infer() call accepts

    @property
    def input_hw(self) -> tuple[int, int]: ...

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...
