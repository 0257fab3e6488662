"""The backend protocol every inference engine implements (ONNX Runtime, TensorRT)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from gradad.errors import GradError


class BackendError(GradError):
    """A backend that cannot be created or run with the given model/settings (any backend)."""


class UntrustedEngineError(BackendError):
    """A TensorRT engine this machine neither built nor was told to trust (see gradad.engine_trust)."""


class Backend(Protocol):
    """images (N, 3, H, W) float32 RGB in 0..255 -> (scores (N,), maps (N, H, W)), both float32."""

    name: str  # e.g. "onnxruntime:CPUExecutionProvider", "tensorrt"
    max_batch: int  # largest batch one infer() call accepts

    @property
    def input_hw(self) -> tuple[int, int]: ...

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


def infer_in_batches(backend: Backend, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Run any backend over many images, ``min(batch_size, backend.max_batch)`` at a time."""
    step = max(1, min(batch_size, backend.max_batch))
    scores, maps = [], []
    for start in range(0, len(images), step):
        s, m = backend.infer(images[start : start + step])
        scores.append(s)
        maps.append(m)
    if not scores:  # an empty input: let the backend shape its empty outputs
        return backend.infer(images)
    return np.concatenate(scores), np.concatenate(maps)
