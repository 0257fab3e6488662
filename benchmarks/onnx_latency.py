"""ONNX Runtime CPU latency of each preset's exported graph (FP32 and FP16), batch 1, fixed threads.

Weights do not change latency, so presets are built with random weights (no trained checkpoint needed) and
exported exactly as ``grad-export onnx`` does (same wrapper, opset, simplification, FP16 block-list).

    python -m gradad.benchmarks.onnx_latency --preset edge --preset paper --threads 2 \
        -o benchmarks/results/onnx_cpu_latency.json
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
import torch

from gradad.cli_utils import setup_logging, user_errors_as_exit
from gradad.export.fp16 import convert_to_fp16
from gradad.export.graph import ExportModule
from gradad.export.onnx_export import export_onnx_fp32, simplify
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import PRESETS, preset_config
from gradad.training.model import GRADDetector, GRADModel

log = logging.getLogger(__name__)


def time_backend(backend: OnnxRuntimeBackend, batch: np.ndarray, warmup: int, iters: int) -> dict[str, float]:
    """p50/p95/p99 and mean latency in ms of ``backend.infer(batch)``."""
    for _ in range(warmup):
        backend.infer(batch)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        backend.infer(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(times)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2),
            "mean_ms": round(float(arr.mean()), 2), "iterations": iters,
            "images_per_s": round(1e3 * len(batch) / float(p50), 2)}


def preset_latency(preset: str, threads: int, warmup: int, iters: int, batch_size: int = 1) -> dict[str, Any]:
    """Export the preset (random weights) to FP32 and FP16 ONNX and time both on ONNX Runtime CPU."""
    cfg = preset_config(preset)
    cfg.backbone.weights = "none"
    size = cfg.data.image_size
    extractor = FeatureExtractor(cfg.backbone)
    with torch.no_grad():
        feat = extractor(torch.zeros(1, 3, size, size))
    model = GRADModel(feat.shape[1], tuple(feat.shape[-2:]), cfg.model)
    detector = GRADDetector(extractor, model, (size, size)).eval()
    module = ExportModule(detector, extractor.mean, extractor.std).eval()
    batch = (np.random.default_rng(0).random((batch_size, 3, size, size)) * 255).astype(np.float32)
    row: dict[str, Any] = {"preset": preset, "image_size": size, "batch": batch_size, "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        model32 = simplify(export_onnx_fp32(module, fp32_path))
        onnx.save(model32, fp32_path)
        row["onnx_mb"] = round(fp32_path.stat().st_size / 2**20, 1)
        row["fp32"] = time_backend(OnnxRuntimeBackend(fp32_path, ["cpu"], threads), batch, warmup, iters)
        fp16_path = Path(tmp) / "model.fp16.onnx"
        onnx.save(convert_to_fp16(model32)[0], fp16_path)
        row["fp16"] = time_backend(OnnxRuntimeBackend(fp16_path, ["cpu"], threads), batch, warmup, iters)
    log.info("%s: FP32 p50 %.1f ms, FP16 p50 %.1f ms", preset, row["fp32"]["p50_ms"], row["fp16"]["p50_ms"])
    return row


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--preset", "presets", multiple=True, type=click.Choice(PRESETS), help="[default: edge]")
@click.option("--threads", type=int, default=2, help="ONNX Runtime intra-op threads.")
@click.option("--batch", "batch_size", type=int, default=1)
@click.option("--warmup", type=int, default=5)
@click.option("--iters", type=int, default=50)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="benchmarks/results/onnx_cpu_latency.json")
@user_errors_as_exit
def main(presets: tuple[str, ...], threads: int, batch_size: int, warmup: int, iters: int, output: str) -> None:
    """Time each preset's exported ONNX graph on ONNX Runtime CPU and write JSON."""
    setup_logging()
    import onnxruntime

    rows = [preset_latency(p, threads, warmup, iters, batch_size) for p in (presets or ("edge",))]
    result = {"device": "cpu", "processor": platform.processor() or platform.machine(),
              "onnxruntime": onnxruntime.__version__, "torch_export": torch.__version__, "rows": rows}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
