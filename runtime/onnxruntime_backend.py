"""ONNX Runtime backend: runs a bundle's ONNX graph on CPU, CUDA or the TensorRT execution provider."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from gradad.runtime.backend import BackendError, infer_in_batches
from gradad.runtime.preprocess import as_input_dtype

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """Map short names to ONNX Runtime providers, keeping only available ones (CPU is always last)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not requested:
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in order if p in available]
    providers = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise BackendError(f"ONNX Runtime provider {name!r} is not available here (available: "
                               f"{', '.join(available)})")
        providers.append(full)
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return providers


#: the op type of ONNX Runtime's "EP context" nodes, which embed a compiled engine (TensorRT's: native code)
_EP_CONTEXT_OP = b"EPContext"


def holds_precompiled_engine(path: Path) -> bool:
    """Whether an ONNX file names an EPContext node: ONNX Runtime's TensorRT provider would deserialise the engine
    it embeds. gradad never exports one, so a graph that has one came from elsewhere; its op type is stored as
    plain bytes, so a scan of the file finds it without parsing (or importing onnx)."""
    tail = b""
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            if _EP_CONTEXT_OP in tail + chunk:
                return True
            tail = chunk[-len(_EP_CONTEXT_OP):]
    return False


ORT_INPUT_DTYPES = {"tensor(uint8)": np.dtype(np.uint8), "tensor(float)": np.dtype(np.float32)}


class OnnxRuntimeBackend:
    """image (N, 3, H, W) uint8 RGB -> (scores (N,), maps (N, H, W)) with one ORT session.

    ``spin=False`` stops idle ONNX Runtime threads from spin-waiting, so the pipelined loop's capture and sink
    threads get the cores (on 2 shared cores it doubled the frame rate); the serial loop keeps the default.

    The input dtype is the graph's (uint8 for bundle schema 2, float32 for schema 1); frames of the other dtype
    are converted on the host, so every caller may pass uint8 frames or float32 arrays of 0..255 values.
    """

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] | None = None, threads: int = 0,
                 max_batch: int = 32, spin: bool = True) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise BackendError(f"ONNX model not found: {path}")
        if holds_precompiled_engine(path):
            raise BackendError(f"{path} holds an EPContext node (a precompiled engine, i.e. native code); gradad never "
                               f"exports one, so this graph was changed elsewhere: re-export the bundle with "
                               f"grad-export onnx")
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not spin:  # idle intra-op threads sleep instead of spinning: the pipelined loop's other threads get the CPU
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=resolve_providers(providers))
        except Exception as exc:  # ORT raises its own exception types for invalid graphs
            raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        self.path = path
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = inp.shape  # e.g. ['N', 3, 256, 256]
        self.input_dtype = ORT_INPUT_DTYPES.get(inp.type, np.dtype(np.float32))
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime:{self.providers[0]}:{path.name}"  # provider and precision (file)
        # The graph has a dynamic batch axis; this only bounds what one call may hold (memory).
        self.max_batch = max_batch

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.input_shape[2]), int(self.input_shape[3])

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one batch; checks the input size so a wrong frame size is a clear error, not an ORT trace."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.input_hw:
            raise BackendError(f"{self.path.name} expects images of shape (N, 3, {self.input_hw[0]}, "
                               f"{self.input_hw[1]}), got {tuple(images.shape)}")
        if len(images) > self.max_batch:
            raise BackendError(f"batch of {len(images)} exceeds max_batch {self.max_batch}")
        scores, maps = self.session.run(None, {self.input_name: as_input_dtype(images, self.input_dtype)})
        return scores.astype(np.float32), maps[:, 0].astype(np.float32)

    def infer_all(self, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Run ``images`` (N, 3, H, W) in batches."""
        return infer_in_batches(self, images, batch_size)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

