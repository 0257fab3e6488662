"""The refinement part of a model bundle: the PyTorch model file, the pixel prior and the stored config.

``grad-refine prepare`` writes them beside the ONNX files and records them (with hashes) in bundle.json under
``refine``; the refinement worker loads them back. The checkpoint is checked against the bundle's ONNX model on
real images first, so the refiner always differentiates the same model the line runs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
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
# Key of a class's tuning record holding the ``grad-refine tune --set`` values the settings were tuned under.
TUNED_UNDER = "tuned_under_set"
# RefineConfig fields that run time never reads (tuning and preparation only) or that only choose where and how fast
# it runs: a run-time value differing from the one tuned under changes no mask rule, so it is not warned about.
NOT_RUN_TIME = frozenset({
    "lambda0_breakeven_quantile", "lambda0_breakeven_factor", "lambda0_min", "mog_components", "mog_em_iterations",
    "mog_pixels", "mog_covariance_floor", "coarse_good_pixel_rate", "coarse_threshold_images",
    "start_peak_candidates", "start_peak_margin", "mask_tau_quantiles", "mask_tau_images", "mask_relative_candidates",
    "keep_interior_candidates", "mask_trim_candidates", "mask_trim_margin", "f2pad_margin", "tune_iterations",
    "device", "threads", "max_batch", "time_budget_s"})


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
    # per tuned class, the RefineConfig values grad-refine tune --set changed while tuning it (its tuning record)
    tuned_under: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per class calibrated on its own (grad-calibrate, one --good DIR per class): its pixel threshold; empty when
    # a threshold was passed in (that one then holds for every class)
    class_pixel_thresholds: dict[str, float] = field(default_factory=dict)


def warn_config_differs(parts: RefineParts, config: RefineConfig) -> list[str]:
    """Warn (and return the lines) for every tuned class whose run-time config differs from the ``--set`` values
    its settings were tuned under (keys run time does not read, and the class's own tuned settings, excepted)."""
    lines = []
    for name, recorded in sorted(parts.tuned_under.items()):
        tuned = parts.class_settings.get(name, {})
        differing = []
        for key, value in sorted(recorded.items()):
            if key in NOT_RUN_TIME or key in tuned or not hasattr(config, key):
                continue
            now = getattr(config, key)
            if as_recorded(now) != as_recorded(value):
                differing.append(f"{key}={as_recorded(value)!r} (now {as_recorded(now)!r})")
        if differing:
            lines.append(f"F2PAD settings of class {name!r} were tuned with --set {', '.join(differing)}: pass the "
                         f"same --set to refine as tuned, or re-tune")
            log.warning(lines[-1])
    return lines


def as_recorded(value: Any) -> Any:
    """A config value as bundle.json holds it (tuples become lists), so recorded and live values compare."""
    return list(value) if isinstance(value, tuple) else value


def _not_prepared(bundle_dir: Path, why: str = "is not prepared for refinement", tuned: bool = False) -> BundleError:
    """The error of a bundle without usable refinement files: grad-refine prepare writes them (anew: a ``tuned``
    bundle's tuned settings go with the old ones)."""
    again = " (it drops the tuned F2PAD settings: re-run grad-refine tune after it)" if tuned else ""
    return BundleError(f"bundle {bundle_dir} {why}; run: grad-refine prepare --bundle {bundle_dir} "
                       f"--checkpoint MODEL.pt --data TRAIN_ROOT{again}")


def _check_refine_files(bundle: Bundle, bundle_dir: Path, names: Sequence[str], tuned: bool) -> None:
    """Each refinement file listed, present and unmodified, else one line naming it and grad-refine prepare (which
    writes them anew; Bundle.verify's remedy, a re-export, would not bring them back)."""
    for name in names:
        try:
            path = bundle.file(name)
        except BundleError as exc:  # a name leaving the bundle folder
            raise _not_prepared(bundle_dir, f"names a refinement file it cannot use ({exc})", tuned) from None
        if name not in bundle.files:
            why = f"does not list its refinement file {name} in bundle.json's files"
        elif not path.is_file():
            why = f"misses its refinement file {path}"
        else:
            try:
                bundle.verify([name])
                continue
            except BundleError:
                why = f"has a refinement file {path} that does not match its hash in bundle.json (modified or corrupt)"
        raise _not_prepared(bundle_dir, why, tuned)


def load_refine_parts(bundle_dir: str | Path, pixel_threshold: float | None = None) -> RefineParts:
    """Verify and read the refinement files of a bundle (no torch needed)."""
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    section = bundle.refine
    if section is None or section.empty:
        raise _not_prepared(bundle_dir)
    if section.model is None or section.pixel_prior is None:
        raise _not_prepared(bundle_dir, "has a malformed 'refine' section in bundle.json")
    _check_refine_files(bundle, bundle_dir, [section.model, section.pixel_prior], bool(section.classes))
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
    tuning = section.tuning if isinstance(section.tuning, dict) else {}
    class_pixel = ({} if pixel_threshold_given or bundle.calibration is None
                   else bundle.calibration.class_values("pixel_threshold"))
    _warn_recalibrated(bundle_dir, tuning, class_settings, calibrated_pixel, class_pixel)
    tuned_under = {name: dict(record[TUNED_UNDER]) for name, record in tuning.items()
                   if name in class_settings and isinstance(record, dict) and isinstance(record.get(TUNED_UNDER), dict)}
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
                       float(feature_scale), class_settings, pixel_threshold_given, tuned_under, class_pixel)


def _warn_recalibrated(bundle_dir: Path, tuning: dict[str, Any], class_settings: dict[str, dict[str, Any]],
                       calibrated_pixel: float | None, class_pixel: dict[str, float]) -> None:
    """Warn for each tuned class whose settings were tuned at another calibrated pixel threshold than the class's
    now (its own, else the bundle's; grad-calibrate ran after grad-refine tune): its coarse masks, lambda0 and tau
    were chosen for the old one. A class with a tuned coarse threshold of its own is not affected."""
    if calibrated_pixel is None:
        return
    for name in sorted(class_settings):
        if (class_settings[name].get("coarse_threshold") or 0) > 0:
            continue  # tuned at a coarse threshold of its own (held-out goods): no calibrated one enters its masks
        record = tuning.get(name)
        at = (record.get("coarse_threshold") or {}).get("bundle_pixel_threshold") if isinstance(record, dict) else None
        now = class_pixel.get(name, calibrated_pixel)
        if isinstance(at, (int, float)) and not np.isclose(float(at), float(now), rtol=1e-6, atol=0):
            log.warning("bundle %s: F2PAD settings of class %s were tuned at pixel threshold %.4g, the class is now "
                        "calibrated at %.4g: re-run grad-refine tune --bundle %s --classes %s", bundle_dir, name,
                        float(at), float(now), bundle_dir, name)


def write_class_settings(bundle_dir: str | Path, classes: dict[str, dict[str, Any]],
                         tuning: dict[str, dict[str, Any]]) -> None:
    """Store per-class tuned settings (``CLASS_SETTINGS`` keys) and per-class tuning records (evidence and the
    images used, so benchmarks can leave them out) in bundle.json's refine section; other classes' entries (a
    unified bundle tuned one dataset at a time) are kept. A class given empty settings loses its earlier ones, so
    its settings and its (new) tuning record always belong together."""
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    if bundle.refine is None or bundle.refine.empty:
        raise _not_prepared(bundle_dir)
    merged = {**(bundle.refine.classes or {}), **{k: v for k, v in classes.items() if v}}
    for name in sorted(k for k, v in classes.items() if not v):
        # an empty result (no tuning defect flagged): the old settings would stay active while the new record no
        # longer names the images they were tuned on; drop them so the defaults apply, as the record says
        if merged.pop(name, None) is not None:
            log.warning("%s: no settings tuned; removed its earlier tuned settings from %s, the bundle's default "
                        "settings apply", name, bundle_dir)
    bundle.refine.classes = merged
    bundle.refine.tuning = {**(bundle.refine.tuning or {}), **tuning}
    bundle.save()


def _resolve_tuning_path(entry: str, data_root: str | None) -> Path:
    """A recorded tuning image path, resolved. Relative entries (bundles tuned before paths were recorded resolved)
    are taken against the record's data root when that is absolute; with a relative or no root, both were given from
    the folder grad-refine tune ran in, which only the current folder can stand for."""
    path = Path(entry)
    if path.is_absolute() or not data_root or not Path(data_root).is_absolute():
        return path.resolve()
    return (Path(data_root) / path).resolve()


def tuning_images(bundle_dir: str | Path) -> set[str]:
    """Resolved paths of the labelled images ``grad-refine tune`` used (never to be scored); see
    :func:`_resolve_tuning_path` for relative entries. A recorded image that does not exist after resolving is
    warned about: nothing can leave it out of scoring."""
    section = Bundle.load(bundle_dir).refine or RefineSection()
    out: set[str] = set()
    missing: list[tuple[str, Path]] = []
    for record in (section.tuning or {}).values():
        if not isinstance(record, dict):
            continue
        for entry in record.get("images", []):
            path = _resolve_tuning_path(str(entry), record.get("data"))
            if not path.exists():
                missing.append((str(entry), path))
            out.add(str(path))
    if missing:
        log.warning("bundle %s: %d recorded F2PAD tuning image(s) do not exist (e.g. %s, resolved as %s): they cannot "
                    "be left out of scoring; run from the folder grad-refine tune ran in, or re-tune", bundle_dir,
                    len(missing), *missing[0])
    return out


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
    from gradad.training.checkpoint import (atomic_torch_save, check_checkpoint_file, load_detector,
                                            self_contained_payload)

    bundle_dir, checkpoint = Path(bundle_dir), Path(checkpoint)
    config = config or RefineConfig()
    bundle = Bundle.load(bundle_dir)
    check_checkpoint_file(checkpoint, "--checkpoint")
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
