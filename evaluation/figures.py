"""Qualitative figures: image | ground truth | anomaly heat-map, as one PNG (numpy + OpenCV only).

:func:`heatmap_overlay` is shared with the runtime (overlay window / video), so it works in either channel order.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = ["heatmap_overlay", "colorize_map", "save_overlay_figure", "compose_overlay_figure", "TITLE_BAR_HEIGHT"]

#: Height in pixels of the title bar on top of :func:`save_overlay_figure` output.
TITLE_BAR_HEIGHT = 24

_GREEN_RGB = (0, 255, 0)


def _to_color_uint8(image: np.ndarray) -> np.ndarray:
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
    a = np.asarray(amap, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {np.asarray(amap).shape}")
    if size is not None and (a.shape[1], a.shape[0]) != tuple(size):
        a = cv2.resize(a, tuple(int(s) for s in size), interpolation=cv2.INTER_LINEAR)
    finite = np.isfinite(a)
    lo = float(vmin) if vmin is not None else (float(a[finite].min()) if finite.any() else 0.0)
    hi = float(vmax) if vmax is not None else (float(a[finite].max()) if finite.any() else 1.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    norm = np.clip((np.nan_to_num(a, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)
    color_bgr = cv2.applyColorMap(norm, cv2.COLORMAP_JET)
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
    img = _to_color_uint8(image)
    h, w = img.shape[:2]
    heat = colorize_map(amap, vmin, vmax, size=(w, h), channel_order=channel_order)
    return cv2.addWeighted(img, 1.0 - float(alpha), heat, float(alpha), 0.0)


def _gt_panel(img: np.ndarray, gt_mask: np.ndarray | None) -> np.ndarray:
    panel = img.copy()
    if gt_mask is None:
        return panel
    m = np.squeeze(np.asarray(gt_mask)).astype(np.uint8)
    h, w = img.shape[:2]
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    m = (m > 0).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(h, w) / 128))
    cv2.drawContours(panel, contours, -1, _GREEN_RGB, thickness)
    return panel


def _title_bar(title: str, width: int, height: int = TITLE_BAR_HEIGHT) -> np.ndarray:
    bar = np.full((height, width, 3), 255, np.uint8)
    if not title:
        return bar
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, 1
    text = title.encode("ascii", "replace").decode("ascii")  # Hershey fonts are ASCII only
    scale = 0.5
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    if tw > width - 8:
        scale = max(0.25, scale * (width - 8) / tw)
        (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    y = (height + th) // 2
    cv2.putText(bar, text, (4, y), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return bar


def compose_overlay_figure(
    image_rgb_uint8: np.ndarray,
    gt_mask: np.ndarray | None,
    anomaly_map: np.ndarray,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """The RGB figure array of :func:`save_overlay_figure`: (TITLE_BAR_HEIGHT + H, 3 W, 3) uint8."""
    img = _to_color_uint8(image_rgb_uint8)
    panels = [img, _gt_panel(img, gt_mask), heatmap_overlay(img, anomaly_map, vmin, vmax, 0.5, "rgb")]
    body = np.concatenate(panels, axis=1)
    return np.concatenate([_title_bar(title, body.shape[1]), body], axis=0)


def save_overlay_figure(
    path: str | os.PathLike,
    image_rgb_uint8: np.ndarray,
    gt_mask_bool_or_None: np.ndarray | None,
    anomaly_map_float: np.ndarray,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write one PNG: [image | ground-truth contour (green) on the image | JET heat-map overlay (alpha 0.5)].

    Each panel has the image's size (the map and mask are resized to it); a white title bar of
    ``TITLE_BAR_HEIGHT`` pixels with ``title`` sits on top, so the PNG is (H + TITLE_BAR_HEIGHT) x 3W.
    ``gt_mask_bool_or_None`` None (e.g. a good image) shows the plain image in the middle panel. The map is
    normalised to [vmin, vmax] when given (use one range for a whole set to compare images), else to its own
    min/max. Parent folders are created. Returns the path.
    """
    fig = compose_overlay_figure(image_rgb_uint8, gt_mask_bool_or_None, anomaly_map_float, title, vmin, vmax)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(fig, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode PNG for {p}")
    p.write_bytes(buf.tobytes())
    return p
