"""Every F2PAD constant in one place, documented against the paper (Tao, Xu, Du 2024, arXiv 2407.06519) and DESIGN.md §3.

Torch-free: the runtime builds a config for its refinement worker without importing torch.

Units: the optimisation variable x_n lives in the model's normalised colour space ((rgb/255 - mean) / std), the
space the frozen GRAD model sees; with EfficientNet-Lite's mean = std = 0.5 that is [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, get_type_hints

from gradad.config_values import coerce_setting
from gradad.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
INPAINT_METHODS = ("telea", "navier_stokes", "mean", "shift", "median")
ADAN_SCALES = ("image", "pixel", "floored")
#: largest "median" inpainting window: OpenCV's uint8 median is exact for any odd size; beyond ~1/4 of the 256-px
#: input the window holds more of the next structure than of the background around a defect
MAX_MEDIAN_PX = 99
#: Most mixture components a pixel prior may have (refine.mog_components, and any prior file a bundle brings). The
#: prior term allocates components x 3 x H x W floats per image (objective.mog_penalty): a prior within the file's
#: byte cap but with 200 000 components would ask for ~150 GB at 256 x 256; grad-refine prepare fits 5.
PRIOR_MAX_COMPONENTS = 64
# Settings grad-refine tune may set per class (bundle.json refine.classes.<class>).
CLASS_SETTINGS = ("lambda0", "mask_tau", "mask_relative", "keep_interior_px", "mask_trim_px", "inpaint",
                  "coarse_threshold", "start_peak_fraction", "use_f2pad")
@dataclass(frozen=True)
class RefineConfig:
    """F2PAD objective, optimiser and execution settings."""

    # --- objective -------------------------------------------------------------------------------------------
    # Every term is a sum over pixels divided by the image area N (a per-pixel mean over the whole image), so the
    # weights below do not depend on the image size.
    # L(x - a): GRAD's anomaly map on x_n above the normal level, summed over the image / N, divided by the bundle's
    # fixed feature scale (``feature_scale`` in bundle.json: the calibrated pixel threshold when the bundle was
    # prepared). Never the threshold passed in at run time, so the balance of the terms is the same on the line and
    # in the benchmark.
    feature_weight: float = 1.0
    # Paper's rule: lambda = lambda0 / (anomaly area / image area), the anomaly area estimated by the coarse mask's
    # area; the fraction is clipped below by min_area_fraction (a 1-pixel coarse mask would give lambda ~ N).
    # lambda0 is chosen per class by ``grad-refine tune`` (bundle.json refine.classes); this is the fallback.
    lambda0: float = 0.02
    min_area_fraction: float = 0.001
    log_eps: float = 1e-3  # epsilon of log(|a| + sqrt(|a|^2 + eps)) (paper: small constant that keeps it smooth at 0)
    # |a| is taken as sqrt(|a|^2 + norm_smoothing^2) (ours): removes the kink of the norm at a = 0, well below mask_tau
    norm_smoothing: float = 0.02
    gamma_mog: float = 0.02  # gamma_1: weight of the per-pixel min squared Mahalanobis distance to the pixel GMM
    gamma_tv: float = 0.05  # gamma_2: weight of anisotropic total variation of x_n
    validity_weight: float = 10.0  # squared penalty for x_n outside the displayable [0, 255] range
    # --- lambda0 tuning (grad-refine tune; the paper tunes lambda0 by hand) --------------------------------------
    # Per tuning image, the break-even lambda0 is the value at which "no defect" (x_n = x) and the true
    # decomposition (x_n = inpaint of the ground-truth mask) have the same objective; below it the truth wins.
    # Per class: lambda0 = lambda0_breakeven_factor * the lambda0_breakeven_quantile of the images' break-evens.
    lambda0_breakeven_quantile: float = 0.5
    lambda0_breakeven_factor: float = 0.5
    lambda0_min: float = 1e-4  # floor of a tuned lambda0 (a class whose truth never beats "no defect" keeps some sparsity)
    # --- pixel prior (equal-weight Gaussian mixture fitted by EM on training pixels) ------------------------------
    mog_components: int = 5
    mog_em_iterations: int = 50
    mog_pixels: int = 200_000  # training pixels sampled for EM
    mog_covariance_floor: float = 1e-4  # added to covariance diagonals (normalised units squared)
    # --- coarse mask ------------------------------------------------------------------------------------------------
    # Threshold of the coarse mask F2PAD starts from; 0 = the bundle's calibrated pixel threshold. A unified bundle
    # has one calibrated threshold for all classes, but their map levels differ (on the MTD + tyre model most tyre
    # defects stayed below it), so grad-refine tune sets it per class: the (1 - coarse_good_pixel_rate) quantile of
    # the map over coarse_threshold_images held-out good images of the class (the calibration's own pixel rule).
    coarse_threshold: float = 0.0
    coarse_good_pixel_rate: float = 0.001
    coarse_threshold_images: int = 32
    # The mask F2PAD starts from is the map above max(coarse threshold, start_peak_fraction x the image's map peak):
    # the calibrated threshold keeps every flagged pixel, so a strongly flagged small defect's coarse mask is several
    # times its size and the start inpainted over it hides the defect (demo spots: coarse IoU 0.07-0.12); a share of
    # the peak tightens strong detections and leaves weak ones (peak near the threshold) as they are. 0 = the coarse
    # mask; tuned per class among start_peak_candidates.
    start_peak_fraction: float = 0.0
    start_peak_candidates: tuple[float, ...] = (0.0, 0.4, 0.6)
    # a start tighter than the coarse mask is kept only when its tuning IoU beats the coarse mask's by this much:
    # a few tuning defects cannot tell smaller differences from noise (MTD, tyre: +0.006 / +0.007 on 24 / 6 tuning
    # defects, then -0.6 / -2.0 IoU on the scored ones; demo: +0.08 to +0.26, then +17.6)
    start_peak_margin: float = 0.02
    # --- region and initialisation -----------------------------------------------------------------------------
    # The start deliberately over-covers: x_n is inpainted over the coarse mask (map > calibrated pixel threshold)
    # dilated by start_dilation_px, so a != 0 on and around the defect and the sparsity term only has to shrink it.
    start_dilation_px: int = 4
    # optimisation region = start mask dilated by this radius (room to grow beyond the start)
    region_dilation_px: int = 6
    # x_n init over the start mask: OpenCV Telea / Navier-Stokes, mean of the ring around the mask, "shift": the
    # mask filled with the image's own texture copied from the nearby offset whose surroundings match best
    # (textured surfaces, where Telea's smooth fill looks more anomalous to GRAD than the defect), or "median":
    # the image's median over median_px (not compared by grad-refine tune; benchmarks/experiments, session 25).
    inpaint: str = "telea"
    inpaint_radius_px: int = 5
    shift_search_px: int = 24  # "shift" inpainting: largest offset searched (pixels, both axes)
    median_px: int = 15  # "median" inpainting: window side (odd, pixels at the model input)
    # --- local gradient sharing (bilateral 5x5) ----------------------------------------------------------------
    share_kernel: int = 5
    share_sigma_space: float = 1.0  # pixels
    share_sigma_color: float = 1.1  # normalised colour units (paper: 1.1)
    # adaptive per-pixel step multiplier = clip(1 + 2 * coherence, step_min, step_max), coherence = |sum w g| /
    # sum w |g| in [0, 1]: neighbours that agree move faster (our reading of the paper's adaptive step, clipped [1, 3])
    step_min: float = 1.0
    step_max: float = 3.0
    # --- optimiser (Adan, Xie et al. 2022) -----------------------------------------------------------------------
    learning_rate: float = 0.003  # normalised colour units per step for an RMS gradient, before the step multiplier
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99)  # paper: 0.98 / 0.92 / 0.99
    adan_eps: float = 1e-8
    # "image": Adan's second moment averaged over each image, so a pixel's step is proportional to its gradient;
    # "pixel": textbook per-element Adan, which moves every pixel of the region by the full step from iteration 1
    # (pixels with negligible gradient included), adding noise that the sparsity term then has to undo;
    # "floored": per-element second moment floored at adan_pixel_floor x the image mean, so pixels with a weak
    # gradient (e.g. at a = 0 outside the start mask) still take steps up to 1/sqrt(floor) x the "image" step.
    adan_scale: str = "floored"
    adan_pixel_floor: float = 0.1
    update_clamp: float = 0.03  # paper's gradient clamp, applied to the per-pixel update (normalised units)
    # --- stopping ------------------------------------------------------------------------------------------------
    max_iterations: int = 1200  # paper: 1200
    # Paper: stop when the loss drops less than 0.05 between iterations. Our objective is scale-free (see above), so
    # the rule compares the mean objective of the last `stop_window` iterations with the window before it and stops
    # when the relative drop is below stop_relative_drop.
    stop_window: int = 10
    stop_relative_drop: float = 0.005
    min_iterations: int = 20
    # --- mask ------------------------------------------------------------------------------------------------------
    # pixel mask = ||a_ij|| > tau, ||.|| in RGB units of [0, 1] (0.1 ~ 26 grey levels); this is the fallback.
    # grad-refine tune calibrates tau per class from the repair noise of good images: ||a|| inside the region after
    # refining good images with defect-shaped regions. Candidates are the mask_tau_quantiles of that noise; the one
    # with the best mean IoU on the class's tuning defects (refined once) is kept.
    mask_tau: float = 0.1
    mask_tau_quantiles: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
    mask_tau_images: int = 4  # good images per class refined for the tau calibration
    # Per-image part of the rule: mask = ||a|| > max(tau, mask_relative x the region's peak ||a||), the peak being
    # the mask_peak_quantile of ||a|| inside the region. tau alone cuts a low-contrast defect (a faint break) as
    # hard as it cuts the faint halo around a strong one; with a relative part, tau can sit near the repair noise
    # and each mask follows its own defect's contrast. grad-refine tune picks (tau, relative) pairs together.
    mask_relative: float = 0.0
    mask_relative_candidates: tuple[float, ...] = (0.0, 0.2, 0.35, 0.5)
    mask_peak_quantile: float = 0.99
    # Large defects: the coarse map is 8x coarser than the image, so it is wrong at a defect's outline but right
    # deep inside a large one, where the solver's repair of a wide, low-contrast area is weakest (MTD's fray and
    # break masks shrank to half the coarse one). Pixels deeper than keep_interior_px inside the coarse mask stay
    # in the refined mask; small defects have no such interior, so it cannot grow their masks. 0 = off; tuned per
    # class with (tau, relative) among keep_interior_candidates.
    keep_interior_px: int = 0
    keep_interior_candidates: tuple[int, ...] = (0, 8, 16)
    mask_min_component_px: int = 0  # drop connected components smaller than this (0 = keep all)
    # Spurs: the repair of a compact defect also touches strong edges next to it, so its mask grows thin bridges
    # along them. Parts of a component thinner than a disc of mask_trim_px are cut (opening); a component that is
    # thin as a whole (a crack) is kept as it is (regions.trim_spurs). 0 = off; tuned per class with (tau,
    # relative, keep_interior_px) among mask_trim_candidates.
    mask_trim_px: int = 0
    mask_trim_candidates: tuple[int, ...] = (0, 2, 3)
    # A trim is kept only when it beats the best untrimmed rule by this much mean tuning IoU: on MTD the tuner's best
    # trim won by 0.002 (run-to-run noise of a wall-time budget), on the demo classes by 0.016-0.108.
    mask_trim_margin: float = 0.01
    # Collapse guard: when the refined mask covers less than collapse_fraction of the coarse map's confident core
    # (map > core_threshold_factor x pixel threshold; the whole coarse mask when no pixel is that high), the core is
    # added to the mask.
    collapse_fraction: float = 0.25
    core_threshold_factor: float = 1.5
    reestimate_iterations: int = 0  # optional re-estimation pass with lambda = 0 inside the final mask (0 = off)
    # False: a class's "refined" mask is its coarse mask, unchanged (status coarse_kept). grad-refine tune sets it
    # when the class's tuned F2PAD rule does not beat the coarse mask on the tuning defects by f2pad_margin mean IoU
    # (that rule's IoU is the best of many rules tried on those images, so a loss there is a loss).
    use_f2pad: bool = True
    f2pad_margin: float = 0.0
    # --- execution -------------------------------------------------------------------------------------------------
    device: str = "auto"  # auto = CUDA when available
    max_batch: int = 8  # flagged frames refined together
    # Per-frame wall-time budget; 0 = none. When it runs out: best mask so far, marked. 1.5 s: on 2 CPU cores the
    # tuned masks at 1.5 s (~10 iterations) equal those at 5 s (~33) on MTD, tyre and demo data (IoU 21.6 / 10.6 /
    # 42.1 vs 21.6 / 10.3 / 41.8, benchmarks/experiments/issue15_*_budget1p5): the start and the mask rule decide.
    time_budget_s: float = 1.5
    # grad-refine tune refines with exactly this many iterations per image (at most max_iterations) instead of the
    # budget (0 = the budget):
    # under a wall-clock budget the iterations reached, and so the tuned settings, changed with the machine's load
    # (the demo data's re-tune went 57.6 -> 53.2 IoU on unchanged code). 10 = what 1.5 s allows on 2 CPU cores, where
    # masks no longer change with more iterations (above).
    tune_iterations: int = 10
    threads: int = 0  # torch CPU threads (0 = torch default); the refiner also flushes denormals (~15x on CPU)

    def __post_init__(self) -> None:
        wrong = []
        for name, hint in get_type_hints(type(self)).items():  # checked first: the range checks compare numbers
            try:  # one rule for every typed config (gradad.config_values): "1e-4" a number, tuples element-wise
                object.__setattr__(self, name, coerce_setting(getattr(self, name), hint, name))
            except ConfigError as exc:
                wrong.append(str(exc).removeprefix("setting "))
        if wrong:
            raise ConfigError("refinement config: " + "; ".join(wrong))
        problems = []
        if self.device not in DEVICES:
            problems.append(f"device={self.device!r} (choose {', '.join(DEVICES)})")
        if self.inpaint not in INPAINT_METHODS:
            problems.append(f"inpaint={self.inpaint!r} (choose {', '.join(INPAINT_METHODS)})")
        if self.adan_scale not in ADAN_SCALES:
            problems.append(f"adan_scale={self.adan_scale!r} (choose {', '.join(ADAN_SCALES)})")
        for name in ("lambda0_breakeven_quantile", "adan_pixel_floor", "collapse_fraction", "coarse_good_pixel_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} (must be in [0, 1])")
        if not self.mask_tau_quantiles or not all(0.0 < q < 1.0 for q in self.mask_tau_quantiles):
            problems.append(f"mask_tau_quantiles={self.mask_tau_quantiles} (values in (0, 1))")
        if 0.0 not in self.start_peak_candidates or not all(0.0 <= f < 1.0 for f in self.start_peak_candidates):
            problems.append(f"start_peak_candidates={self.start_peak_candidates} (values in [0, 1), 0 among them: "
                            "the coarse mask is the reference a tighter start must beat)")
        if not 0.0 <= self.start_peak_fraction < 1.0:
            problems.append(f"start_peak_fraction={self.start_peak_fraction} (must be in [0, 1): at 1 no pixel is "
                            "above the peak)")
        if not self.keep_interior_candidates or not all(px >= 0 for px in self.keep_interior_candidates):
            problems.append(f"keep_interior_candidates={self.keep_interior_candidates} (values >= 0)")
        if not self.mask_trim_candidates or not all(px >= 0 for px in self.mask_trim_candidates):
            problems.append(f"mask_trim_candidates={self.mask_trim_candidates} (values >= 0)")
        if not self.mask_relative_candidates or not all(0.0 <= r < 1.0 for r in self.mask_relative_candidates):
            problems.append(f"mask_relative_candidates={self.mask_relative_candidates} (values in [0, 1))")
        for name in ("mask_relative", "mask_peak_quantile", "start_peak_margin", "mask_trim_margin", "f2pad_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} (must be in [0, 1])")
        if self.share_kernel < 1 or self.share_kernel % 2 == 0:
            problems.append(f"share_kernel={self.share_kernel} (must be odd and >= 1)")
        if not 3 <= self.median_px <= MAX_MEDIAN_PX or self.median_px % 2 == 0:
            problems.append(f"median_px={self.median_px} (must be odd, 3 to {MAX_MEDIAN_PX})")
        if not 1.0 <= self.step_min <= self.step_max:
            problems.append(f"step_min/step_max={self.step_min}/{self.step_max} (need 1 <= min <= max)")
        if len(self.betas) != 3 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas={self.betas} (three values in [0, 1))")
        for name in ("max_iterations", "max_batch", "mog_components", "stop_window"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if self.mog_components > PRIOR_MAX_COMPONENTS:
            problems.append(f"mog_components={self.mog_components} (at most {PRIOR_MAX_COMPONENTS}: the prior "
                            "term's memory grows with it)")
        for name in ("lambda0", "gamma_mog", "gamma_tv", "validity_weight", "feature_weight", "time_budget_s",
                     "region_dilation_px", "mask_tau", "start_dilation_px", "shift_search_px", "mask_tau_images",
                     "lambda0_breakeven_factor", "lambda0_min", "core_threshold_factor", "norm_smoothing",
                     "reestimate_iterations", "threads", "min_iterations",
                     "coarse_threshold", "coarse_threshold_images", "keep_interior_px", "mask_trim_px",
                     "tune_iterations"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} (must be >= 0)")
        for name in ("learning_rate", "update_clamp", "log_eps", "share_sigma_space", "share_sigma_color",
                     "min_area_fraction"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} (must be > 0)")
        if problems:
            raise ConfigError("refinement config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["mask_tau_quantiles"] = list(self.mask_tau_quantiles)
        d["mask_relative_candidates"] = list(self.mask_relative_candidates)
        d["keep_interior_candidates"] = list(self.keep_interior_candidates)
        d["mask_trim_candidates"] = list(self.mask_trim_candidates)
        d["start_peak_candidates"] = list(self.start_peak_candidates)
        return d


def refine_config_from_dict(values: dict[str, Any]) -> RefineConfig:
    """Build a config from (possibly partial) stored values; unknown keys are an error naming them."""
    known = {f.name for f in fields(RefineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"refinement config: unknown setting(s) {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(known))})")
    return RefineConfig(**values)  # its __post_init__ coerces and checks every value
