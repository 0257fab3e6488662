"""Every F2PAD constant in one place, documented against the paper (Tao, Xu, Du 2024, arXiv 2407.06519) and DESIGN.md §3.

Torch-free: the runtime builds a config for its refinement worker without importing torch.

Units: the optimisation variable x_n lives in the model's normalised colour space ((rgb/255 - mean) / std), the
space the frozen GRAD model sees; with EfficientNet-Lite's mean = std = 0.5 that is [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from gradad.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
INPAINT_METHODS = ("telea", "navier_stokes", "mean")


@dataclass(frozen=True)
class RefineConfig:
    """F2PAD objective, optimiser and execution settings."""

    # --- objective -------------------------------------------------------------------------------------------
    # L(x - a): GRAD's anomaly map on x_n, averaged over the optimisation region and divided by the calibrated pixel
    # threshold (our scaling: 1.0 = "at the defect threshold", so the other weights do not depend on the map's units).
    feature_weight: float = 1.0
    # lambda = lambda0 / (estimated anomaly area fraction), paper's sparsity prior; the area fraction is the coarse
    # mask's share of the optimisation region, clipped below by min_area_fraction.
    lambda0: float = 0.2
    min_area_fraction: float = 0.05
    log_eps: float = 1e-3  # epsilon of log(|a| + sqrt(|a|^2 + eps)) (paper: small constant that keeps it smooth at 0)
    # |a| is taken as sqrt(|a|^2 + norm_smoothing^2) (ours): removes the kink of the norm at a = 0, well below mask_tau
    norm_smoothing: float = 0.02
    gamma_mog: float = 0.02  # gamma_1: weight of the per-pixel min squared Mahalanobis distance to the pixel GMM
    gamma_tv: float = 0.05  # gamma_2: weight of anisotropic total variation of x_n
    validity_weight: float = 10.0  # squared penalty for x_n outside the displayable [0, 255] range
    # --- pixel prior (equal-weight Gaussian mixture fitted by EM on training pixels) ------------------------------
    mog_components: int = 5
    mog_em_iterations: int = 50
    mog_pixels: int = 200_000  # training pixels sampled for EM
    mog_covariance_floor: float = 1e-4  # added to covariance diagonals (normalised units squared)
    # --- region and initialisation -----------------------------------------------------------------------------
    region_dilation_px: int = 9  # coarse mask (map > calibrated pixel threshold) is dilated by this radius
    inpaint: str = "telea"  # x_n init inside the coarse mask: OpenCV Telea / Navier-Stokes, or mean of the ring
    inpaint_radius_px: int = 5
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
    # (pixels with negligible gradient included), adding noise that the sparsity term then has to undo.
    adan_scale: str = "image"
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
    mask_tau: float = 0.1  # pixel mask = ||a_ij|| > tau, measured in RGB units of [0, 1] (0.1 ~ 26 grey levels)
    mask_min_component_px: int = 0  # drop connected components smaller than this (0 = keep all)
    reestimate_iterations: int = 0  # optional re-estimation pass with lambda = 0 inside the final mask (0 = off)
    # --- execution -------------------------------------------------------------------------------------------------
    device: str = "auto"  # auto = CUDA when available
    max_batch: int = 8  # flagged frames refined together
    time_budget_s: float = 5.0  # per-frame wall-time budget; 0 = none. When it runs out: best mask so far, marked
    threads: int = 0  # torch CPU threads (0 = torch default)

    def __post_init__(self) -> None:
        problems = []
        if self.device not in DEVICES:
            problems.append(f"device={self.device!r} (choose {', '.join(DEVICES)})")
        if self.inpaint not in INPAINT_METHODS:
            problems.append(f"inpaint={self.inpaint!r} (choose {', '.join(INPAINT_METHODS)})")
        if self.adan_scale not in ("image", "pixel"):
            problems.append(f"adan_scale={self.adan_scale!r} (choose image, pixel)")
        if self.share_kernel < 1 or self.share_kernel % 2 == 0:
            problems.append(f"share_kernel={self.share_kernel} (must be odd and >= 1)")
        if not 1.0 <= self.step_min <= self.step_max:
            problems.append(f"step_min/step_max={self.step_min}/{self.step_max} (need 1 <= min <= max)")
        if len(self.betas) != 3 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas={self.betas} (three values in [0, 1))")
        for name in ("max_iterations", "max_batch", "mog_components", "stop_window"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        for name in ("lambda0", "gamma_mog", "gamma_tv", "validity_weight", "feature_weight", "time_budget_s",
                     "region_dilation_px", "mask_tau", "norm_smoothing", "reestimate_iterations", "threads", "min_iterations"):
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
        return d


def refine_config_from_dict(values: dict[str, Any]) -> RefineConfig:
    """Build a config from (possibly partial) stored values; unknown keys are an error naming them."""
    known = {f.name for f in fields(RefineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"refinement config: unknown setting(s) {', '.join(unknown)}")
    values = dict(values)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return RefineConfig(**values)
