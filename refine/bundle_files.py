"""The refinement part of a model bundle: the PyTorch model file, the pixel prior and the stored config.

``grad-refine prepare`` writes them beside the ONNX files and records them (with hashes) in bundle.json under
``refine``; the refinement worker loads them back. The checkpoint is checked against the bundle's ONNX model on
real images first, so the refiner always differentiates the same model the line runs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gradad.bundle import FP32_ONNX, Bundle, BundleError, RefineSection, check_threshold, sha256_file
from gradad.errors import ConfigError, GradError
from gradad.refine.config import CLASS_SETTINGS, RefineConfig, refine_config_from_dict
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
    feature_scale: float  # fixed divisor of the feature loss (the calibrated pixel threshold at preparation)
    class_settings: dict[str, dict[str, Any]]  # per-class tuned RefineConfig overrides (grad-refine tune)
    pixel_threshold_given: bool = False  # passed in explicitly: wins over tuned per-class coarse thresholds


def _not_prepared(bundle_dir: Path, why: str = "is not prepared for refinement") -> BundleError:
    return BundleError(f"bundle {bundle_dir} {why}; run: grad-refine prepare --bundle {bundle_dir} "
                       f"--checkpoint MODEL.pt --data TRAIN_ROOT")


def load_refine_parts(bundle_dir: str | Path, pixel_threshold: float | None = None) -> RefineParts:
    """Verify and read the refinement files of a bundle (no torch needed)."""
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    section = bundle.refine
    if section is None or section.empty:
        raise _not_prepared(bundle_dir)
    if section.model is None or section.pixel_prior is None:
        raise _not_prepared(bundle_dir, "has a malformed 'refine' section in bundle.json")
    try:
        bundle.verify([section.model, section.pixel_prior])
    except BundleError as exc:
        raise _not_prepared(bundle_dir, f"has a missing or modified refinement file ({exc})") from exc
    calibrated_pixel = bundle.calibration.pixel_threshold if bundle.calibration else None
    pixel_threshold_given = pixel_threshold is not None
    if pixel_threshold is None:
        pixel_threshold = calibrated_pixel
        if pixel_threshold is None:
            raise BundleError(f"bundle {bundle_dir} has no calibrated pixel threshold: run grad-calibrate on it "
                              "first")
    pixel_threshold = check_threshold(pixel_threshold, "--pixel-threshold")
    # Bundles prepared before the scale was stored: the calibrated threshold (never the one passed in).
    feature_scale = section.feature_scale or calibrated_pixel
    feature_scale = check_threshold(feature_scale if feature_scale is not None else pixel_threshold,
                                    "refine.feature_scale")
    classes = section.classes or {}
    if not isinstance(classes, dict) or not all(isinstance(v, dict) for v in classes.values()):
        raise _not_prepared(bundle_dir, "has a malformed 'refine.classes' section in bundle.json")
    class_settings = {name: {k: v for k, v in values.items() if k in CLASS_SETTINGS}
                      for name, values in classes.items()}
    unknown = sorted({k for values in classes.values() for k in values} - set(CLASS_SETTINGS))
    if unknown:  # tuned by a newer gradad: the other settings were tuned together with these
        log.warning("bundle %s: refine.classes setting(s) %s unknown to this gradad, ignored; re-run grad-refine tune "
                    "with this version", bundle_dir, ", ".join(unknown))
    norm = bundle.input.normalisation
    if not isinstance(section.config or {}, dict):
        raise _not_prepared(bundle_dir, "has a malformed 'refine.config' section in bundle.json")
    try:
        config = refine_config_from_dict(section.config or {})
    except ConfigError as exc:
        raise ConfigError(f"{bundle_dir}/bundle.json refine.config: {exc}") from None
    return RefineParts(bundle.file(section.model), PixelPrior.load(bundle.file(section.pixel_prior)),
                       config, pixel_threshold,
                       list(norm.mean), list(norm.std), float(section.normal_map_level or 0.0),
                       float(feature_scale), class_settings, pixel_threshold_given)


def write_class_settings(bundle_dir: str | Path, classes: dict[str, dict[str, Any]],
                         tuning: dict[str, dict[str, Any]]) -> None:
    """Store per-class tuned settings (``CLASS_SETTINGS`` keys) and per-class tuning records (evidence and the
    images used, so benchmarks can leave them out) in bundle.json's refine section; other classes' entries (a
    unified bundle tuned one dataset at a time) are kept."""
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    if bundle.refine is None or bundle.refine.empty:
        raise _not_prepared(bundle_dir)
    bundle.refine.classes = {**(bundle.refine.classes or {}), **classes}
    bundle.refine.tuning = {**(bundle.refine.tuning or {}), **tuning}
    bundle.save()


def tuning_images(bundle_dir: str | Path) -> set[str]:
    """Resolved paths of the labelled images ``grad-refine tune`` used (never to be scored). Bundles tuned before
    paths were recorded resolved hold them as given then, resolved here from the current folder."""
    section = Bundle.load(bundle_dir).refine or RefineSection()
    return {str(Path(path).resolve()) for record in (section.tuning or {}).values()
            for path in record.get("images", [])}


def training_pixels(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float], count: int,
                    seed: int = 0) -> np.ndarray:
    """A uniform sample of ``count`` normalised RGB pixels from uint8 images."""
    stacked = np.concatenate([np.asarray(im).reshape(-1, 3) for im in images])
    rng = np.random.default_rng(seed)
    pick = stacked[rng.choice(len(stacked), size=min(count, len(stacked)), replace=False)]
    return (pick.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


def check_checkpoint_matches(onnx_path: Path, detector: Any, images: np.ndarray, mean: Sequence[float],
                             std: Sequence[float], checkpoint: Path) -> tuple[float, np.ndarray]:
    """Max |map_torch - map_onnx| / max(1, |map|) over ``images`` (raises above tolerance), and the
    feature-resolution maps of the torch model (what the refiner's feature loss sees). ``onnx_path``: the bundle's
    verified FP32 model (``Bundle.verify`` first: a handed-over bundle's file may be a symlink out of it)."""
    from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from gradad.training.features import to_tensor
    import torch

    with torch.no_grad():
        batch = to_tensor(images, mean, std)
        _, torch_map = detector(batch)
        lowres = detector.lowres_map(batch).numpy()
    torch_map = torch_map[:, 0].numpy()
    backend = OnnxRuntimeBackend(onnx_path, None, 0, len(images))
    try:
        _, onnx_map = backend.infer(images.astype(np.float32).transpose(0, 3, 1, 2))
    finally:
        backend.close()
    onnx_map = np.asarray(onnx_map).reshape(torch_map.shape)
    error = float(np.abs(torch_map - onnx_map).max() / max(1.0, float(np.abs(onnx_map).max())))
    if error > CHECKPOINT_MATCH_TOLERANCE:
        raise GradError(f"{checkpoint} is not the model exported to {onnx_path}: anomaly maps differ by "
                        f"{error:.2e} (relative max, tolerance {CHECKPOINT_MATCH_TOLERANCE:.0e})")
    return error, lowres


def _is_refine_file(name: str) -> bool:
    """Whether ``name`` is a file a preparation writes: ``refine_model[.<hash>].pt`` or ``pixel_prior[.<hash>].npz``
    at the top of the bundle folder (no folder part)."""
    return bool(re.fullmatch(rf"(?:{re.escape(Path(MODEL_FILE).stem)}(?:\.[0-9a-f]{{12}})?\.pt|"
                             rf"{re.escape(Path(PRIOR_FILE).stem)}(?:\.[0-9a-f]{{12}})?\.npz)", name))


def _hashed_name(path: Path, stem: str, suffix: str) -> str:
    """``stem.<first 12 hex of sha256>.suffix``: a new preparation never overwrites the files the current
    bundle.json points at, so the bundle stays valid if preparation stops half-way."""
    return f"{stem}.{sha256_file(path)[:12]}{suffix}"


def prepare_bundle(bundle_dir: str | Path, checkpoint: str | Path, train_images: np.ndarray,
                   config: RefineConfig | None = None) -> RefineSection:
    """Check the checkpoint against the bundle, fit the pixel prior, add the files and update bundle.json.

    ``train_images`` (N, H, W, 3) uint8 good training images at the model input size. The model file written
    embeds the extractor weights, so the refinement worker needs neither the weight packages nor the training
    machine's paths. Files of an earlier preparation are removed only after the new bundle.json is written.
    """
    from gradad.training.checkpoint import atomic_torch_save, load_detector, self_contained_payload

    bundle_dir, checkpoint = Path(bundle_dir), Path(checkpoint)
    config = config or RefineConfig()
    bundle = Bundle.load(bundle_dir)
    if not checkpoint.is_file():
        raise GradError(f"checkpoint not found: {checkpoint}")
    if bundle.input.hw != bundle.input.model_hw:
        raise GradError(f"bundle {bundle_dir} resizes inside the graph (exported with --input-size); refinement "
                        "needs a bundle whose input is the model size")
    h, w = bundle.input.model_hw
    if train_images.shape[1:3] != (h, w):
        raise GradError(f"training images are {train_images.shape[1:3]}, the bundle's model input is {(h, w)}")
    norm = bundle.input.normalisation
    detector, _ = load_detector(checkpoint)
    bundle.verify([FP32_ONNX])
    error, lowres = check_checkpoint_matches(bundle.file(FP32_ONNX), detector, train_images[:NORMAL_LEVEL_IMAGES],
                                             norm.mean, norm.std, checkpoint)
    normal_level = float(np.quantile(lowres, NORMAL_LEVEL_QUANTILE))
    calibrated = bundle.calibration.pixel_threshold if bundle.calibration else None
    feature_scale, scale_rule = ((float(calibrated), "calibrated pixel threshold at preparation") if calibrated
                                 else (float(lowres.max()), "maximum of the feature-resolution map on the training "
                                                            "sample (bundle not calibrated at preparation)"))
    pixels = training_pixels(train_images, norm.mean, norm.std, config.mog_pixels)
    prior = fit_pixel_prior(pixels, config.mog_components, config.mog_em_iterations, config.mog_covariance_floor)
    old = bundle.refine or RefineSection()
    # Only files an earlier preparation wrote are dropped: bundle.json's refine names are not trusted to name
    # them (a handed-over bundle could name model.onnx, or a path through a symlink out of the folder).
    stale = list(dict.fromkeys(n for n in (old.model, old.pixel_prior)  # one name may be given twice
                               if n and n in bundle.files and _is_refine_file(n)))
    tmp_prior, tmp_model = bundle_dir / f".{PRIOR_FILE}.tmp", bundle_dir / f".{MODEL_FILE}.tmp"
    try:
        prior.save(tmp_prior)
        atomic_torch_save(self_contained_payload(checkpoint), tmp_model)
        prior_name = _hashed_name(tmp_prior, Path(PRIOR_FILE).stem, ".npz")
        model_name = _hashed_name(tmp_model, Path(MODEL_FILE).stem, ".pt")
        tmp_prior.replace(bundle_dir / prior_name)
        tmp_model.replace(bundle_dir / model_name)
    finally:
        for tmp in (tmp_prior, tmp_model):
            tmp.unlink(missing_ok=True)
    stale = [n for n in stale if n not in (prior_name, model_name)]
    for name in stale:
        bundle.files.pop(name)
    bundle.add_file(model_name)
    bundle.add_file(prior_name)
    bundle.refine = RefineSection(
        model=model_name,
        pixel_prior=prior_name,
        source_checkpoint=str(checkpoint),
        prepared=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        checkpoint_vs_onnx_max_rel_error=error,
        normal_map_level=normal_level,
        normal_map_level_rule=f"{NORMAL_LEVEL_QUANTILE} quantile of the feature-resolution anomaly map on "
                              f"{min(len(train_images), NORMAL_LEVEL_IMAGES)} training images",
        feature_scale=feature_scale,
        feature_scale_rule=scale_rule,
        prior={"components": len(prior.means), "pixels": len(pixels), "images": len(train_images),
               "mean_log_likelihood": prior.mean_log_likelihood},
        config=config.to_dict(),
    )
    bundle.save()
    for name in stale:  # the previous preparation's files, now unreferenced
        try:
            bundle.file(name).unlink(missing_ok=True)
        except BundleError as exc:
            log.warning("left %s in place: %s", name, exc)
    log.info("bundle %s prepared for refinement (checkpoint matches ONNX to %.1e; prior: %d components on %d "
             "pixels)", bundle_dir, error, len(prior.means), len(pixels))
    return bundle.refine
