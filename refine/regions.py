"""Coarse mask, optimisation region, inpainting initialisation and final mask clean-up (numpy + OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np

_INPAINT_FLAGS = {"telea": cv2.INPAINT_TELEA, "navier_stokes": cv2.INPAINT_NS}


def coarse_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """(H, W) map -> bool mask of pixels above the calibrated pixel threshold."""
    return np.asarray(anomaly_map) > pixel_threshold


def dilate(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Dilate a bool mask with a disc of ``radius_px``."""
    if radius_px <= 0:
        return mask.copy()
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))
    return cv2.dilate(mask.astype(np.uint8), disc).astype(bool)


def inpaint(image: np.ndarray, mask: np.ndarray, method: str, radius_px: int) -> np.ndarray:
    """Fill ``mask`` of an (H, W, 3) uint8 RGB image from its surroundings (x_n initialisation).

    ``mean`` fills with the mean colour of a ring just outside the mask: a fallback that makes no texture claims.
    """
    if not mask.any():
        return image.copy()
    if method == "mean":
        ring = dilate(mask, max(1, radius_px)) & ~mask
        source = image[ring] if ring.any() else image[~mask] if (~mask).any() else image.reshape(-1, 3)
        out = image.copy()
        out[mask] = source.mean(axis=0).round().astype(np.uint8)
        return out
    return cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8), radius_px, _INPAINT_FLAGS[method])


def drop_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Remove 8-connected components smaller than ``min_pixels`` (0 keeps everything)."""
    if min_pixels <= 0 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]
