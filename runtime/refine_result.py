"""What a refinement returns. Torch-free so the lean runtime can receive results from a refinement worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Why an image's optimisation ended.
STATUS_CONVERGED = "converged"  # the early-stopping rule fired
STATUS_MAX_ITERATIONS = "max_iterations"  # iteration cap reached
STATUS_TIME_BUDGET = "time_budget"  # per-frame time budget ran out: best mask so far
STATUS_EMPTY_REGION = "empty_region"  # no pixel of the coarse map is above the pixel threshold: nothing to refine
STATUS_COARSE_KEPT = "coarse_kept"  # the class's tuning found F2PAD no better than its coarse mask: mask = coarse
STATUSES = (STATUS_CONVERGED, STATUS_MAX_ITERATIONS, STATUS_TIME_BUDGET, STATUS_EMPTY_REGION, STATUS_COARSE_KEPT)


@dataclass
class RefineResult:
    """F2PAD output for one image, at the model input size."""

    mask: np.ndarray  # (H, W) bool: refined defect mask ||a_ij|| > tau
    coarse_mask: np.ndarray  # (H, W) bool: the start mask refined: map > max(threshold, start_peak_fraction x peak)
    region: np.ndarray  # (H, W) bool: dilated coarse mask, the only pixels the optimiser changed
    repaired: np.ndarray  # (H, W, 3) uint8 RGB: x_n, the defect-free estimate
    iterations: int
    seconds: float  # wall time of this image's share of the batch (the batch's time for every image in it)
    status: str  # one of STATUSES
    objective: float  # objective of the returned (best) iterate; nan for an empty region

    @property
    def repaired_anything(self) -> bool:
        """False when no pixel was optimised (nothing flagged, or the class keeps its coarse mask): ``repaired`` is
        then the input itself, not worth saving."""
        return bool(self.region.any())

    @property
    def budget_exhausted(self) -> bool:
        """True when the mask is the best one found before the time budget ran out (not a converged one)."""
        return self.status == STATUS_TIME_BUDGET

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no arrays) for records and reports."""
        return {
            "status": self.status,
            "budget_exhausted": self.budget_exhausted,
            "iterations": int(self.iterations),
            "seconds": round(float(self.seconds), 4),
            "objective": None if not np.isfinite(self.objective) else round(float(self.objective), 6),
            "mask_area_px": int(self.mask.sum()),
            "coarse_area_px": int(self.coarse_mask.sum()),
            "region_area_px": int(self.region.sum()),
            "height": int(self.mask.shape[0]),
            "width": int(self.mask.shape[1]),
        }
