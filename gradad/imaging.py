"""Anomaly maps and frames as 8-bit images (numpy + OpenCV): shared by the runtime's overlays and sinks and by
the evaluation figures, so both draw a map the same way."""

from __future__ import annotations

import cv2
import numpy as np


def map_2d(amap: np.ndarray) -> np.ndarray:
    """An anomaly map as float32 (h, w): leading batch and trailing channel axes of size 1 dropped, never a real
    axis (``np.squeeze`` turned the map of a 1x1, one-row or one-column frame into a scalar or a vector)."""
    a = np.asarray(amap, dtype=np.float32)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    while a.ndim > 2 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {np.asarray(amap).shape}")
    return a


def map_to_uint8(amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``amap`` scaled from [lo, hi] to 0..255 uint8 (clipped; NaN reads as ``lo``; all 0 when hi <= lo)."""
    a = np.asarray(amap, dtype=np.float32)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((np.nan_to_num(a, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)


def to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 BGR (OpenCV order) of an RGB, RGBA or grey image."""
    return cv2.cvtColor(to_color_uint8(image), cv2.COLOR_RGB2BGR)


def to_color_uint8(image: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 RGB of a grey, RGB or RGBA image (uint8, or float in 0..1 or 0..255)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype != np.uint8:
        if img.dtype.kind == "f" and img.size and float(np.nanmax(img)) <= 1.0:
            img = img * 255.0
        img = np.clip(np.nan_to_num(img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H,W), (H,W,1), (H,W,3) or (H,W,4), got shape {np.asarray(image).shape}")
    return np.ascontiguousarray(img[:, :, :3])


def colorize_map(
    amap: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    size: tuple[int, int] | None = None,
    channel_order: str = "rgb",
) -> np.ndarray:
    """JET colour image (H,W,3 uint8) of an anomaly map normalised to [vmin, vmax] (default: its own min/max).

    ``size`` = (width, height) resizes the map first (bilinear). ``channel_order`` "rgb" or "bgr" of the output.
    """
    a = map_2d(amap)
    if size is not None and (a.shape[1], a.shape[0]) != tuple(size):
        a = cv2.resize(a, tuple(int(s) for s in size), interpolation=cv2.INTER_LINEAR)
    finite = np.isfinite(a)
    lo = float(vmin) if vmin is not None else (float(a[finite].min()) if finite.any() else 0.0)
    hi = float(vmax) if vmax is not None else (float(a[finite].max()) if finite.any() else 1.0)
    color_bgr = cv2.applyColorMap(map_to_uint8(a, lo, hi), cv2.COLORMAP_JET)
    if channel_order.lower() == "rgb":
        return cv2.cvtColor(color_bgr, cv2.COLOR_BGR2RGB)
    if channel_order.lower() == "bgr":
        return color_bgr
    raise ValueError("channel_order must be 'rgb' or 'bgr'")


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
    channel_order: str = "rgb",
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an image: ``(1 - alpha) * image + alpha * heatmap``.

    ``image``: (H,W,3) uint8 in ``channel_order`` ("rgb", default, or "bgr" for OpenCV frames); grey or float
    images in [0,1] are converted. ``amap``: 2-D float map, resized to the image if needed, normalised to
    [vmin, vmax] (default its own min/max; pass fixed values, e.g. calibrated thresholds, for comparable
    colours across frames). Returns an (H,W,3) uint8 image in the same channel order.
    """
    img = to_color_uint8(image)
    h, w = img.shape[:2]
    heat = colorize_map(amap, vmin, vmax, size=(w, h), channel_order=channel_order)
    return cv2.addWeighted(img, 1.0 - float(alpha), heat, float(alpha), 0.0)
