"""Coarse mask, optimisation region, inpainting initialisation and final mask clean-up (numpy + OpenCV)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from gradad.refine.config import RefineConfig

_INPAINT_FLAGS = {"telea": cv2.INPAINT_TELEA, "navier_stokes": cv2.INPAINT_NS}


def coarse_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """(H, W) map -> bool mask of pixels above the calibrated pixel threshold."""
    return np.asarray(anomaly_map) > pixel_threshold


def start_mask(anomaly_map: np.ndarray, pixel_threshold: float, peak_fraction: float) -> np.ndarray:
    """The coarse mask F2PAD refines: map above max(threshold, ``peak_fraction`` x the map's peak). Never empty for a
    flagged map (its peak is above the threshold)."""
    amap = np.asarray(anomaly_map)
    return amap > max(pixel_threshold, peak_fraction * float(amap.max())) if amap.size else amap > pixel_threshold


def confident_core(anomaly_map: np.ndarray, pixel_threshold: float, factor: float,
                   start: np.ndarray | None = None) -> np.ndarray:
    """The coarse map's confident core kept by the collapse guard: pixels above ``factor`` x the threshold, or,
    when none is (a defect the map only just flagged), the whole coarse mask: the guard must still keep what GRAD
    flagged when the refined mask explains all of it away. Within ``start`` (F2PAD's start mask) when given: the
    guard must not put back what a tighter start left out."""
    core = coarse_mask(anomaly_map, pixel_threshold * factor)
    if not core.any():
        core = coarse_mask(anomaly_map, pixel_threshold)
    return core if start is None else core & start


def start_and_core(anomaly_map: np.ndarray, pixel_threshold: float, peak_fraction: float,
                   core_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """(start mask, collapse-guard core within it) of one map: what the refiner and its tuning both use."""
    start = start_mask(anomaly_map, pixel_threshold, peak_fraction)
    return start, confident_core(anomaly_map, pixel_threshold, core_factor, start)


def dilate(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Dilate a bool mask with a disc of ``radius_px``."""
    if radius_px <= 0:
        return mask.copy()
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))
    return cv2.dilate(mask.astype(np.uint8), disc).astype(bool)


def interior(mask: np.ndarray, depth_px: int) -> np.ndarray:
    """Pixels of ``mask`` deeper than ``depth_px`` inside it (erosion by a disc; pixels past the image border
    count as inside); empty for ``depth_px`` <= 0."""
    if depth_px <= 0:
        return np.zeros_like(mask, dtype=bool)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * depth_px + 1, 2 * depth_px + 1))
    return cv2.erode(mask.astype(np.uint8), disc, borderType=cv2.BORDER_REPLICATE).astype(bool)


#: a component keeps its opened (spur-free) part only when that part is at least this share of it: a compact defect
#: with spurs keeps most of its area, a thin defect (a crack, a hatched repair of one) keeps little and stays whole
TRIM_BODY_FRACTION = 0.5


def trim_spurs(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Cut the parts of a mask's components thinner than a disc of ``radius_px`` (morphological opening) from
    components that are mostly thicker than that (:data:`TRIM_BODY_FRACTION`); thin components stay whole.

    The solver's repair of a compact defect also touches the strong edges next to it, which adds thin spurs to the
    defect's mask (make demo's nut spot: the spot plus bridges to the nut's outline). A thin defect (a crack, a
    scratch) is mostly thin and stays as it is. 0 leaves the mask unchanged. Pixels past the image border count as
    mask (OpenCV's default), as in :func:`interior`: a defect cut by the border keeps its edge there."""
    mask = np.asarray(mask, dtype=bool)
    if radius_px <= 0 or not mask.any():
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disc).astype(bool)
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    area = np.bincount(labels[mask], minlength=count)
    body = np.bincount(labels[opened], minlength=count)
    trimmed = body >= TRIM_BODY_FRACTION * area  # background (label 0) is in neither mask: either pick is False
    return np.where(trimmed[labels], opened, mask)


def inpaint(image: np.ndarray, mask: np.ndarray, method: str, radius_px: int, search_px: int = 24,
            median_px: int = 15) -> np.ndarray:
    """Fill ``mask`` of an (H, W, 3) uint8 RGB image from its surroundings (x_n initialisation).

    ``mean`` fills with the mean colour of a ring just outside the mask: a fallback that makes no texture claims.
    ``shift`` copies the image's own texture (see :func:`shift_fill`); ``search_px`` is its search range.
    ``median`` takes each masked pixel from the image's ``median_px`` x ``median_px`` median: spots and lines
    narrower than half the window vanish while the background's edges and brightness gradients stay where they
    are (a diffusion fill smears a gradient across the whole mask, so x - x_n is large everywhere in it).
    """
    if not mask.any():
        return image.copy()
    if method == "shift":
        return shift_fill(image, mask, radius_px, search_px)
    if method == "median":
        out = image.copy()
        out[mask] = cv2.medianBlur(np.ascontiguousarray(image), median_px)[mask]
        return out
    if method == "mean":
        ring = dilate(mask, max(1, radius_px)) & ~mask
        source = image[ring] if ring.any() else image[~mask] if (~mask).any() else image.reshape(-1, 3)
        out = image.copy()
        out[mask] = source.mean(axis=0).round().astype(np.uint8)
        return out
    return cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8), radius_px, _INPAINT_FLAGS[method])


def inpaint_start(image: np.ndarray, mask: np.ndarray, config: RefineConfig) -> np.ndarray:
    """:func:`inpaint` with the start fill ``config`` sets (method, ring, shift search, median window)."""
    return inpaint(image, mask, config.inpaint, config.inpaint_radius_px, config.shift_search_px, config.median_px)


def drop_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Remove 8-connected components smaller than ``min_pixels`` (0 keeps everything)."""
    if min_pixels <= 0 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def shift_fill(image: np.ndarray, mask: np.ndarray, ring_px: int, search_px: int, step_px: int = 2) -> np.ndarray:
    """Fill each connected component of ``mask`` with a copy of the image at the offset (|dy|, |dx| <= search_px,
    on a ``step_px`` grid) whose surroundings best match the component's: the ring of ``ring_px`` around the
    component is compared (mean squared colour difference) with the ring around the source, and the source
    (component + ring) must lie inside the image and off the mask. A textured surface keeps its texture, where a
    diffusion fill (Telea) leaves a smooth patch. Components without a valid offset fall back to Telea.
    """
    out = image.copy()
    h, w = mask.shape
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    blocked = dilate(mask, max(1, ring_px))
    pixels = image.astype(np.float32)
    fallback = np.zeros_like(mask)
    for k in range(1, count):
        component = labels == k
        grown = dilate(component, max(1, ring_px))
        ring = grown & ~mask
        gy, gx = np.nonzero(grown)
        ry, rx = np.nonzero(ring)
        cy, cx = np.nonzero(component)
        target = pixels[ry, rx]
        best, best_cost = None, np.inf
        for dy in range(-search_px, search_px + 1, step_px):
            for dx in range(-search_px, search_px + 1, step_px):
                if (dy, dx) == (0, 0):
                    continue
                sy, sx = gy + dy, gx + dx
                if sy.min() < 0 or sx.min() < 0 or sy.max() >= h or sx.max() >= w or blocked[sy, sx].any():
                    continue
                cost = float(((pixels[ry + dy, rx + dx] - target) ** 2).mean()) if len(ry) else 0.0
                if cost < best_cost:
                    best, best_cost = (dy, dx), cost
        if best is None:
            fallback |= component
            continue
        out[cy, cx] = image[cy + best[0], cx + best[1]]
    if fallback.any():
        out = cv2.inpaint(np.ascontiguousarray(out), fallback.astype(np.uint8), ring_px, cv2.INPAINT_TELEA)
    return out
