"""Per-class tuning of F2PAD on a labelled tuning split (``grad-refine tune``). Needs torch.

For each class, on a few labelled defects taken out of the test split (recorded in bundle.json so that benchmarks
leave them out) and on good images:

1. inpainting start: the method whose fill of the start mask looks most normal to GRAD (lowest feature loss);
2. lambda0: the cheap "no defect vs true decomposition" check — per image, the break-even lambda0 at which
   x_n = x (no defect) and x_n = inpaint(x, ground truth) have the same objective; lambda0 =
   ``lambda0_breakeven_factor`` x the ``lambda0_breakeven_quantile`` of the break-evens (the truth wins on most
   tuning images);
3. tau: candidates are the ``mask_tau_quantiles`` of ||a|| after refining good images whose "coarse masks" are
   the tuning defects' ground-truth shapes (the repair noise of a surface that has no defect), in RGB units of
   [0, 1]; the tuning defects are refined once and the candidate with the best mean IoU there is kept, together
   with the per-image relative part, the kept coarse interior and the spur trim of the mask rule;
4. F2PAD or not: when the mask rule's held-out IoU (leave one tuning defect out, choose the rule on the rest,
   score it on the one left out; lambda0, tau's candidate values and the start rule stay fitted on all) does not beat the runtime's coarse mask on the same defects by ``f2pad_margin``,
   the class keeps its coarse masks (``use_f2pad`` false). The best rule's own mean IoU is the best of dozens of
   rules tried on those very images: on 8 tyre defects it beat the coarse mask by 2 points and then lost 2 on the
   scored images.

Every refinement here runs ``tune_iterations`` solver iterations per image, not the run-time wall-clock budget
(:func:`tuning_config`): with the budget, a busy machine gave the same command different settings.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from gradad.refine.config import RefineConfig
from gradad.refine.refiner import Refiner, finish_mask, pixel_mask
from gradad.refine.regions import coarse_mask, dilate, inpaint_start, interior, start_and_core, start_mask

log = logging.getLogger(__name__)

# Inpainting methods compared per class ("mean" makes no texture claims and "navier_stokes" behaves like Telea).
COMPARED_INPAINTS = ("telea", "shift")
TRAINING_SOURCE = "training images"  # good_images_for's source label when no held-out good images exist
TUNING_SEED = 1234  # the tuning split's own seed (benchmarks pick their images from what is left)


def pick_samples(samples: list, per_defect: int, seed: int = 0, exclude: set[str] | None = None) -> list:
    """Up to ``per_defect`` labelled defect samples per (class, defect type), seeded, in a stable order, leaving
    out images ``exclude`` names (0 = all of them): by resolved path, however the data root is spelled, or by a
    ``digest:`` content entry (a bundle's model copy names its defects so)."""
    from gradad.data.tuning_split import sample_matcher

    excluded = sample_matcher(exclude or set())
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for s in samples:
        if s.label == 1 and s.mask_path is not None and not excluded(s):
            groups[(s.class_name, s.defect_type)].append(s)
    rng = np.random.default_rng(seed)
    out = []
    for key in sorted(groups):
        group = groups[key]
        take = sorted(rng.choice(len(group), min(per_defect, len(group)), replace=False)) if per_defect else range(len(group))
        out.extend(group[i] for i in take)
    return out


def without_trained_defects(samples: list, trained: set[str] | None, source: str) -> tuple[list, list]:
    """(``samples`` without the labelled defects the model trained on, those left out); ``trained``: the refiner's
    ``trained_defects`` (from the model file ``source``). Their maps are better than an unseen defect's (on the
    MTD + tyre model, tyre tuning IoU 23-27 against 9-11 on scored images), so settings tuned on them do not
    transfer. A model file that does not record them keeps every sample, with a warning."""
    from gradad.data.tuning_split import partition_by_paths

    if trained is None:
        log.warning("%s does not record which labelled defects its stage 1 trained on (written before gradad "
                    "recorded them): none can be left out of tuning; tune on defects the model never saw", source)
        return samples, []
    kept, left_out = partition_by_paths(samples, trained)
    if left_out:
        log.info("tuning leaves out %d labelled defect(s) the model trained on", len(left_out))
    return kept, left_out


def labelled_arrays(samples: Sequence, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images and (N, size, size) bool ground-truth masks of dataset samples."""
    from gradad.data.images import load_sample_arrays

    arrays = [load_sample_arrays(s, size) for s in samples]
    return np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays]).astype(bool)


def good_images_for(data_root: str | Path, class_name: str, size: int, count: int,
                    folder: str | Path | None = None) -> tuple[list[np.ndarray], str]:
    """Up to ``count`` good images of a class for the coarse threshold and the tau calibration: ``folder`` when
    given (held-out good images of this class), else ``<class>/validation/good`` when the dataset has it, else
    training images (seeded pick); and where they came from."""
    from gradad.data.datasets import list_image_files, load_samples
    from gradad.data.images import read_image_rgb, resize_image

    folder = Path(folder) if folder is not None else Path(data_root) / class_name / "validation" / "good"
    if folder.is_dir():
        files, source = list_image_files(folder), str(folder)
    else:
        files = [s.image_path for s in load_samples(data_root, "train", [class_name]) if s.label == 0]
        source = f"{class_name} {TRAINING_SOURCE}"
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(files), min(count, len(files)), replace=False))
    return [resize_image(read_image_rgb(files[i]), size) for i in picked], source


def _terms(refiner: Refiner, image: np.ndarray, x_n_image: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """Objective terms (no lambda) of the decomposition x_n = ``x_n_image`` of ``image`` over ``region``."""
    x = refiner._normalise(image[None])
    x_n = refiner._normalise(x_n_image[None])
    r = torch.from_numpy(region[None, None].astype(np.float32)).to(refiner.device)
    with torch.no_grad():
        terms = refiner.objective(x_n, x, r, torch.zeros(1, device=refiner.device),
                                  refiner.readout_weights(1, *image.shape[:2]))
    return {k: float(v[0]) for k, v in terms.items()}


def breakeven_lambda0(refiner: Refiner, image: np.ndarray, truth: np.ndarray, coarse: np.ndarray,
                      config: RefineConfig) -> dict[str, float]:
    """Objective of "no defect" vs the true decomposition, and the lambda0 at which they are equal.

    lambda follows the paper's rule with the runtime's area estimate (the coarse mask), so the lambda0 found here
    is the one the solver uses. Break-even 0 when the true decomposition does not even lower the other terms.
    """
    start = dilate(coarse, config.start_dilation_px) | dilate(truth, 1)
    region = dilate(start, refiner.config.region_dilation_px)
    true_x_n = inpaint_start(image, dilate(truth, 1), config)
    none = _terms(refiner, image, image, region)
    true = _terms(refiner, image, true_x_n, region)
    lam_per_lambda0 = refiner.lambda_for(coarse, dataclasses.replace(config, lambda0=1.0))
    gain = none["total"] - true["total"]  # total without sparsity (lambda = 0 above)
    breakeven = max(gain, 0.0) / max(lam_per_lambda0 * true["sparsity"], 1e-12)
    return {"breakeven_lambda0": breakeven, "no_defect_feature": none["feature"], "true_feature": true["feature"],
            "true_sparsity": true["sparsity"], "gain_without_sparsity": gain}


def start_feature_loss(refiner: Refiner, image: np.ndarray, coarse: np.ndarray, config: RefineConfig) -> float:
    """Feature loss of the solver's start (the start mask inpainted with ``config.inpaint``): lower = the fill
    looks more normal to GRAD."""
    start = dilate(coarse, config.start_dilation_px)
    x_n = inpaint_start(image, start, config)
    return _terms(refiner, image, x_n, dilate(start, refiner.config.region_dilation_px))["feature"]


def calibrate_tau(refiner: Refiner, good_images: Sequence[np.ndarray], shapes: Sequence[np.ndarray],
                  config: RefineConfig, seed: int = 0) -> tuple[dict[float, float], dict[str, Any]]:
    """Candidate taus: the ``config.mask_tau_quantiles`` of ||a|| inside the optimisation region after refining
    good images with defect-shaped coarse masks (``shapes``, moved to random positions), i.e. the solver's repair
    noise where there is no defect. Returns ({quantile: tau}, evidence)."""
    rng = np.random.default_rng(seed)
    masks = []
    for i, image in enumerate(good_images):
        shape = shapes[i % len(shapes)]
        ys, xs = np.nonzero(shape)
        h, w = shape.shape
        dy = int(rng.integers(-ys.min(), h - ys.max())) if len(ys) else 0
        dx = int(rng.integers(-xs.min(), w - xs.max())) if len(xs) else 0
        masks.append(np.roll(shape, (dy, dx), axis=(0, 1)))
    norms = [norm[region] for norm, region in refiner.repair_norms(good_images, masks, config)]
    values = np.concatenate(norms)
    taus = {float(q): float(np.quantile(values, q)) for q in config.mask_tau_quantiles}
    return taus, {"good_images": len(good_images), "region_pixels": int(values.size),
                  "median_norm": float(np.median(values)), "candidates": {str(q): t for q, t in taus.items()}}


class RuleChoice(NamedTuple):
    """:func:`best_tau`'s answer: the chosen mask rule, the mean tuning IoU of every rule tried, the chosen rule's key,
    and the held-out estimate of the IoU that choosing a rule this way reaches on a defect it was not chosen on."""

    rule: tuple[float, float, int, int]
    ious: dict[str, float]
    key: str
    held_out_iou: float


def best_tau(refiner: Refiner, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
             maps: Sequence[np.ndarray], config: RefineConfig, candidates: dict[float, float],
             threshold: float | None = None) -> RuleChoice:
    """Refine the tuning defects once with ``config`` and choose the (tau, relative, keep_interior_px,
    mask_trim_px) rule -- tau among the candidates, the others among ``config.mask_relative_candidates``,
    ``config.keep_interior_candidates`` and ``config.mask_trim_candidates`` -- with the best mean IoU there
    (collapse guard included, as at run time; a trim only when it beats the best untrimmed rule by
    ``config.mask_trim_margin``). ``threshold``: the coarse-mask threshold (default: the refiner's pixel threshold).

    The chosen rule's mean IoU is the best of dozens tried on the same images, so it overstates what the rule does
    on new defects; ``held_out_iou`` is the leave-one-out estimate (the rule chosen without each image, scored on
    it), what :func:`tune_class` weighs against the coarse mask."""
    threshold = refiner.pixel_threshold if threshold is None else threshold
    coarse, cores = zip(*(start_and_core(m, threshold, config.start_peak_fraction, config.core_threshold_factor)
                          for m in maps))
    per_image: dict[str, list[float]] = {}
    choices: dict[str, tuple[float, float, int, int]] = {}
    runs = refiner.repair_norms(images, coarse, config)
    keeps = {px: [interior(c, px) for c in coarse] for px in config.keep_interior_candidates}
    for q, tau in candidates.items():
        for rel in config.mask_relative_candidates:
            masks = [pixel_mask(norm, region, tau, rel, config) for norm, region in runs]  # shared by every px, trim
            for px, trim in itertools.product(config.keep_interior_candidates, config.mask_trim_candidates):
                key = f"{q}/{rel}/{px}/{trim}"
                per_image[key] = [mask_iou(finish_mask(pixels, core, keep, config, trim), truth)
                                  for pixels, core, keep, truth in zip(masks, cores, keeps[px], truths)]
                choices[key] = (tau, float(rel), int(px), int(trim))
    ious = {k: float(np.mean(v)) for k, v in per_image.items()}
    best = _pick_rule(ious, choices, config.mask_trim_margin)
    return RuleChoice(choices[best], ious, best, held_out_rule_iou(per_image, choices, config.mask_trim_margin))


def _pick_rule(ious: dict[str, float], choices: dict[str, tuple[float, float, int, int]], trim_margin: float) -> str:
    """The key of the best rule by mean IoU (first best in candidate order: ties keep the simpler rule), a trimmed
    one only when it beats the best untrimmed rule by ``trim_margin``."""
    best = max(choices, key=lambda k: ious[k])
    untrimmed = max((k for k in choices if choices[k][3] == 0), key=lambda k: ious[k], default=best)
    return untrimmed if ious[best] < ious[untrimmed] + trim_margin else best


def held_out_rule_iou(per_image: dict[str, list[float]], choices: dict[str, tuple[float, float, int, int]],
                      trim_margin: float) -> float:
    """Leave-one-out IoU of choosing a mask rule by :func:`_pick_rule`: for each tuning image, the rule the other
    images choose, scored on that image; averaged. With one image there is nothing to hold out: the chosen rule's
    own IoU. Only the choice among the rules is held out: lambda0, the tau candidates' values and the start rule are
    fitted on every tuning defect, so the estimate is still somewhat optimistic, though far less than the best
    rule's own IoU."""
    scores = np.array([per_image[k] for k in choices], dtype=np.float64)  # (rules, images)
    n = scores.shape[1]
    if n < 2:
        return float(scores[list(choices).index(_pick_rule(dict(zip(choices, scores.mean(axis=1))), choices,
                                                           trim_margin)), 0])
    keys = list(choices)
    totals = scores.sum(axis=1)
    held = []
    for i in range(n):
        means = dict(zip(keys, (totals - scores[:, i]) / (n - 1)))
        held.append(scores[keys.index(_pick_rule(means, choices, trim_margin)), i])
    return float(np.mean(held))


def class_coarse_threshold(good_maps: np.ndarray, config: RefineConfig) -> float:
    """A class's coarse-mask threshold: the calibration's pixel rule (the map value exceeded by
    ``coarse_good_pixel_rate`` of the pixels) on that class's held-out good images."""
    from gradad.calibration.thresholds import pixel_threshold_good_only

    return pixel_threshold_good_only(good_maps, config.coarse_good_pixel_rate)


def tune_class(refiner: Refiner, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
               maps: Sequence[np.ndarray], good_images: Sequence[np.ndarray], coarse_threshold: float | None = None,
               reference_threshold: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings (inpaint, lambda0, mask_tau, mask_relative, keep_interior_px, mask_trim_px, start_peak_fraction and
    the class's ``coarse_threshold`` when given) for one class and the evidence behind them; every step uses that coarse
    threshold (default: ``reference_threshold``, the class's calibrated pixel threshold, else the refiner's pixel
    threshold). The whole tuning runs once per ``start_peak_candidates`` value (the
    start mask's share of the map's peak, see RefineConfig) and the value with the best tuning IoU is kept, a value
    above the smallest only when it beats the smallest by ``start_peak_margin``; the flagged tuning defects are the
    same for every value."""
    fallback = refiner.pixel_threshold if reference_threshold is None else reference_threshold
    threshold = fallback if coarse_threshold is None else coarse_threshold
    extra = {} if coarse_threshold is None else {"coarse_threshold": float(coarse_threshold)}
    flagged = [i for i, m in enumerate(maps) if coarse_mask(m, threshold).any() and truths[i].any()]
    if not flagged:
        log.warning("tuning: no tuning defect of this class is flagged at the coarse threshold; defaults kept")
        return extra, {"flagged_tuning_images": 0}
    tried: dict[str, float] = {}
    best: tuple[float, dict[str, Any], dict[str, Any]] | None = None
    for fraction in sorted(refiner.config.start_peak_candidates):
        settings, evidence, iou = _tune_at(refiner, [images[i] for i in flagged], [truths[i] for i in flagged],
                                           [maps[i] for i in flagged], good_images, threshold, fraction)
        tried[str(fraction)] = round(iou, 4)
        if best is None:  # the smallest fraction, 0 (the coarse mask; RefineConfig checks it is there), is the reference...
            reference = iou
        elif iou < reference + refiner.config.start_peak_margin or iou <= best[0]:
            continue  # ...that a tighter start must beat by the margin
        best = (iou, {**settings, "start_peak_fraction": float(fraction), **extra}, evidence)
    assert best is not None
    best_iou, settings, evidence = best
    # the runtime's coarse mask on the same flagged defects: F2PAD must beat it to be used for this class, judged by
    # the held-out IoU of its mask rule (the best rule's own IoU was chosen on these very images)
    coarse_iou = float(np.mean([mask_iou(coarse_mask(maps[i], threshold), truths[i]) for i in flagged]))
    held_out = float(evidence.pop("held_out_iou"))  # unrounded: the evidence shows it rounded
    in_sample = len(flagged) == 1
    if in_sample:
        log.warning("tuning: one flagged tuning defect: nothing to hold out, so the F2PAD decision rests on the kept "
                    "rule's own IoU on it (optimistic); add tuning defects for a held-out estimate")
    margin = refiner.config.f2pad_margin
    use = held_out > coarse_iou + margin
    if not use:
        log.warning("tuning: F2PAD's mask rule (IoU %.3f held out, %.3f on the images that chose it) does not beat "
                    "the coarse mask (%.3f) on this class's %d tuning defects: its refined masks will be the coarse "
                    "masks", held_out, best_iou, coarse_iou, len(flagged))
    # stored only when false: an older gradad ignores a setting it does not know, and true is every bundle's default
    return ({**settings, **({} if use else {"use_f2pad": False})},
            {**evidence, "start_peak_iou": tried, "coarse_iou": round(coarse_iou, 4), "f2pad_iou": round(best_iou, 4),
             "f2pad_held_out_iou": round(held_out, 4),
             "f2pad_decision_basis": "in_sample (one tuning defect)" if in_sample else "held_out",
             "f2pad_margin": margin, "use_f2pad": use})


def tuning_config(config: RefineConfig) -> RefineConfig:
    """The solver settings tuning refines with: ``tune_iterations`` iterations per image (at most
    ``max_iterations``; the early stop still applies) instead of the wall-clock budget, so the same data gives the
    same settings whatever else runs on the machine; ``tune_iterations`` 0 keeps the budget."""
    if config.tune_iterations <= 0:
        return config
    return dataclasses.replace(config, time_budget_s=0.0,
                               max_iterations=min(config.tune_iterations, config.max_iterations))


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def _tune_at(refiner: Refiner, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
             maps: Sequence[np.ndarray], good_images: Sequence[np.ndarray], threshold: float, peak_fraction: float
             ) -> tuple[dict[str, Any], dict[str, Any], float]:
    """(settings, evidence, the chosen mask rule's mean tuning IoU) of flagged tuning defects with one start rule:
    inpainting, lambda0 and the mask rule (see the module docstring)."""
    base = dataclasses.replace(tuning_config(refiner.config), start_peak_fraction=peak_fraction)
    coarse = [start_mask(m, threshold, peak_fraction) for m in maps]
    losses = {}
    for method in COMPARED_INPAINTS:
        cfg = dataclasses.replace(base, inpaint=method)
        losses[method] = float(np.mean([start_feature_loss(refiner, image, c, cfg) for image, c in zip(images, coarse)]))
    method = min(losses, key=losses.get)
    cfg = dataclasses.replace(base, inpaint=method)
    checks = [breakeven_lambda0(refiner, image, truth, c, cfg) for image, truth, c in zip(images, truths, coarse)]
    breakevens = np.array([c["breakeven_lambda0"] for c in checks])
    lambda0 = max(base.lambda0_breakeven_factor * float(np.quantile(breakevens, base.lambda0_breakeven_quantile)),
                  base.lambda0_min)
    cfg = dataclasses.replace(cfg, lambda0=lambda0)
    candidates, tau_evidence = calibrate_tau(refiner, good_images[:base.mask_tau_images], list(truths), cfg)
    choice = best_tau(refiner, images, truths, maps, cfg, candidates, threshold)
    tau, relative, keep_px, trim_px = choice.rule
    tau_evidence["tuning_iou"] = choice.ious
    settings = {"inpaint": method, "lambda0": lambda0, "mask_tau": tau, "mask_relative": relative,
                "keep_interior_px": keep_px, "mask_trim_px": trim_px}
    evidence = {"flagged_tuning_images": len(images), "start_feature_loss": losses,
                "breakeven_lambda0": [round(float(b), 6) for b in breakevens],
                "truth_beats_no_defect_at_lambda0": int((breakevens > lambda0).sum()), "tau": tau_evidence,
                "held_out_iou": choice.held_out_iou}
    return settings, evidence, choice.ious[choice.key]
