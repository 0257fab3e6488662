"""TensorRT on the device the runtime runs on: import it, identify the GPU, check that an engine fits.

The runtime needs these to load an engine; ``gradad.export.tensorrt_build`` uses them to build one (export
depends on the runtime, never the reverse).
"""

from __future__ import annotations

from typing import Any

from gradad.bundle import EngineStamp, Precision
from gradad.errors import GradError


def rebuild_command(bundle: str, precision: str = "fp16") -> str:
    """The command that builds a bundle's engine on the device at hand (quoted in every stale-engine error)."""
    return f"grad-export build --{precision} {bundle} --parity-images DIR"


class TensorRTUnavailable(GradError):
    """TensorRT (or a CUDA GPU for it) is not available on this machine."""


def import_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, or raise TensorRTUnavailable."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError as exc:
        if getattr(exc, "name", None) in ("tensorrt", None) or "tensorrt" in str(exc):
            raise TensorRTUnavailable("TensorRT not installed (the Python package `tensorrt`; on Jetson it comes "
                                      "with JetPack)") from None
        raise TensorRTUnavailable(f"TensorRT is installed but could not be loaded: {exc}") from None
    except OSError as exc:  # the package exists but libnvinfer cannot be loaded
        raise TensorRTUnavailable(f"TensorRT is installed but could not be loaded: {exc}") from None
    return tensorrt


def import_cudart() -> Any:
    """The cuda-python runtime module (``cuda.bindings.runtime``, else the older ``cuda.cudart``).

    Raises TensorRTUnavailable when cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except ImportError:
            raise TensorRTUnavailable("cuda-python not installed (the Python package `cuda-python`, NVIDIA's CUDA "
                                      "runtime bindings; pip install the version matching the device's CUDA, e.g. "
                                      "cuda-python==12.* on JetPack 6)") from None
    return cudart


def gpu_identity() -> dict[str, str]:
    """Name and compute capability (e.g. ``"8.7"``) of CUDA GPU 0, the one TensorRT builds for and runs on.

    Raises TensorRTUnavailable when cuda-python is not installed or finds no GPU.
    """
    cudart = import_cudart()
    try:
        err, prop = cudart.cudaGetDeviceProperties(0)
    except Exception as exc:  # noqa: BLE001 - a broken driver install reads as no GPU, with its message
        err = exc
    if err != cudart.cudaError_t.cudaSuccess:
        raise TensorRTUnavailable(f"no CUDA GPU found (cudaGetDeviceProperties: {getattr(err, 'name', err)}); "
                                  "TensorRT engines must be built on the target GPU")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"name": str(name).strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


def engine_matches_device(
    stamp: EngineStamp, trt_version: str, gpu: dict[str, str], bundle: str = "<bundle>"
) -> str | None:
    """None when the engine stamp fits this TensorRT and GPU; else a one-line reason and the fix.

    An engine is only valid for the TensorRT version and GPU it was built on (DESIGN.md section 6).
    """
    problems = []
    built_trt = str(stamp.tensorrt_version)
    if built_trt != str(trt_version):
        problems.append(f"TensorRT {built_trt} (this device has TensorRT {trt_version})")
    built_cc = str(stamp.compute_capability)
    built_gpu = str(stamp.gpu_name)
    if built_cc != str(gpu.get("compute_capability")) or built_gpu != str(gpu.get("name")):
        problems.append(
            f"GPU {built_gpu} (compute capability {built_cc}; this device has {gpu.get('name')}, "
            f"compute capability {gpu.get('compute_capability')})"
        )
    if not problems:
        return None
    precision = stamp.precision if stamp.precision in (Precision.FP32, Precision.INT8) else Precision.FP16.value
    command = rebuild_command(bundle, precision)
    return (
        f"engine {stamp.file} was built for {' and '.join(problems)}; "
        f"TensorRT engines only run where they were built: rebuild it on this device with `{command}`"
    )
