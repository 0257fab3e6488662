"""``grad-bench latency --grad-run N``: the whole ``grad-run`` loop, today's against the new one, in one run.

Rows (each a ``grad-run --benchmark`` subprocess per batch size, ONNX Runtime CPU, the same threads):

* today: ``--serial`` (decode, preprocess, inference, sinks one after another) on a schema-1 copy of the bundle
  whose graph takes float32 frames (the host converts every frame to float32), FP32;
* new: the pipelined loop (capture, inference, sinks on three threads) on the bundle itself (uint8 frames into
  the graph), for each precision the bundle has (FP32, FP16, INT8).

Each row has FPS and stage percentiles per batch size (``by_batch``); pipelined rows also have ``batch1_paced``,
a batch-1 run with frames handed out at ``pace_fps`` (0: half the row's own batch-1 FPS; a camera below
saturation), whose ``end_to_end`` p50 is the
capture -> JSON-line latency a line sees (unpaced file runs queue frames, so their end-to-end time measures the
queue, not the loop).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx

from gradad.bundle import FP32_ONNX, ONNX_BY_PRECISION, Bundle, FileEntry
from gradad.errors import GradError

log = logging.getLogger(__name__)

THRESHOLD = "1.0"  # decisions do not change the timing; the bundle need not be calibrated
WARMUP_FRAMES = 10


def today_bundle(bundle: str, work: Path) -> Path:
    """A schema-1 copy of ``bundle`` (float32 input graph, FP32 only): today's contract, run by this gradad."""
    from gradad.export.variants import float_input_variant

    src, dst = Path(bundle), work / "today_bundle"
    if dst.exists():
        return dst
    dst.mkdir()
    onnx.save(float_input_variant(onnx.load(src / FP32_ONNX)), dst / FP32_ONNX)
    bundle = Bundle.load(src)
    bundle.schema_version, bundle.input.dtype, bundle.engines, bundle.refine = 1, "float32", [], None
    bundle.files = {FP32_ONNX: FileEntry.of(dst / FP32_ONNX)}
    bundle.save(dst)
    return dst


def run_grad_run(bundle: Path, images: str, frames: int, batch: int, threads: int, precision: str, serial: bool,
                 pace_fps: float, out: Path) -> dict[str, Any]:
    """One ``grad-run --benchmark`` in a fresh process; returns its summary JSON."""
    cmd = [sys.executable, "-m", "gradad.runtime.cli", str(bundle), "--source", images, "--backend", "onnxruntime",
           "--precision", precision, "--threads", str(threads), "--batch", str(batch), "--benchmark", str(frames),
           "--warmup", str(WARMUP_FRAMES), "--threshold", THRESHOLD, "--stats-every", "0", "--benchmark-out",
           str(out)]
    cmd += ["--serial"] if serial else []
    cmd += ["--pace", str(pace_fps)] if pace_fps else []
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GradError(f"grad-run benchmark ({' '.join(cmd[3:])}) failed (exit {proc.returncode}): {tail}")
    return json.loads(out.read_text())


def _by_batch(summary: dict[str, Any], batch: int) -> dict[str, Any]:
    return {"batch": batch, "fps": summary["fps"], "images": summary["frames"],
            "iterations": summary["frames"] // batch, "latency_ms": summary["latency_ms"]}


def grad_run_row(cfg: Any, bundle: Path, images: str, work: Path, precision: str, serial: bool, label: str
                 ) -> dict[str, Any]:
    """One row: the loop at every batch size, plus a paced batch-1 run for the pipelined loop."""
    typed = Bundle.load(bundle)
    by_batch, loads = [], []
    for batch in cfg.batches:
        s = run_grad_run(bundle, images, cfg.grad_run_frames, batch, cfg.threads, precision, serial, 0.0,
                         work / "grad_run.json")
        by_batch.append(_by_batch(s, batch))
        loads.append(s["load_average_1min"])
        log.info("%s batch %d: %.1f FPS, total p50 %.2f ms", label, batch, s["fps"], s["latency_ms"]["total"]["p50"])
    best = max(by_batch, key=lambda r: r["fps"])
    row = {"label": label, "method": "grad", "preset": typed.preset, "backend": "grad-run",
           "precision": precision, "device": "cpu", "image_size": typed.input.height,
           "bundle": str(bundle), "threads": cfg.threads, "loop": "serial" if serial else "pipelined",
           "path": "today" if serial else "new", "by_batch": by_batch,
           "batch1": next((r for r in by_batch if r["batch"] == 1), None), "best_batch": best["batch"],
           "best_fps": best["fps"], "peak_rss_mb": s.get("peak_rss_mb") or 0.0,
           "load_average_1min": [min(loads), max(loads)]}
    if not serial and row["batch1"] is not None:
        # Below saturation: the given rate, or (0) half the row's own batch-1 throughput on this machine right now.
        pace = cfg.pace_fps or round(row["batch1"]["fps"] / 2, 1)
        paced = run_grad_run(bundle, images, cfg.grad_run_frames, 1, cfg.threads, precision, False, pace,
                             work / "grad_run.json")
        row["batch1_paced"] = {**_by_batch(paced, 1), "pace_fps": pace}
        log.info("%s paced at %.1f FPS: end-to-end p50 %.2f ms", label, pace, paced["latency_ms"]["end_to_end"]["p50"])
    return row


def grad_run_rows(cfg: Any, images: str, work: Path) -> list[dict[str, Any]]:
    """Today's serial float loop, then the pipelined loop for each precision the bundle has."""
    bundle = Bundle.load(cfg.bundle)
    preset = bundle.preset
    rows = [grad_run_row(cfg, today_bundle(cfg.bundle, work), images, work, "fp32", True,
                         f"GRAD {preset} · today: grad-run serial, float32 input, ORT CPU FP32")]
    for precision in ("fp32", "fp16", "int8"):
        if ONNX_BY_PRECISION[precision] in bundle.files:
            rows.append(grad_run_row(cfg, Path(cfg.bundle), images, work, precision, False,
                                     f"GRAD {preset} · grad-run pipelined, uint8 input, ORT CPU "
                                     f"{precision.upper()}"))
    shutil.rmtree(work / "today_bundle", ignore_errors=True)
    return rows
