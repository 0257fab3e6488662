"""Procedural demo dataset in MVTec AD layout (numpy + OpenCV only, no torch).

The generator draws a small industrial-inspection data set from scratch: a woven ``fabric`` texture (and an
optional ``wood`` texture) and two objects, a hexagonal ``nut`` and a two-tone ``capsule``, with pose, lighting
and noise variation. Defective test images carry one synthetic defect each (``scratch``, ``spot``, ``crack``,
``color``) and an exact ground-truth mask: the mask is precisely the set of pixels the defect altered.

Layout written by :func:`generate_demo_dataset` (the MVTec AD layout, DESIGN.md section 8)::

    <out>/DEMO_DATASET.json                      marker: generator, config and counts
    <out>/<cls>/train/good/000.png
    <out>/<cls>/test/good/000.png
    <out>/<cls>/test/<defect>/000.png
    <out>/<cls>/ground_truth/<defect>/000_mask.png   8-bit, 0 / 255, same size as the image

Every image is drawn from its own random generator seeded by (seed, class, split, defect, index), so a file
does not depend on which other files are generated or in which order, and the same seed gives byte-identical
files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from gradad.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_CLASSES",
    "DEFAULT_CLASSES",
    "DEFECT_TYPES",
    "MARKER_NAME",
    "MAX_DEFECT_AREA",
    "MIN_DEFECT_AREA",
    "OBJECT_CLASSES",
    "TEXTURE_CLASSES",
    "DemoDataConfig",
    "apply_defect",
    "generate_demo_dataset",
    "render_good",
    "render_sample",
    "sample_rng",
]

#: Texture classes: the whole image is the "object"; defects may be anywhere.
TEXTURE_CLASSES: tuple[str, ...] = ("fabric", "wood")
#: Object classes: an object on a background; defects lie on the object only.
OBJECT_CLASSES: tuple[str, ...] = ("nut", "capsule")
#: Every class the generator can draw.
ALL_CLASSES: tuple[str, ...] = ("fabric", "nut", "capsule", "wood")
#: Classes in the default demo data set.
DEFAULT_CLASSES: tuple[str, ...] = ("fabric", "nut", "capsule")
#: Every defect type the generator can draw.
DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot", "crack", "color")
#: Defect mask area, as a fraction of the image area, that every generated defect respects.
MIN_DEFECT_AREA: float = 0.003
MAX_DEFECT_AREA: float = 0.04
#: Smallest mean absolute change (grey levels, averaged over the mask and the RGB channels) of a defect.
MIN_DEFECT_CONTRAST: float = 25.0
#: Marker file that identifies a folder written by this generator (and holds its config and counts).
MARKER_NAME = "DEMO_DATASET.json"
_GENERATOR_ID = "gradad.data.demo"
_MARKER_VERSION = 1
_SPLIT_CODES = {"train": 1, "test": 2}
_MAX_ATTEMPTS = 80


@dataclass(frozen=True)
class DemoDataConfig:
    """Settings of the demo data set.

    Attributes:
        classes: class names to generate, from :data:`ALL_CLASSES`.
        image_size: side of the square images in pixels.
        train_good: defect-free training images per class.
        test_good: defect-free test images per class.
        test_per_defect: defective test images per class and defect type.
        defect_types: defect types to generate, from :data:`DEFECT_TYPES`.
        seed: master seed (a non-negative integer); the same seed gives byte-identical files.
    """

    classes: tuple[str, ...] = DEFAULT_CLASSES
    image_size: int = 256
    train_good: int = 60
    test_good: int = 12
    test_per_defect: int = 5
    defect_types: tuple[str, ...] = DEFECT_TYPES
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`DatasetError` naming the first invalid setting."""
        for name, value, known in (
            ("classes", self.classes, ALL_CLASSES),
            ("defect_types", self.defect_types, DEFECT_TYPES),
        ):
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise DatasetError(f"demo data setting {name} must be a sequence of names, got {value!r}")
            unknown = [v for v in value if v not in known]
            if unknown:
                raise DatasetError(
                    f"demo data setting {name}: unknown name(s) {', '.join(map(repr, unknown))}; "
                    f"choose from {', '.join(known)}"
                )
            if len(set(value)) != len(value):
                raise DatasetError(f"demo data setting {name} lists a name twice: {list(value)}")
        if not self.classes:
            raise DatasetError("demo data setting classes is empty; give at least one class")
        for name, low, high in (
            ("image_size", 32, 4096),
            ("train_good", 1, 100_000),
            ("test_good", 0, 100_000),
            ("test_per_defect", 0, 100_000),
            ("seed", 0, 2**63 - 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise DatasetError(
                f"demo data setting {name} must be an integer in [{low}, {high}], got {value!r}"
            )

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dictionary of the settings."""
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["defect_types"] = list(self.defect_types)
        return d


# ----------------------------------------------------------------------------------------------------------
# Random streams
# ----------------------------------------------------------------------------------------------------------


def sample_rng(seed: int, class_name: str, split: str, defect: str, index: int) -> np.random.Generator:
    """Independent random generator for one image, keyed by (seed, class, split, defect, index).

    ``split`` is ``"train"`` or ``"test"``; ``defect`` is ``"good"`` or a defect type. Names are hashed with
    CRC-32, so the stream of an image never depends on which other classes or images are generated.
    """
    key = [
        int(seed),
        zlib.crc32(class_name.encode("utf-8")),
        _SPLIT_CODES[split],
        zlib.crc32(defect.encode("utf-8")),
        int(index),
    ]
    return np.random.default_rng(np.random.SeedSequence(key))


# ----------------------------------------------------------------------------------------------------------
# Small drawing helpers
# ----------------------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) as float32 arrays of shape (size, size)."""
    ax = np.arange(size, dtype=np.float32)
    return np.broadcast_to(ax[:, None], (size, size)), np.broadcast_to(ax[None, :], (size, size))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise of roughly unit standard deviation (a random cells×cells grid, cubic up-sampled)."""
    g = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(g, (size + 2 * (size // cells), size + 2 * (size // cells)), interpolation=cv2.INTER_CUBIC)
    off = size // cells
    out = big[off : off + size, off : off + size]
    return out / max(float(out.std()), 1e-6)


def _luma(img: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an RGB float or uint8 image (float32)."""
    img = img.astype(np.float32, copy=False)
    return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


def _lighting(rng: np.random.Generator, size: int, brightness: float, gradient: float) -> np.ndarray:
    """Multiplicative lighting field: global brightness times a linear gradient in a random direction."""
    y, x = _grid(size)
    a = rng.uniform(0.0, 2.0 * np.pi)
    b = rng.uniform(1.0 - brightness, 1.0 + brightness)
    g = rng.uniform(0.0, gradient)
    ramp = ((x - size / 2) * np.cos(a) + (y - size / 2) * np.sin(a)) / (size / 2)
    return (b * (1.0 + g * ramp)).astype(np.float32)


def _finish(
    rng: np.random.Generator, img: np.ndarray, brightness: float, gradient: float, noise: float
) -> np.ndarray:
    """Apply lighting, a small colour-temperature shift and sensor noise; return RGB uint8."""
    size = img.shape[0]
    light = _lighting(rng, size, brightness, gradient)
    tint = 1.0 + rng.uniform(-0.03, 0.03, size=3).astype(np.float32)
    sigma = rng.uniform(0.6, 1.0) * noise
    out = img * light[..., None] * tint + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pose(size: int, angle_deg: float, shift: tuple[float, float]) -> np.ndarray:
    """2×3 affine matrix: rotate about the image centre by ``angle_deg`` then translate by ``shift``."""
    m = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), angle_deg, 1.0)
    m[:, 2] += shift
    return m


def _composite(
    bg: np.ndarray, obj: np.ndarray, alpha: np.ndarray, shadow_offset: float, shadow_strength: float
) -> np.ndarray:
    """Alpha-composite an object over a background with a soft drop shadow."""
    size = bg.shape[0]
    m = np.float32([[1, 0, shadow_offset], [0, 1, shadow_offset]])
    shadow = cv2.warpAffine(alpha, m, (size, size))
    sigma = max(size / 90.0, 0.8)
    shadow = cv2.GaussianBlur(shadow, (0, 0), sigma)
    bg = bg * (1.0 - shadow_strength * shadow)[..., None]
    a = alpha[..., None]
    return bg * (1.0 - a) + obj * a


# ----------------------------------------------------------------------------------------------------------
# Classes
# ----------------------------------------------------------------------------------------------------------


def _render_fabric(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain-weave linen: warp and weft threads with per-thread thickness/tone variation."""
    y, x = _grid(size)
    theta = np.deg2rad(rng.uniform(-3.0, 3.0))
    period = size / 28.0 * rng.uniform(0.97, 1.03)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (x * c + y * s) / period + np.float32(rng.uniform(0.0, 2.0))
    v = (-x * s + y * c) / period + np.float32(rng.uniform(0.0, 2.0))
    i = np.floor(u)
    j = np.floor(v)
    fu = u - i
    fv = v - j
    ii = (i - i.min()).astype(np.int64)
    jj = (j - j.min()).astype(np.int64)
    # Per-thread tone and width: real yarn is not uniform.
    warp_gain = rng.normal(1.0, 0.05, size=int(ii.max()) + 1).astype(np.float32)
    weft_gain = rng.normal(1.0, 0.05, size=int(jj.max()) + 1).astype(np.float32)
    warp_w = rng.uniform(0.8, 0.95, size=int(ii.max()) + 1).astype(np.float32)
    weft_w = rng.uniform(0.8, 0.95, size=int(jj.max()) + 1).astype(np.float32)

    def profile(f: np.ndarray, width: np.ndarray) -> np.ndarray:
        t = np.clip((f - 0.5) / (width / 2), -1.0, 1.0)
        return np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))

    warp_val = profile(fu, warp_w[ii]) * (0.7 + 0.3 * np.sin(np.pi * fv)) * warp_gain[ii]
    weft_val = profile(fv, weft_w[jj]) * (0.7 + 0.3 * np.sin(np.pi * fu)) * weft_gain[jj]
    warp_top = ((i + j) % 2) == 0
    val = np.where(warp_top, warp_val, weft_val)
    base = np.float32([196, 178, 146]) * (1.0 + rng.uniform(-0.03, 0.03, size=3)).astype(np.float32)
    warp_col = base * np.float32([1.0, 0.99, 0.97])
    weft_col = base * np.float32([0.96, 0.96, 0.95])
    col = np.where(warp_top[..., None], warp_col, weft_col)
    blotch = 1.0 + 0.03 * _smooth_noise(rng, size, 4)
    fibre = 1.0 + 0.05 * cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.7)
    img = col * ((0.35 + 0.65 * val) * blotch * fibre)[..., None]
    out = _finish(rng, img, brightness=0.07, gradient=0.08, noise=3.0)
    return out, np.ones((size, size), dtype=bool)


def _render_wood(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Planed wood: distorted growth rings, dark latewood lines and pores streaked along the grain."""
    y, x = _grid(size)
    theta = np.deg2rad(rng.uniform(-4.0, 4.0))
    v = -x * np.float32(np.sin(theta)) + y * np.float32(np.cos(theta))
    ring = v + size * (0.03 * _smooth_noise(rng, size, 3) + 0.006 * _smooth_noise(rng, size, 8))
    period = size / 12.0 * rng.uniform(0.9, 1.1)
    t = np.mod(ring / period + rng.uniform(0.0, 1.0), 1.0)
    latewood = t**4
    streak = cv2.resize(rng.standard_normal((size, 5)).astype(np.float32), (size, size))
    pores = cv2.resize(rng.standard_normal((size, 24)).astype(np.float32), (size, size))
    val = 0.9 - 0.28 * latewood + 0.03 * streak + 0.035 * pores
    base = np.float32([170, 118, 72]) * (1.0 + rng.uniform(-0.04, 0.04, size=3)).astype(np.float32)
    img = base * val[..., None]
    out = _finish(rng, img, brightness=0.07, gradient=0.1, noise=2.5)
    return out, np.ones((size, size), dtype=bool)


def _render_nut(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Hexagonal steel nut lying flat on a dark tray, any rotation, small shift, directional light."""
    s = size
    y, x = _grid(s)
    cy = cx = s / 2 - 0.5
    radius = 0.3 * s * rng.uniform(0.97, 1.03)
    r_hole = 0.40 * radius
    angle = rng.uniform(0.0, 60.0)
    shift = tuple(rng.uniform(-0.04, 0.04, size=2) * s)
    light = np.deg2rad(-135.0 + rng.uniform(-20.0, 20.0) + angle)  # light direction in the object frame

    # Coverage (anti-aliased) of the hexagon minus the through hole, drawn with 4 sub-pixel bits.
    cov = np.zeros((s, s), dtype=np.uint8)
    k = np.arange(6) * np.pi / 3
    pts = np.stack([cx + radius * np.cos(k), cy + radius * np.sin(k)], axis=1)
    cv2.fillPoly(cov, [np.rint(pts * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    cv2.circle(cov, (round(cx * 16), round(cy * 16)), round(r_hole * 16), 0, -1, lineType=cv2.LINE_AA, shift=4)
    alpha = cov.astype(np.float32) / 255.0

    dx, dy = x - cx, y - cy
    r = np.sqrt(dx * dx + dy * dy)
    ang = np.arctan2(dy, dx)
    facing = np.cos(ang - light)  # +1 where a chamfer faces the light
    face = 168.0 + 5.0 * np.sin(2 * np.pi * r / max(s / 64.0, 1.5)) + 12.0 * (
        (dx * np.cos(light) + dy * np.sin(light)) / radius
    )
    chamfer = 150.0 + 55.0 * facing
    thread = 95.0 + 30.0 * np.sin(2 * np.pi * (r / max(s / 80.0, 1.2)) + ang) - 25.0 * facing
    val = np.where(r > 0.82 * radius, chamfer, np.where(r < 1.22 * r_hole, thread, face)).astype(np.float32)
    grain = cv2.GaussianBlur(rng.standard_normal((s, s)).astype(np.float32), (0, 0), 0.8)
    val = val * (1.0 + 0.04 * grain)
    obj = val[..., None] * np.float32([0.96, 0.985, 1.03])

    return _place_on_tray(rng, s, obj, alpha, _pose(s, angle, shift), [58, 63, 70], 0.05, 5, (0.01, 0.02), 0.5)


def _render_capsule(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Red/ivory gelatin capsule with a printed '500', rotated about ±20° on a grey tray."""
    s = size
    y, x = _grid(s)
    cy = cx = s / 2 - 0.5
    rad = 0.13 * s * rng.uniform(0.98, 1.02)
    half = 0.35 * s * rng.uniform(0.98, 1.02) - rad  # half length of the straight part
    angle = rng.uniform(-20.0, 20.0)
    shift = tuple(rng.uniform(-0.04, 0.04, size=2) * s)

    dx, dy = x - cx, y - cy
    px = np.clip(dx, -half, half)
    d = np.sqrt((dx - px) ** 2 + dy * dy)
    alpha = np.clip(rad - d + 0.5, 0.0, 1.0).astype(np.float32)
    t = np.clip(d / rad, 0.0, 1.0)
    dome = np.sqrt(1.0 - t * t)
    spec = 0.45 * np.exp(-(((dy / rad) + 0.42) / 0.16) ** 2) * dome
    shade = 0.55 + 0.45 * dome
    split = 0.08 * half
    red = np.float32([188, 42, 38]) * (1.0 + rng.uniform(-0.04, 0.04))
    ivory = np.float32([236, 229, 211])
    col = np.where((dx < split)[..., None], red, ivory)
    obj = col * shade[..., None] + 255.0 * spec[..., None]
    seam = np.abs(dx - split) < max(s / 200.0, 0.6)
    obj[seam] *= 0.72

    text = np.zeros((s, s), dtype=np.uint8)
    scale = 0.55 * s / 256.0
    thick = max(1, round(s / 180))
    (tw, th), _ = cv2.getTextSize("500", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    org = (round(cx + split + 0.5 * (half + rad - split) - tw / 2), round(cy + th / 2))
    cv2.putText(text, "500", org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    ink = (text.astype(np.float32) / 255.0)[..., None]
    obj = obj * (1.0 - 0.75 * ink) + np.float32([40, 40, 45]) * 0.75 * ink * 0.4

    return _place_on_tray(rng, s, obj.astype(np.float32), alpha, _pose(s, angle, shift), [128, 134, 140], 0.025, 4,
                          (0.012, 0.022), 0.45)


def _place_on_tray(rng: np.random.Generator, s: int, obj: np.ndarray, alpha: np.ndarray, pose: np.ndarray,
                   tray_rgb: list[int], tray_texture: float, texture_scale: int, shadow_range: tuple[float, float],
                   shadow_strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Pose the object, lay it with its shadow on a textured tray and finish the image (same random draws, in the
    same order, for every part kind)."""
    obj = cv2.warpAffine(obj, pose, (s, s), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(alpha, pose, (s, s), flags=cv2.INTER_LINEAR)
    bg_col = np.float32(tray_rgb) * (1.0 + rng.uniform(-0.05, 0.05))
    bg = bg_col * (1.0 + tray_texture * _smooth_noise(rng, s, texture_scale))[..., None]
    img = _composite(bg, obj, alpha, shadow_offset=s * rng.uniform(*shadow_range), shadow_strength=shadow_strength)
    out = _finish(rng, img, brightness=0.1, gradient=0.12, noise=3.0)
    return out, alpha > 0.5


_RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "fabric": _render_fabric,
    "wood": _render_wood,
    "nut": _render_nut,
    "capsule": _render_capsule,
}


def render_good(class_name: str, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect-free image of a class.

    Args:
        class_name: one of :data:`ALL_CLASSES`.
        rng: random generator (e.g. from :func:`sample_rng`); it is advanced.
        size: side of the square image in pixels (32 or more).

    Returns:
        ``(image, object_mask)``: RGB uint8 image (size, size, 3) and a bool mask (size, size) of the pixels
        that belong to the inspected object (all True for texture classes).
    """
    if class_name not in _RENDERERS:
        raise DatasetError(f"demo data class {class_name!r} is unknown; choose from {', '.join(ALL_CLASSES)}")
    if size < 32:
        raise DatasetError(f"demo data setting image_size must be at least 32, got {size}")
    return _RENDERERS[class_name](rng, int(size))


# ----------------------------------------------------------------------------------------------------------
# Defects
# ----------------------------------------------------------------------------------------------------------


def _pick_point(allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random (x, y) pixel inside ``allowed``."""
    idx = np.flatnonzero(allowed)
    k = int(idx[rng.integers(idx.size)])
    return np.array([k % allowed.shape[1], k // allowed.shape[1]], dtype=np.float64)


def _poly_fixed(pts: np.ndarray) -> np.ndarray:
    """Float (x, y) points → int32 points with 4 fractional bits for OpenCV's ``shift=4``."""
    return np.rint(np.asarray(pts) * 16).astype(np.int32).reshape(-1, 1, 2)


def _line_width(rng: np.random.Generator, size: int, low: float, high: float) -> int:
    """Stroke width in pixels: ``low``..``high`` px at 256 px, scaled with the image, at least 2."""
    return max(2, int(round(rng.uniform(low, high) * size / 256.0)))


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Irregular filled blob (uint8 0/255) around ``centre``, without anti-aliasing."""
    n = 16
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    harm = np.zeros(n)
    for f in (2, 3, 5):
        harm += rng.uniform(-0.14, 0.14) * np.cos(f * a + rng.uniform(0, 2 * np.pi))
    ecc = rng.uniform(0.7, 1.0)
    rr = radius * (1.0 + harm)
    pts = np.stack([centre[0] + rr * np.cos(a), centre[1] + ecc * rr * np.sin(a)], axis=1)
    m = np.zeros((size, size), dtype=np.uint8)
    cv2.fillPoly(m, [_poly_fixed(pts)], 255, lineType=cv2.LINE_8, shift=4)
    return m


def _propose(
    defect_type: str, img: np.ndarray, allowed: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One candidate defect: (bool mask, float32 RGB values for every pixel; only the mask is used)."""
    s = img.shape[0]
    c = _pick_point(allowed, rng)
    m = np.zeros((s, s), dtype=np.uint8)
    if defect_type == "scratch":
        length = rng.uniform(0.22, 0.45) * s
        a = rng.uniform(0, np.pi)
        d = np.array([np.cos(a), np.sin(a)])
        n = np.array([-d[1], d[0]])
        p0, p2 = c - d * length / 2, c + d * length / 2
        p1 = c + n * rng.uniform(-0.2, 0.2) * length
        tt = np.linspace(0.0, 1.0, 32)[:, None]
        pts = (1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * p1 + tt**2 * p2
        width = _line_width(rng, s, 2.0, 4.49)
        cv2.polylines(m, [_poly_fixed(pts)], False, 255, thickness=width, lineType=cv2.LINE_8, shift=4)
    elif defect_type == "crack":
        steps = int(rng.integers(9, 15))
        step = rng.uniform(0.22, 0.42) * s / steps
        a = rng.uniform(0, 2 * np.pi)
        pts = [c.copy()]
        for _ in range(steps):
            a += rng.uniform(-0.8, 0.8)
            pts.append(pts[-1] + step * np.array([np.cos(a), np.sin(a)]) * rng.uniform(0.6, 1.4))
        width = _line_width(rng, s, 2.0, 3.49)
        cv2.polylines(m, [_poly_fixed(np.array(pts))], False, 255, thickness=width, lineType=cv2.LINE_8, shift=4)
        if rng.random() < 0.6:  # a short side branch
            k = int(rng.integers(2, steps - 1))
            b = a + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
            q = [pts[k]]
            for _ in range(int(rng.integers(2, 5))):
                b += rng.uniform(-0.6, 0.6)
                q.append(q[-1] + 0.8 * step * np.array([np.cos(b), np.sin(b)]))
            branch = [_poly_fixed(np.array(q))]
            cv2.polylines(m, branch, False, 255, thickness=max(2, width - 1), lineType=cv2.LINE_8, shift=4)
    elif defect_type == "spot":
        m = _blob(rng, s, c, rng.uniform(0.03, 0.065) * s)
    elif defect_type == "color":
        m = _blob(rng, s, c, rng.uniform(0.05, 0.1) * s)
    mask = (m > 0) & allowed
    if not mask.any():
        return mask, img
    f = img.astype(np.float32)
    local = float(_luma(f)[mask].mean())
    if defect_type == "scratch":
        # A groove: bright metal showing through on dark surfaces, a dark line on bright ones.
        # Decided per pixel, so a scratch that crosses a bright and a dark part stays visible on both.
        dark = f * rng.uniform(0.3, 0.45)
        bright = f + (255.0 - f) * rng.uniform(0.65, 0.8)
        sigma = max(1.0, 4.0 * s / 256.0)  # smoothed, so a fine texture does not turn the line into dashes
        new = np.where((cv2.GaussianBlur(_luma(f), (0, 0), sigma) > 140)[..., None], dark, bright)
    elif defect_type == "crack":
        new = f * rng.uniform(0.12, 0.25)
    elif defect_type == "spot":
        if local > 110:
            stain = np.float32([48, 36, 28]) * rng.uniform(0.8, 1.2)
        else:
            stain = np.float32([226, 220, 204]) * rng.uniform(0.9, 1.05)
        amount = rng.uniform(0.75, 0.9)
        new = f * (1 - amount) + stain * amount
    else:  # color: recolour the region with a hue far from its own, keeping the shading
        palette = np.float32([[205, 45, 40], [45, 160, 60], [50, 85, 210], [225, 185, 30], [150, 60, 175]])
        mean_col = f[mask].mean(axis=0)
        dist = np.linalg.norm(palette - mean_col, axis=1)
        target = palette[int(np.argmax(dist))] * rng.uniform(0.85, 1.1)
        rel = np.clip(_luma(f) / max(local, 1.0), 0.5, 1.5)
        new = target * rel[..., None]
    return mask, np.clip(new, 0, 255)


def apply_defect(
    image: np.ndarray, object_mask: np.ndarray, defect_type: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one synthetic defect on an image.

    The defect is placed on the object (inside ``object_mask`` shrunk by a couple of pixels, so anti-aliased
    edges are never touched), has a mask area between :data:`MIN_DEFECT_AREA` and :data:`MAX_DEFECT_AREA` of the
    image and a mean absolute change of at least :data:`MIN_DEFECT_CONTRAST` grey levels where the image allows
    it. Only the masked pixels are changed.

    Args:
        image: RGB uint8 image (H, W, 3) with H == W.
        object_mask: bool (H, W) mask of the object (all True for textures).
        defect_type: one of :data:`DEFECT_TYPES`.
        rng: random generator; it is advanced.

    Returns:
        ``(defective_image, defect_mask)``: a new RGB uint8 image and the bool mask of exactly the pixels that
        were altered (binarised: every pixel outside it is byte-identical to ``image``).
    """
    if defect_type not in DEFECT_TYPES:
        raise DatasetError(f"demo data defect type {defect_type!r} is unknown; choose from {', '.join(DEFECT_TYPES)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.shape[0] != image.shape[1]:
        raise ValueError(f"apply_defect needs a square RGB uint8 image, got shape {image.shape} {image.dtype}")
    s = image.shape[0]
    obj = np.asarray(object_mask, dtype=bool)
    if obj.shape != image.shape[:2] or not obj.any():
        raise ValueError("apply_defect needs a non-empty object mask of the image's size")
    if obj.all():
        allowed = obj
    else:
        allowed = cv2.erode(obj.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, s // 128)) > 0
        if not allowed.any():
            allowed = obj
    total = float(s * s)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(_MAX_ATTEMPTS):
        mask, new = _propose(defect_type, image, allowed, rng)
        area = mask.sum() / total
        if area == 0:
            continue
        change = float(np.abs(new[mask] - image[mask].astype(np.float32)).mean())
        ok_area = MIN_DEFECT_AREA <= area <= MAX_DEFECT_AREA
        if ok_area and change >= MIN_DEFECT_CONTRAST:
            best = (0.0, mask, new)
            break
        # Keep the candidate closest to the allowed ranges as a fallback for tiny images.
        miss = (
            max(0.0, MIN_DEFECT_AREA - area) / MIN_DEFECT_AREA
            + max(0.0, area - MAX_DEFECT_AREA) / MAX_DEFECT_AREA
            + max(0.0, MIN_DEFECT_CONTRAST - change) / MIN_DEFECT_CONTRAST
        )
        if best is None or miss < best[0]:
            best = (miss, mask, new)
    if best is None:  # pragma: no cover - only for degenerate object masks
        raise ValueError(f"could not place a {defect_type} defect on the object")
    if best[0] > 0:
        logger.debug("%s defect outside the target ranges (miss %.2f) at image size %d", defect_type, best[0], s)
    _, mask, new = best
    out = image.copy()
    out[mask] = np.rint(new[mask]).astype(np.uint8)
    return out, mask


def render_sample(
    class_name: str, size: int, seed: int, split: str, defect: str, index: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw the image (and defect mask, ``None`` for ``defect == "good"``) that the data set stores for a key."""
    rng = sample_rng(seed, class_name, split, defect, index)
    image, obj = render_good(class_name, rng, size)
    if defect == "good":
        return image, None
    return apply_defect(image, obj, defect, rng)


# ----------------------------------------------------------------------------------------------------------
# Writing the data set
# ----------------------------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict | None:
    """The marker's content if ``path`` holds a valid marker written by this generator, else None."""
    try:
        data = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != _GENERATOR_ID:
        return None
    return data


def _check_target(out: Path, overwrite: bool) -> bool:
    """Check that ``out`` may be written; return True when an existing folder must be removed first."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DatasetError(f"demo data output {out} exists and is not a folder; choose another path")
    if not out.exists():
        return False
    if not any(out.iterdir()):
        return True
    if not overwrite:
        raise DatasetError(
            f"demo data output folder {out} is not empty; choose a new or empty folder, or pass --overwrite "
            f"to replace a demo data set generated there before"
        )
    if _read_marker(out) is None:
        raise DatasetError(
            f"refusing to overwrite {out}: it has no valid {MARKER_NAME} marker, so it was not made by the demo "
            f"data generator; delete it yourself or choose another folder"
        )
    for p in out.rglob("*"):
        if p.is_symlink() or (p.is_file() and p.suffix.lower() != ".png" and p != out / MARKER_NAME):
            raise DatasetError(
                f"refusing to overwrite {out}: it holds {p}, which the demo data generator did not write; "
                f"move that file away or choose another folder"
            )
    return True


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write an RGB (H, W, 3) or grey (H, W) uint8 array as PNG."""
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise DatasetError(f"could not write image {path}")


def generate_demo_dataset(
    out_dir: str | Path,
    config: DemoDataConfig = DemoDataConfig(),
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Generate the demo data set in MVTec AD layout under ``out_dir``.

    The data set is written to a hidden sibling folder first and moved into place when complete, so an
    interrupted run never leaves a half-written data set at ``out_dir``.

    Args:
        out_dir: output folder; it must not exist or be empty, unless ``overwrite`` is set.
        config: what to generate.
        overwrite: replace an existing folder, but only one that this generator wrote (it holds the
            ``DEMO_DATASET.json`` marker and nothing but PNG files besides).
        progress: show a tqdm progress bar over the images.

    Returns:
        The output folder.

    Raises:
        DatasetError: an invalid setting, or an output folder that may not be written.
    """
    config.validate()
    out = Path(out_dir).expanduser().absolute()
    _check_target(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise DatasetError(f"cannot create the demo data output folder {out}: {exc}") from exc
    size = config.image_size
    splits: list[tuple[str, str, int]] = [("train", "good", config.train_good), ("test", "good", config.test_good)]
    splits += [("test", d, config.test_per_defect) for d in config.defect_types]
    total = len(config.classes) * sum(n for _, _, n in splits)
    counts: dict[str, dict[str, int]] = {}
    try:
        os.chmod(tmp, 0o755)
        with tqdm(total=total, unit="img", desc="demo data", disable=not progress) as bar:
            for cls in config.classes:
                counts[cls] = {}
                for split, defect, n in splits:
                    img_dir = tmp / cls / split / defect
                    img_dir.mkdir(parents=True, exist_ok=True)
                    mask_dir = tmp / cls / "ground_truth" / defect
                    if defect != "good" and n > 0:
                        mask_dir.mkdir(parents=True, exist_ok=True)
                    for i in range(n):
                        image, mask = render_sample(cls, size, config.seed, split, defect, i)
                        _write_png(img_dir / f"{i:03d}.png", image)
                        if mask is not None:
                            _write_png(mask_dir / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
                        bar.update(1)
                    counts[cls][f"{split}/{defect}"] = n
        marker = {
            "generator": _GENERATOR_ID,
            "marker_version": _MARKER_VERSION,
            "layout": "mvtec",
            "config": config.to_dict(),
            "counts": counts,
            "images": total,
            "masks": len(config.classes) * config.test_per_defect * len(config.defect_types),
            "defect_area_range": [MIN_DEFECT_AREA, MAX_DEFECT_AREA],
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if _check_target(out, overwrite):  # re-check just before deleting anything
            if any(out.iterdir()):
                shutil.rmtree(out)
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d demo images of %d class(es) to %s", total, len(config.classes), out)
    return out
