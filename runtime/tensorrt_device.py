"""TensorRT on the device the runtime runs on: import it, identify the GPU, check that an engine fits.

The runtime needs these to load an engine; ``gradad.export.tensorrt_build`` uses them to build one (export
depends on the runtime, never the reverse).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from typing import Any

from gradad.bundle import EngineStamp, Precision
from gradad.errors import GradError

log = logging.getLogger(__name__)


def rebuild_command(bundle: str, precision: str = "fp16") -> str:
    """The command that builds a bundle's engine on the device at hand (quoted in every stale-engine error)."""
    return f"grad-export build --{precision} {bundle} --parity-images DIR"


# CUdevice_attribute values from cuda.h (stable across CUDA versions).
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


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


def _visible_device_index() -> int | None:
    """The physical index of CUDA device 0 when CUDA_VISIBLE_DEVICES names it by number."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else None


def _gpu_from_cuda_python() -> dict[str, str] | None:
    """GPU 0 through cuda-python (``cuda.bindings.runtime``, or the older ``cuda.cudart``)."""
    try:
        runtime = import_cudart()
    except TensorRTUnavailable:
        return None
    try:
        err, prop = runtime.cudaGetDeviceProperties(0)
        if err != runtime.cudaError_t.cudaSuccess:
            log.debug("cudaGetDeviceProperties failed: %s", err)
            return None
        name = prop.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
        return {"name": str(name).strip(), "compute_capability": f"{prop.major}.{prop.minor}"}
    except Exception as exc:  # noqa: BLE001 - any failure here just means "try the next way"
        log.debug("cuda-python GPU query failed: %s", exc)
        return None


def _gpu_from_nvidia_smi() -> dict[str, str] | None:
    """GPU 0 (or the CUDA_VISIBLE_DEVICES one) through ``nvidia-smi``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    index = _visible_device_index()
    if index is not None:
        cmd.append(f"--id={index}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return None
    if proc.returncode != 0:
        log.debug("nvidia-smi exited %s: %s", proc.returncode, proc.stderr.strip())
        return None
    return parse_nvidia_smi_line(proc.stdout)


def parse_nvidia_smi_line(text: str) -> dict[str, str] | None:
    """Parse the first ``name, compute_cap`` line printed by nvidia-smi; None when unusable."""
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, cap = line.rpartition(",")
        cap = cap.strip()
        if not sep or not re.fullmatch(r"\d+\.\d+", cap):
            return None
        return {"name": name.strip(), "compute_capability": cap}
    return None


def _gpu_from_libcuda() -> dict[str, str] | None:
    """GPU 0 through the CUDA driver library with ctypes (works where cuda-python is absent)."""
    import ctypes
    import ctypes.util

    candidates = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"]
    lib = None
    for candidate in candidates:
        if not candidate:
            continue
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError:
            continue
    if lib is None:
        return None
    try:
        if lib.cuInit(0) != 0:
            return None
        dev = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
            return None
        buf = ctypes.create_string_buffer(256)
        if lib.cuDeviceGetName(buf, 256, dev) != 0:
            return None
        major, minor = ctypes.c_int(), ctypes.c_int()
        if lib.cuDeviceGetAttribute(
            ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev
        ) != 0 or lib.cuDeviceGetAttribute(
            ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev
        ) != 0:
            return None
    except (AttributeError, OSError) as exc:
        log.debug("libcuda GPU query failed: %s", exc)
        return None
    name = buf.value.decode("utf-8", "replace").strip()
    return {"name": name, "compute_capability": f"{major.value}.{minor.value}"}


def gpu_identity() -> dict[str, str]:
    """Name and compute capability (e.g. ``"8.7"``) of the CUDA GPU TensorRT will build for.

    Tries cuda-python, then ``nvidia-smi``, then the CUDA driver library through ctypes.
    Raises TensorRTUnavailable when none of them finds a GPU.
    """
    for probe in (_gpu_from_cuda_python, _gpu_from_nvidia_smi, _gpu_from_libcuda):
        found = probe()
        if found:
            log.debug("GPU found by %s: %s", probe.__name__, found)
            return found
    raise TensorRTUnavailable(
        "no CUDA GPU found (tried cuda-python, nvidia-smi and the CUDA driver library); "
        "TensorRT engines must be built on the target GPU"
    )


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
