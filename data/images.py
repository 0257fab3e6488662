"""Image and mask I/O and resizing (numpy + OpenCV only; shared by training, evaluation and the lean runtime).

Conventions:
- images are ``uint8`` arrays of shape ``(H, W, 3)`` in **RGB** order;
- masks are ``bool`` arrays of shape ``(H, W)``; a ground-truth mask file is binarised with ``value > threshold``
  (default 127, so the grey anti-aliased edges of MVTec-style masks count as background);
- every failure caused by a file (missing, unreadable, corrupt, wrong size) raises
  :class:`gradad.errors.DatasetError` with a one-line message naming the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from gradad.errors import DatasetError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gradad.data.datasets import Sample

logger = logging.getLogger(__name__)

#: Threshold used to binarise 8-bit ground-truth masks (``mask > MASK_THRESHOLD``).
MASK_THRESHOLD = 127

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_INTER_NEAREST = getattr(cv2, "INTER_NEAREST_EXACT", cv2.INTER_NEAREST)


def _read_bytes(path: Path, what: str) -> np.ndarray:
    """Read a whole file into a uint8 buffer (works with non-ASCII paths on every OS)."""
    if not path.exists():
        raise DatasetError(f"{what} file not found: {path}")
    if not path.is_file():
        raise DatasetError(f"{what} path is not a file: {path}")
    try:
        return np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read {what} file ({exc.strerror or exc}): {path}") from None


def _max_pixels() -> str:
    """The decode cap in force (gradad sets OPENCV_IO_MAX_IMAGE_PIXELS on import unless the user did)."""
    return os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "2^30")


def _decode(buf: np.ndarray, flags: int) -> np.ndarray | None:
    if buf.size == 0:
        return None
    try:
        return cv2.imdecode(buf, flags)
    except cv2.error:
        return None


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Grayscale images are expanded to three channels, an alpha channel is dropped and 16-bit images are scaled to
    8 bits (OpenCV ``IMREAD_COLOR`` semantics).

    Raises:
        DatasetError: the file is missing, unreadable, or cannot be decoded as an image.
    """
    path = Path(path)
    buf = _read_bytes(path, "image")
    if _IMREAD_RGB is not None:
        img = _decode(buf, _IMREAD_RGB)
    else:  # older OpenCV: decode BGR then swap
        img = _decode(buf, cv2.IMREAD_COLOR)
        if img is not None:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise DatasetError(f"cannot decode image (corrupt, not an image, or over {_max_pixels()} pixels: raise "
                           f"OPENCV_IO_MAX_IMAGE_PIXELS for larger ones): {path}")
    if img.dtype != np.uint8:  # defensive; IMREAD_COLOR already yields uint8
        img = cv2.convertScaleAbs(img)
    return np.ascontiguousarray(img)


def read_mask(
    path: str | Path,
    expected_hw: tuple[int, int] | None = None,
    threshold: int = MASK_THRESHOLD,
) -> np.ndarray:
    """Read a ground-truth mask file as an ``(H, W)`` bool array (``True`` = anomalous pixel).

    The file is binarised with ``value > threshold`` (8-bit scale; 16-bit and float masks are rescaled); an integer
    mask whose largest value is 1 is a 0/1 label mask and reads with ``value > 0`` whatever the threshold. A colour
    mask counts a pixel as anomalous when any of its colour channels passes the threshold (for grey masks this
    is the same as reading them as grayscale). Use ``threshold=0`` for label masks whose defect pixels hold small
    non-zero values (raw VisA masks).

    Args:
        path: the mask file.
        expected_hw: ``(height, width)`` of the image the mask belongs to; a different mask size is an error.
        threshold: binarisation threshold on the 0-255 scale.

    Raises:
        DatasetError: the file is missing, unreadable, not decodable, or its size differs from ``expected_hw``.
    """
    path = Path(path)
    buf = _read_bytes(path, "mask")
    raw = _decode(buf, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0 or raw.ndim not in (2, 3):
        raise DatasetError(f"cannot decode mask (corrupt, not an image, or over {_max_pixels()} pixels: raise "
                           f"OPENCV_IO_MAX_IMAGE_PIXELS for larger ones): {path}")
    if raw.ndim == 3:
        raw = raw[:, :, :3].max(axis=2) if raw.shape[2] >= 3 else raw[:, :, 0]
    if np.issubdtype(raw.dtype, np.integer) and int(raw.max()) <= 1:
        # a 0/1 label mask (what many labelling tools export): value 1 is the defect whatever the threshold, else
        # the mask would read as empty and its defect as a good image's pixels
        mask = raw > 0
    elif raw.dtype == np.uint8:
        mask = raw > threshold
    elif raw.dtype == np.uint16:
        mask = raw > threshold * 257
    elif np.issubdtype(raw.dtype, np.floating):
        mask = raw > (threshold / 255.0)
    else:
        mask = raw > threshold
    if expected_hw is not None:
        eh, ew = int(expected_hw[0]), int(expected_hw[1])
        mh, mw = mask.shape
        if (mh, mw) != (eh, ew):
            raise DatasetError(
                f"mask size {mh}x{mw} (HxW) does not match its image size {eh}x{ew}: {path}"
            )
    return np.ascontiguousarray(mask, dtype=bool)


def _check_size(size: int) -> int:
    size = int(size)
    if size <= 0:
        raise ValueError(f"resize size must be a positive integer, got {size}")
    return size


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an image to ``size x size`` (aspect ratio is not kept); see :func:`resize_hw`."""
    size = _check_size(size)
    return resize_hw(img, size, size)


def resize_hw(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an image to ``height x width``, the one resize rule of training and deployment.

    Each axis that shrinks is resampled with ``cv2.INTER_AREA`` (anti-aliased), each that grows with
    ``cv2.INTER_LINEAR``; an image that shrinks along one axis and grows along the other (a narrow tile: 476 of the
    1,050 MTD photographs at 256 px) takes one pass per axis, so the shrinking axis is never sampled without
    averaging (one bilinear pass skipped pixels there: 2.4x down on the 5 % narrowest). An image that already has
    the target size is returned unchanged (same array).
    """
    h, w = img.shape[:2]
    shrunk_h, shrunk_w = min(h, height), min(w, width)
    if (shrunk_h, shrunk_w) != (h, w):  # average down every axis that shrinks...
        img = cv2.resize(img, (shrunk_w, shrunk_h), interpolation=cv2.INTER_AREA)
    if (shrunk_h, shrunk_w) != (height, width):  # ...then interpolate up every axis that grows
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    return img


def resize_mask(mask: np.ndarray, size: int, width: int | None = None) -> np.ndarray:
    """Resize a mask to ``size x size`` (or ``size x width``) with nearest-neighbour interpolation; bool result.

    Note that shrinking a mask a lot can drop defects thinner than the sampling step.
    """
    size = _check_size(size)
    width = size if width is None else _check_size(width)
    m = np.asarray(mask)
    if m.shape[:2] == (size, width):
        return m.astype(bool, copy=True)
    out = cv2.resize(m.astype(np.uint8), (width, size), interpolation=_INTER_NEAREST)
    return out.astype(bool)


def load_sample_arrays(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Load one dataset sample as model-ready arrays.

    Reads the image, reads its mask (checked against the image's original size; an all-``False`` mask when
    ``sample.mask_path`` is ``None``), and resizes both to ``size x size``.

    Returns:
        ``(image, mask)``: uint8 ``(size, size, 3)`` RGB image and bool ``(size, size)`` mask.

    Raises:
        DatasetError: the image or mask cannot be read, or the mask size differs from the image size.
    """
    image = read_image_rgb(sample.image_path)
    hw = (int(image.shape[0]), int(image.shape[1]))
    if sample.mask_path is not None:
        threshold = getattr(sample, "mask_threshold", MASK_THRESHOLD)
        mask = read_mask(sample.mask_path, expected_hw=hw, threshold=threshold)
    else:
        mask = np.zeros(hw, dtype=bool)
    return resize_image(image, size), resize_mask(mask, size)
