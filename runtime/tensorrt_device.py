"""TensorRT on the device the runtime runs on: import it, identify the GPU, check that an engine fits.

The runtime needs these to load an engine; ``gradad.export.tensorrt_build`` uses them to build one (export
depends on the runtime, never the reverse).
"""

from __future__ import annotations

from typing import Any

from gradad.bundle import EngineStamp, Precision
from gradad.errors import GradError

#: Oldest TensorRT gradad drives: only the name-based tensor API (``execute_async_v3``), new in TensorRT 8.5.
MIN_TENSORRT_VERSION: tuple[int, int] = (8, 5)


def tensorrt_too_old(version: str) -> str:
    """The one message for a TensorRT older than :data:`MIN_TENSORRT_VERSION`, met at build or at load time."""
    oldest = ".".join(map(str, MIN_TENSORRT_VERSION))
    return (f"TensorRT {version} has no name-based tensor API (execute_async_v3): gradad needs TensorRT {oldest} "
            f"or newer (JetPack 5.1+)")


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


def cuda_python_version() -> str:
    """The installed cuda-python as pip names it, e.g. ``"cuda-python 12.6.0 (cuda-bindings 12.6.0)"`` or
    ``"cuda-bindings 13.5.0"`` (cuda-python 12.6+ is a meta package over cuda-bindings; older ones are one)."""
    from importlib import metadata

    found = []
    for dist in ("cuda-python", "cuda-bindings"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if not found:  # installed outside pip's view (a JetPack or conda build): the module may still say
        try:
            import cuda.bindings as bindings  # type: ignore[import-not-found]
        except ImportError:
            return "cuda-python (version unknown)"
        return f"cuda-bindings {getattr(bindings, '__version__', '(version unknown)')}"
    return found[0] + (f" ({found[1]})" if len(found) > 1 else "")


def _no_gpu_message(err: Any, building: bool) -> str:
    """Why cudaGetDeviceProperties(0) failed, and the fix, for TensorRTUnavailable."""
    name = getattr(err, "name", None) or str(err)
    call = f"cudaGetDeviceProperties: {name}"
    if name == "cudaErrorInsufficientDriver":
        # The driver is there (or absent) but older than the CUDA these bindings were built for: typically a
        # pip-installed cuda-python newer than JetPack's CUDA. "No GPU" would send the user looking for hardware.
        return (f"the NVIDIA driver is missing or too old for the installed {cuda_python_version()} ({call}): "
                "install the cuda-python that matches the driver's CUDA version (JetPack 5: "
                "pip install 'cuda-python==11.8.*'; JetPack 6: pip install 'cuda-python==12.*'; on a PC: the "
                "CUDA major version nvidia-smi shows, or update the driver)")
    what = "no CUDA GPU found" if name == "cudaErrorNoDevice" else "CUDA cannot use GPU 0"
    # Only a build is about where an engine comes from; a run on a GPU-less box just has no TensorRT.
    tail = "; TensorRT engines must be built on the target GPU" if building else ""
    return f"{what} ({call}){tail}"


def gpu_identity(building: bool = True) -> dict[str, str]:
    """Name and compute capability (e.g. ``"8.7"``) of CUDA GPU 0, the one TensorRT builds for and runs on.

    Raises TensorRTUnavailable when cuda-python is not installed, the driver is too old for it or there is no GPU;
    ``building``: the caller is about to build an engine (its message then says engines are built on the target
    GPU; the runtime passes False).
    """
    cudart = import_cudart()
    try:
        err, prop = cudart.cudaGetDeviceProperties(0)
    except Exception as exc:  # noqa: BLE001 - a broken driver install reads as no GPU, with its message
        err = exc
    if err != cudart.cudaError_t.cudaSuccess:
        raise TensorRTUnavailable(_no_gpu_message(err, building))
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
