"""``grad-export build``: a TensorRT engine for a bundle, stamped into bundle.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gradad.bundle import FP16_ONNX, FP32_ONNX, file_entry, read_manifest, verify_files, write_manifest
from gradad.export.fp16 import COORDINATE_BRANCH
from gradad.export.tensorrt_build import EngineBuildConfig, TensorRTUnavailable, build_engine, gpu_identity, \
    import_tensorrt

log = logging.getLogger(__name__)


def build_bundle_engine(bundle_dir: str | Path, fp16: bool = True, max_batch: int = 8, opt_batch: int = 1,
                        workspace_mib: int = 2048, timing_cache: str | None = None) -> dict[str, Any]:
    """Build, stamp and register an engine; TensorRT or GPU absence is a one-line error naming what exists."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest, [FP32_ONNX] + ([FP16_ONNX] if FP16_ONNX in manifest["files"] else []))
    try:
        trt = import_tensorrt()
        gpu = gpu_identity()
    except TensorRTUnavailable as exc:
        onnx_files = ", ".join(sorted(manifest["files"]))
        raise TensorRTUnavailable(f"{exc}; no engine built. The bundle {bundle_dir} still holds {onnx_files} "
                                  f"for ONNX Runtime (grad-run --backend onnxruntime)") from exc
    cfg = EngineBuildConfig(fp16=fp16, opt_batch=opt_batch, max_batch=max_batch, workspace_mib=workspace_mib,
                            timing_cache=timing_cache or str(bundle_dir / "timing.cache"),
                            fp32_layer_name_patterns=(COORDINATE_BRANCH,))
    inp = manifest["input"]
    fp16_onnx = bundle_dir / FP16_ONNX if FP16_ONNX in manifest["files"] else None
    stamp = build_engine(bundle_dir / FP32_ONNX, bundle_dir, inp["name"], (3, inp["height"], inp["width"]), cfg,
                         fp16_onnx_path=fp16_onnx, trt=trt, gpu=gpu)
    # Engine vs ONNX Runtime parity needs the TensorRT runtime backend; recorded as not run until it exists.
    stamp["parity_vs_onnxruntime"] = None
    manifest["engines"] = [e for e in manifest["engines"] if e["file"] != stamp["file"]] + [stamp]
    manifest["files"][stamp["file"]] = file_entry(bundle_dir / stamp["file"])
    write_manifest(bundle_dir, manifest)
    return stamp
