"""Parity gates between PyTorch, ONNX Runtime FP32 and FP16 (DESIGN.md section 6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradad.errors import GradError
from gradad.evaluation.metrics import auroc


class ParityError(GradError):
    """An exported model whose outputs drift too far from the reference: the bundle is not written."""


@dataclass(frozen=True)
class ParityGates:
    """Thresholds a bundle must meet.

    FP32 errors are relative to max(1, largest |reference|) so they hold for any map scale. FP16 errors are
    relative L2 norms over the whole parity set: in models whose map keeps the refinement's hard mask
    (M = [0.05 m < 0.5]) it can flip where m sits near its threshold, so single pixels or single images may move more than the set does; the per-image
    maxima are reported, and the image-AUROC change guards the decisions themselves.
    """

    fp32_max_abs: float = 1e-4
    fp16_map_rel_l2: float = 2e-2
    fp16_score_rel_l2: float = 1e-2
    fp16_auroc_max_drop: float = 0.01
    # INT8 (grad-export quantize) against the FP32 ONNX: coarser than FP16, but the decisions must hold.
    int8_map_rel_l2: float = 0.15
    int8_score_rel_l2: float = 0.10
    int8_auroc_max_drop: float = 0.005  # 0.5 AUROC point


def _nonfinite(*arrays: np.ndarray) -> int:
    """How many NaN / inf values the arrays hold together (an FP16 overflow, a 0/0 in a cosine)."""
    return int(sum(np.size(a) - np.count_nonzero(np.isfinite(a)) for a in arrays))


def _exceeds(value: float, gate: float) -> bool:
    """True when an error is above its gate or not a number (``nan > gate`` is False: NaN must fail, not pass)."""
    return not np.isfinite(value) or value > gate


def _nonfinite_failure(report: dict[str, Any], what: str) -> list[str]:
    """The gate every report shares: no NaN / inf in the candidate's outputs or the reference's."""
    n, n_ref = report.get("nonfinite", 0), report.get("nonfinite_reference", 0)
    out = []
    if n:
        out.append(f"{what} outputs hold {n} NaN/inf values")
    if n_ref:
        out.append(f"the reference outputs {what} is compared with hold {n_ref} NaN/inf values")
    return out


def compare_fp32(ref_scores: np.ndarray, ref_maps: np.ndarray, scores: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
    """Absolute errors of an FP32 export against the reference (PyTorch)."""
    map_err = np.abs(maps.astype(np.float64) - ref_maps)
    score_err = np.abs(scores.astype(np.float64) - ref_scores)
    scale = max(1.0, float(np.abs(ref_maps).max()), float(np.abs(ref_scores).max()))
    return {
        "n_images": int(len(scores)),
        "nonfinite": _nonfinite(scores, maps),
        "nonfinite_reference": _nonfinite(ref_scores, ref_maps),
        "map_max_abs": float(map_err.max()),
        "map_mean_abs": float(map_err.mean()),
        "score_max_abs": float(score_err.max()),
        "score_mean_abs": float(score_err.mean()),
        "scale": scale,
        "max_abs_over_scale": float(max(map_err.max(), score_err.max()) / scale),
    }


def compare_fp16(ref_scores: np.ndarray, ref_maps: np.ndarray, scores: np.ndarray, maps: np.ndarray,
                 labels: np.ndarray | None) -> dict[str, Any]:
    """Relative errors of the FP16 export against FP32, and the image-AUROC change where labels exist."""
    ref_maps64, maps64 = ref_maps.astype(np.float64), maps.astype(np.float64)
    diff = np.abs(maps64 - ref_maps64)
    out: dict[str, Any] = {
        "n_images": int(len(scores)),
        "nonfinite": _nonfinite(scores, maps),
        "nonfinite_reference": _nonfinite(ref_scores, ref_maps),
        "map_rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref_maps64), 1e-12)),
        "map_max_rel": float(diff.max() / max(np.abs(ref_maps64).max(), 1e-12)),
        "score_rel_l2": float(np.linalg.norm(scores.astype(np.float64) - ref_scores)
                              / max(np.linalg.norm(ref_scores.astype(np.float64)), 1e-12)),
        "score_max_rel": float(np.max(np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12))),
        "auroc_fp32": None,
        "auroc_fp16": None,
        "auroc_change": None,
    }
    if labels is not None and 0 < labels.sum() < len(labels) and not out["nonfinite"] + out["nonfinite_reference"]:
        a32, a16 = auroc(labels, ref_scores), auroc(labels, scores)
        out.update(auroc_fp32=float(a32), auroc_fp16=float(a16), auroc_change=float(a16 - a32))
    return out


def check_gates(fp32: dict[str, Any], fp16: dict[str, Any] | None, gates: ParityGates) -> list[str]:
    """Every gate that failed, as readable strings with the numbers (empty = pass)."""
    failed = _nonfinite_failure(fp32, "ONNX FP32")
    if _exceeds(fp32["max_abs_over_scale"], gates.fp32_max_abs):
        failed.append(f"ONNX FP32 vs PyTorch max abs error {fp32['max_abs_over_scale']:.2e} (relative to scale "
                      f"{fp32['scale']:.3g}) > {gates.fp32_max_abs:.0e}")
    if fp16 is not None:
        failed += _nonfinite_failure(fp16, "FP16")
        if _exceeds(fp16["map_rel_l2"], gates.fp16_map_rel_l2):
            failed.append(f"FP16 map relative L2 error {fp16['map_rel_l2']:.2e} > {gates.fp16_map_rel_l2:.0e}")
        if _exceeds(fp16["score_rel_l2"], gates.fp16_score_rel_l2):
            failed.append(f"FP16 score relative L2 error {fp16['score_rel_l2']:.2e} > {gates.fp16_score_rel_l2:.0e}")
        if fp16["auroc_change"] is not None and -fp16["auroc_change"] > gates.fp16_auroc_max_drop:
            failed.append(f"FP16 image AUROC drop {-fp16['auroc_change']:.4f} > {gates.fp16_auroc_max_drop}")
    return failed


def check_int8_gates(report: dict[str, Any], gates: ParityGates, need_auroc: bool = True) -> list[str]:
    """Every INT8 gate that failed (empty = pass). The AUROC gate needs labels: without them it fails unless
    ``need_auroc`` is off (a TensorRT INT8 engine against ONNX Runtime on unlabelled images: the QDQ model
    it is built from passed the AUROC gate)."""
    failed = _nonfinite_failure(report, "INT8")
    if _exceeds(report["map_rel_l2"], gates.int8_map_rel_l2):
        failed.append(f"INT8 map relative L2 error {report['map_rel_l2']:.3f} > {gates.int8_map_rel_l2}")
    if _exceeds(report["score_rel_l2"], gates.int8_score_rel_l2):
        failed.append(f"INT8 score relative L2 error {report['score_rel_l2']:.3f} > {gates.int8_score_rel_l2}")
    change = report.get("auroc_change")
    if change is None and need_auroc:
        failed.append("INT8 image AUROC not measured (the parity set needs good and defective images)")
    elif change is not None and -change > gates.int8_auroc_max_drop:
        failed.append(f"INT8 image AUROC drop {-change:.4f} ({report['auroc_fp32']:.4f} -> "
                      f"{report.get('auroc_int8', report.get('auroc_fp16')):.4f}) > {gates.int8_auroc_max_drop}")
    return failed


def gates_dict(gates: ParityGates) -> dict[str, float]:
    return asdict(gates)
