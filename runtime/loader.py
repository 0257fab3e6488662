"""Open a model bundle with the best available backend, refusing bundles that do not verify."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from gradad.bundle import FP16_ONNX, FP32_ONNX, bundle_file, read_manifest, verify_files
from gradad.errors import GradError
from gradad.runtime.backend import Backend
from gradad.runtime.onnxruntime_backend import BackendError, OnnxRuntimeBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime")
PRECISIONS = ("fp32", "fp16")


def _io_problem(backend: OnnxRuntimeBackend, manifest: dict[str, Any]) -> str | None:
    """What in the graph's inputs/outputs differs from the bundle contract (DESIGN.md section 5), or None."""
    inp = manifest["input"]
    inputs, outputs = backend.session.get_inputs(), backend.session.get_outputs()
    want_shape = ["N", 3, inp["height"], inp["width"]]
    if len(inputs) != 1 or inputs[0].name != inp["name"] or inputs[0].type != "tensor(float)":
        got = ", ".join(f"{i.name} {i.type}" for i in inputs)
        return f"inputs are [{got}], the bundle says one float32 input {inp['name']!r}"
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != want_shape[1:]:
        return f"input {inp['name']!r} has shape {shape}, the bundle says {want_shape}"
    got_out = [(o.name, len(o.shape)) for o in outputs]
    if got_out[:2] != [("score", 1), ("anomaly_map", 4)]:
        return f"outputs are {[f'{n} (rank {r})' for n, r in got_out]}, the bundle needs score (N) and anomaly_map " \
               f"(N, 1, H, W)"
    return None


def check_io(backend: OnnxRuntimeBackend, manifest: dict[str, Any]) -> None:
    """Refuse a graph whose inputs/outputs are not the bundle's (e.g. another valid ONNX with its hash updated)."""
    problem = _io_problem(backend, manifest)
    if problem:
        backend.close()
        raise BackendError(f"{backend.path} is not a gradad model for this bundle: {problem}; re-export the bundle "
                           f"with grad-export onnx")


def _onnx_backend(bundle_dir: Path, manifest: dict[str, Any], precision: str, providers: Sequence[str] | None,
                  threads: int, max_batch: int) -> OnnxRuntimeBackend:
    name = FP16_ONNX if precision == "fp16" else FP32_ONNX
    if name not in manifest["files"]:
        raise BackendError(f"bundle {bundle_dir} has no {name}; re-export it without --no-fp16 or use --precision fp32")
    verify_files(bundle_dir, manifest, [name])
    backend = OnnxRuntimeBackend(bundle_file(bundle_dir, name), providers, threads, max_batch)
    check_io(backend, manifest)
    return backend


def load_backend(
    bundle_dir: str | Path,
    backend: str = "auto",
    precision: str | None = None,
    providers: Sequence[str] | None = None,
    threads: int = 0,
    max_batch: int = 32,
) -> tuple[Backend, dict[str, Any]]:
    """(backend, manifest) for a bundle.

    ``auto`` uses a TensorRT engine when the bundle has one for this device and TensorRT is installed, else ONNX
    Runtime (TensorRT/CUDA/CPU providers by availability). ``precision`` defaults to fp16 for TensorRT and fp32
    for ONNX Runtime (FP16 is slower than FP32 on most CPUs).
    """
    if backend not in BACKENDS:
        raise GradError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise GradError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if backend in ("auto", "tensorrt"):
        try:
            from gradad.runtime.tensorrt_backend import load_tensorrt_backend

            trt_backend = load_tensorrt_backend(bundle_dir, manifest, precision or "fp16")
            return trt_backend, manifest
        except GradError as exc:
            if backend == "tensorrt":
                raise
            log.info("TensorRT backend not used (%s); using ONNX Runtime", exc)
    ort_backend = _onnx_backend(bundle_dir, manifest, precision or "fp32", providers, threads, max_batch)
    log.info("backend %s on %s", ort_backend.name, ort_backend.path.name)
    return ort_backend, manifest
