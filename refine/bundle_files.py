"""The refinement part of a model bundle: the PyTorch model file, the pixel prior and the stored config.

``grad-refine prepare`` writes them beside the ONNX files and records them (with hashes) in bundle.json under
``refine``; the refinement worker loads them back. The checkpoint is checked against the bundle's ONNX model on
real images first, so the refiner always differentiates the same model the line runs.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gradad.bundle import FP32_ONNX, BundleError, file_entry, read_manifest, verify_files, write_manifest
from gradad.errors import GradError
from gradad.refine.config import RefineConfig, refine_config_from_dict
from gradad.refine.prior import PRIOR_FILE, PixelPrior, fit_pixel_prior

log = logging.getLogger(__name__)

MODEL_FILE = "refine_model.pt"
# ONNX FP32 and PyTorch maps must agree to this relative max error before a checkpoint is accepted; looser than the
# export gate (1e-4) because this check runs on whatever CPU/GPU the user prepares on.
CHECKPOINT_MATCH_TOLERANCE = 1e-3
# The feature loss floor: this quantile of the anomaly-map pixels of the first images of the training sample.
NORMAL_LEVEL_QUANTILE = 0.99
NORMAL_LEVEL_IMAGES = 16


@dataclass
class RefineParts:
    """Everything :class:`gradad.refine.refiner.Refiner` needs from a bundle."""

    model_path: Path
    prior: PixelPrior
    config: RefineConfig
    pixel_threshold: float
    mean: list[float]
    std: list[float]
    normal_level: float  # anomaly-map level of good training images (feature loss floor)


def _not_prepared(bundle_dir: Path) -> BundleError:
    return BundleError(f"bundle {bundle_dir} is not prepared for refinement; run: grad-refine prepare --bundle "
                       f"{bundle_dir} --checkpoint MODEL.pt --data TRAIN_ROOT")


def load_refine_parts(bundle_dir: str | Path, pixel_threshold: float | None = None) -> RefineParts:
    """Verify and read the refinement files of a bundle (no torch needed)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    section = manifest.get("refine")
    if not section:
        raise _not_prepared(bundle_dir)
    verify_files(bundle_dir, manifest, [section["model"], section["pixel_prior"]])
    if pixel_threshold is None:
        cal = manifest.get("calibration") or {}
        pixel_threshold = cal.get("pixel_threshold")
        if pixel_threshold is None:
            raise BundleError(f"bundle {bundle_dir} has no calibrated pixel threshold; run grad-calibrate first "
                              "or give a pixel threshold explicitly")
    norm = manifest["input"]["normalisation"]
    return RefineParts(bundle_dir / section["model"], PixelPrior.load(bundle_dir / section["pixel_prior"]),
                       refine_config_from_dict(section.get("config", {})), float(pixel_threshold),
                       list(norm["mean"]), list(norm["std"]), float(section.get("normal_map_level", 0.0)))


def training_pixels(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float], count: int,
                    seed: int = 0) -> np.ndarray:
    """A uniform sample of ``count`` normalised RGB pixels from uint8 images."""
    stacked = np.concatenate([np.asarray(im).reshape(-1, 3) for im in images])
    rng = np.random.default_rng(seed)
    pick = stacked[rng.choice(len(stacked), size=min(count, len(stacked)), replace=False)]
    return (pick.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


def check_checkpoint_matches(bundle_dir: Path, checkpoint: Path, images: np.ndarray, mean: Sequence[float],
                             std: Sequence[float]) -> tuple[float, np.ndarray]:
    """Max |map_torch - map_onnx| / max(1, |map|) over ``images`` (raises above tolerance), and the ONNX maps."""
    from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from gradad.training.checkpoint import load_detector
    from gradad.training.features import to_tensor
    import torch

    detector, _ = load_detector(checkpoint)
    with torch.no_grad():
        _, torch_map = detector(to_tensor(images, mean, std))
    torch_map = torch_map[:, 0].numpy()
    backend = OnnxRuntimeBackend(bundle_dir / FP32_ONNX, None, 0, len(images))
    _, onnx_map = backend.infer(images.astype(np.float32).transpose(0, 3, 1, 2))
    onnx_map = np.asarray(onnx_map).reshape(torch_map.shape)
    error = float(np.abs(torch_map - onnx_map).max() / max(1.0, float(np.abs(onnx_map).max())))
    if error > CHECKPOINT_MATCH_TOLERANCE:
        raise GradError(f"{checkpoint} is not the model exported to {bundle_dir / FP32_ONNX}: anomaly maps differ by "
                        f"{error:.2e} (relative max, tolerance {CHECKPOINT_MATCH_TOLERANCE:.0e})")
    return error, onnx_map


def prepare_bundle(bundle_dir: str | Path, checkpoint: str | Path, train_images: np.ndarray,
                   config: RefineConfig | None = None) -> dict[str, Any]:
    """Check the checkpoint against the bundle, fit the pixel prior, copy the files in and update bundle.json.

    ``train_images`` (N, H, W, 3) uint8 good training images at the model input size.
    """
    bundle_dir, checkpoint = Path(bundle_dir), Path(checkpoint)
    config = config or RefineConfig()
    manifest = read_manifest(bundle_dir)
    if not checkpoint.is_file():
        raise GradError(f"checkpoint not found: {checkpoint}")
    h, w = manifest["input"]["model_height"], manifest["input"]["model_width"]
    if train_images.shape[1:3] != (h, w):
        raise GradError(f"training images are {train_images.shape[1:3]}, the bundle's model input is {(h, w)}")
    norm = manifest["input"]["normalisation"]
    error, maps = check_checkpoint_matches(bundle_dir, checkpoint, train_images[:NORMAL_LEVEL_IMAGES],
                                           norm["mean"], norm["std"])
    normal_level = float(np.quantile(maps, NORMAL_LEVEL_QUANTILE))
    pixels = training_pixels(train_images, norm["mean"], norm["std"], config.mog_pixels)
    prior = fit_pixel_prior(pixels, config.mog_components, config.mog_em_iterations, config.mog_covariance_floor)
    prior.save(bundle_dir / PRIOR_FILE)
    tmp = bundle_dir / f".{MODEL_FILE}.tmp"
    shutil.copyfile(checkpoint, tmp)
    tmp.replace(bundle_dir / MODEL_FILE)
    manifest["files"][MODEL_FILE] = file_entry(bundle_dir / MODEL_FILE)
    manifest["files"][PRIOR_FILE] = file_entry(bundle_dir / PRIOR_FILE)
    manifest["refine"] = {
        "model": MODEL_FILE,
        "pixel_prior": PRIOR_FILE,
        "prepared": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_vs_onnx_max_rel_error": error,
        "normal_map_level": normal_level,
        "normal_map_level_rule": f"{NORMAL_LEVEL_QUANTILE} quantile of the anomaly map on {len(maps)} training images",
        "prior": {"components": len(prior.means), "pixels": len(pixels), "images": len(train_images),
                  "mean_log_likelihood": prior.mean_log_likelihood},
        "config": config.to_dict(),
    }
    write_manifest(bundle_dir, manifest)
    log.info("bundle %s prepared for refinement (checkpoint matches ONNX to %.1e; prior: %d components on %d "
             "pixels)", bundle_dir, error, len(prior.means), len(pixels))
    return manifest["refine"]
