"""What a benchmark ran on: device, CPU and GPU model, library versions, peak memory (stdlib + lazy imports)."""

from __future__ import annotations

import importlib
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

from gradad.process_memory import peak_rss_mb  # noqa: F401 - the benchmarks' import name

#: Libraries whose versions every result file records (import name -> JSON key).
LIBRARIES: dict[str, str] = {
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "numpy": "numpy",
    "cv2": "opencv",
    "tensorrt": "tensorrt",
}
CPUINFO = Path("/proc/cpuinfo")

log = logging.getLogger(__name__)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in CPUINFO.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_version(module: str) -> str | None:
    """``module.__version__`` or None when the library is not importable."""
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, or broken native library: recorded as absent
        return None


def torch_gpu() -> dict[str, str] | None:
    """Name and compute capability of CUDA device 0 when torch is installed and sees a GPU, else None."""
    if "torch" not in sys.modules and library_version("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def cuda_python_gpu() -> dict[str, str]:
    """GPU 0 as cuda-python sees it (what TensorRT builds for and runs on); raises without cuda-python or a GPU.

    A Jetson's TensorRT rows run without torch, or with a CPU-only torch wheel: torch alone would call that
    machine GPU-less."""
    from gradad.runtime import tensorrt_device  # the module, not the function: tests replace what it imports

    return tensorrt_device.gpu_identity()  # raises without cuda-python or a GPU: gpu_info reads that as None


def gpu_info() -> dict[str, str] | None:
    """GPU 0's name, compute capability and who reported it (``source``: torch, else cuda-python), or None."""
    for source, probe in (("torch", torch_gpu), ("cuda-python", cuda_python_gpu)):
        try:
            found = probe()
        except Exception as exc:  # noqa: BLE001 - no cuda-python or GPU, a broken CUDA build: no GPU from it
            log.debug("%s GPU probe failed: %s", source, exc)
            found = None
        if found:
            return {**found, "source": source}
    return None


def tensorrt_engine_record(backend: Any, bundle: Any) -> dict[str, Any] | None:
    """What a TensorRT row ran on, for its result row: the ``bundle.json`` stamp of the engine file ``backend``
    loaded (file, hash, the TensorRT version, GPU, compute capability and precision it was built for, its
    optimisation profile) and the loaded engine's batch range, TensorRT and cuda-python versions. None for
    another backend.

    ``load_tensorrt_backend`` picked the stamp (the newest one for this device); its file name finds it again."""
    # "tensorrt", or "tensorrt:<precision>:<engine file>" where the loader names the precision
    if str(getattr(backend, "name", "")).split(":", 1)[0] != "tensorrt" or not hasattr(backend, "engine_path"):
        return None
    from gradad.runtime.tensorrt_device import cuda_python_version  # as the runtime names it: "cuda-python 12.6.0"
    path = Path(backend.engine_path)
    stamp = next((s for s in getattr(bundle, "engines", []) if Path(s.file).name == path.name), None)
    record: dict[str, Any] = {"file": path.name}
    if stamp is not None:
        entry = bundle.files.get(stamp.file)
        record.update({"sha256": entry.sha256 if entry else None, "built_with_tensorrt": stamp.tensorrt_version,
                       "gpu_name": stamp.gpu_name, "compute_capability": stamp.compute_capability,
                       "precision": stamp.precision, "profile": stamp.profile, "profiles": stamp.profiles,
                       "build_mode": stamp.build_mode})
    else:  # not listed in bundle.json (cannot happen through load_tensorrt_backend): say so rather than guess
        log.warning("TensorRT engine %s has no stamp in bundle.json", path.name)
    record.update({"min_batch": int(backend.min_batch), "max_batch": int(backend.max_batch),
                   "in_flight": int(getattr(backend, "in_flight", 1)), "api": getattr(backend, "api", None),
                   "tensorrt": library_version("tensorrt"), "cuda_python": cuda_python_version()})
    return record


def engine_note(row: dict[str, Any]) -> str | None:
    """One sentence naming the TensorRT engine a row ran (None for a row without ``tensorrt_engine``)."""
    eng = row.get("tensorrt_engine")
    if not eng:
        return None
    built = (f"built with TensorRT {eng.get('built_with_tensorrt')} for {eng.get('gpu_name')} (compute capability "
             f"{eng.get('compute_capability')}), {str(eng.get('precision')).upper()}" if eng.get("gpu_name")
             else "no stamp in bundle.json")
    return (f"{row['label']}: engine `{eng['file']}`, {built}; batch {eng.get('min_batch')}..{eng.get('max_batch')}; "
            f"run with TensorRT {eng.get('tensorrt')}, {eng.get('cuda_python') or 'cuda-python (version unknown)'}")


def environment() -> dict[str, Any]:
    """Machine, CPU model, CPU count, GPU name (or None) and library versions."""
    gpu = gpu_info()
    return {
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu["name"] if gpu else None,
        # who saw the GPU (torch, else cuda-python) and its compute capability: a Jetson's TensorRT rows run
        # with a CPU-only torch or none
        "gpu_compute_capability": gpu["compute_capability"] if gpu else None,
        "gpu_source": gpu["source"] if gpu else None,
        "python": platform.python_version(),
        **{key: library_version(module) for module, key in LIBRARIES.items()},
    }


