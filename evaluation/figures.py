"""Qualitative figures: image | ground truth | anomaly heat-map, as one PNG (numpy + OpenCV only).

:func:`heatmap_overlay` and :func:`colorize_map` live in :mod:`gradad.imaging` (shared with the runtime's overlays).
"""

from __future__ import annotations

import os
from typing import Any
from pathlib import Path

import cv2
import numpy as np

from gradad.imaging import colorize_map, heatmap_overlay, to_color_uint8

__all__ = ["heatmap_overlay", "colorize_map", "save_overlay_figure", "compose_overlay_figure", "TITLE_BAR_HEIGHT"]

#: Height in pixels of the title bar on top of :func:`save_overlay_figure` output.
TITLE_BAR_HEIGHT = 24

_GREEN_RGB = (0, 255, 0)


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
    img = to_color_uint8(image_rgb_uint8)
    panels = [img, _gt_panel(img, gt_mask), heatmap_overlay(img, anomaly_map, vmin, vmax, 0.5, "rgb")]
    body = np.concatenate(panels, axis=1)
    return np.concatenate([_title_bar(title, body.shape[1]), body], axis=0)


def save_overlay_figure(path: str | os.PathLike, image_rgb_uint8: np.ndarray, gt_mask_bool_or_None: np.ndarray | None,
                        anomaly_map_float: np.ndarray, **style: Any) -> Path:
    """Write one PNG: [image | ground-truth contour (green) on the image | JET heat-map overlay (alpha 0.5)].

    Each panel has the image's size (the map and mask are resized to it); a white title bar of
    ``TITLE_BAR_HEIGHT`` pixels with ``title`` sits on top, so the PNG is (H + TITLE_BAR_HEIGHT) x 3W.
    ``gt_mask_bool_or_None`` None (e.g. a good image) shows the plain image in the middle panel. The map is
    normalised to [vmin, vmax] when given (use one range for a whole set to compare images), else to its own
    min/max (``style``: the ``title``, ``vmin`` and ``vmax`` keywords of :func:`compose_overlay_figure`). Parent
    folders are created. Returns the path.
    """
    fig = compose_overlay_figure(image_rgb_uint8, gt_mask_bool_or_None, anomaly_map_float, **style)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(fig, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode PNG for {p}")
    p.write_bytes(buf.tobytes())
    return p
