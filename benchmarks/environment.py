"""What a benchmark ran on: device, CPU and GPU model, library versions, peak memory (stdlib + lazy imports)."""

from __future__ import annotations

import importlib
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


def gpu_name() -> str | None:
    """Name of CUDA device 0 when torch is installed and sees a GPU."""
    if "torch" not in sys.modules and library_version("torch") is None:
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> dict[str, Any]:
    """Machine, CPU model, CPU count, GPU name (or None) and library versions."""
    return {
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        **{key: library_version(module) for module, key in LIBRARIES.items()},
    }


