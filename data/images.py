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
import re
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

import gradad
from gradad.errors import DatasetError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from gradad.data.datasets import Sample

logger = logging.getLogger(__name__)

#: Threshold used to binarise 8-bit ground-truth masks (``mask > MASK_THRESHOLD``).
MASK_THRESHOLD = 127

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_INTER_NEAREST = getattr(cv2, "INTER_NEAREST_EXACT", cv2.INTER_NEAREST)


#: bytes a pixel can take in an image file OpenCV decodes (float64 RGBA, uncompressed; ASCII PNM stays below), and
#: the room for headers, metadata and an embedded thumbnail: a larger file cannot be one image within the decode
#: cap. TIFF is not held to it: a multi-page stack is decoded as its first page, whatever the pages after it hold.
_MAX_BYTES_PER_PIXEL = 32
_FILE_OVERHEAD_BYTES = 64 * 2 ** 20
_MULTI_PAGE_SUFFIXES = (".tif", ".tiff")


def _read_bytes(path: Path, what: str) -> np.ndarray:
    """Read a whole file into a uint8 buffer (works with non-ASCII paths on every OS); a file (but a TIFF) larger
    than any image within the decode cap can be is refused before it is read (a many-gigabyte file named .png
    would be read whole before the cap applies)."""
    if not path.exists():
        raise DatasetError(f"{what} file not found: {path}")
    if not path.is_file():
        raise DatasetError(f"{what} path is not a file: {path}")
    try:
        size, cap = path.stat().st_size, pixel_cap()
        if size > cap * _MAX_BYTES_PER_PIXEL + _FILE_OVERHEAD_BYTES and path.suffix.lower() not in _MULTI_PAGE_SUFFIXES:
            raise DatasetError(f"{what} file {path} is {size / 2 ** 20:.0f} MiB: larger than any image of at most "
                               f"{cap} pixels can be, so it was not read (raise {PIXEL_LIMIT_ENV} for larger images)")
        return np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read {what} file ({exc.strerror or exc}): {path}") from None


#: The environment variable holding OpenCV's decode cap (gradad sets it to ``gradad.MAX_IMAGE_PIXELS`` on import
#: unless the user did).
PIXEL_LIMIT_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
_PIXEL_LIMIT_VALUE = re.compile(r"([0-9]+)(KB|Kb|kb|MB|Mb|mb)?")  # what OpenCV accepts there


def _max_pixels() -> str:
    """The decode cap in force, as written in the environment (for messages)."""
    return os.environ.get(PIXEL_LIMIT_ENV, "2^30")


def pixel_cap() -> int:
    """The decode cap as a number of pixels: :data:`PIXEL_LIMIT_ENV` as OpenCV reads it (``KB`` / ``MB``: times
    1024 / 1024**2), else ``gradad.MAX_IMAGE_PIXELS``. OpenCV applies it to still images only; the runtime's video
    and stream sources hold their frames to it themselves."""
    match = _PIXEL_LIMIT_VALUE.fullmatch(os.environ.get(PIXEL_LIMIT_ENV, ""))
    if match is None:
        return int(gradad.MAX_IMAGE_PIXELS)
    return int(match[1]) * {"": 1, "kb": 1024, "mb": 1024 * 1024}[(match[2] or "").lower()]


def _refuse_empty_file(buf: np.ndarray, path: Path, what: str) -> None:
    """A zero-byte file (an interrupted copy, a placeholder) is named as such, not as a corrupt image."""
    if buf.size == 0:
        raise DatasetError(f"{what} file is empty (0 bytes): {path}")


def _undecodable(buf: np.ndarray, path: Path, what: str) -> DatasetError:
    """The error for a file the colour decode refused: a pixel type OpenCV reads but the product does not (float
    or 32-bit TIFF) is named as such; anything else is corrupt, not an image, or too large."""
    # only TIFF holds float / 32-bit samples among the types read: no second decode (and libpng's second complaint
    # on stderr) for a truncated PNG or JPEG
    raw = _decode(buf, cv2.IMREAD_UNCHANGED) if bytes(buf[:4]) in _TIFF else None
    if raw is not None and raw.size and raw.dtype not in (np.uint8, np.uint16):
        channels = 1 if raw.ndim == 2 else raw.shape[2]
        return DatasetError(f"unsupported pixel type {raw.dtype} ({channels} channel(s)): {what}s are read as 8- or "
                            f"16-bit integers; convert it to 8-bit PNG: {path}")
    return DatasetError(f"cannot decode {what} (corrupt, not an image, or over {_max_pixels()} pixels: raise "
                        f"OPENCV_IO_MAX_IMAGE_PIXELS for larger ones): {path}")


#: The largest 8-bit value a 16-bit image holding only its low 12 bits gives: 4095 / 256 is 15 when truncated (PNG)
#: and 16 when rounded (OpenCV's TIFF conversion); the raw maximum then decides.
_LOW_12_BIT_MAX_8 = 16
#: File signatures: PNG, and TIFF little and big endian (the formats read here that hold 16-bit images).
_PNG = b"\x89PNG"
_TIFF = (b"II*\x00", b"MM\x00*")
#: Byte offset of a PNG's bit depth (signature 8 + IHDR length 4 + type 4 + width 4 + height 4).
_PNG_BIT_DEPTH_AT = 24
#: Whether the 12-bit-in-16 warning was given in this process (a camera loop over a folder reads every frame
#: through read_image_rgb: one warning, not one per frame).
_warned_low_bits = False


def _may_be_16_bit(buf: np.ndarray) -> bool:
    """Cheap pre-check on the file header: a 16-bit PNG (its IHDR says so) or any TIFF (its depth needs parsing)."""
    head = bytes(buf[:4])
    if head == _PNG:
        return buf.size > _PNG_BIT_DEPTH_AT and int(buf[_PNG_BIT_DEPTH_AT]) == 16
    return head in _TIFF


def _warn_if_low_12_bits(buf: np.ndarray, img: np.ndarray, path: Path) -> None:
    """Warn once per process about a 16-bit image that uses only its low 12 bits (max <= 4095, what a 12-bit
    camera writes): it is scaled as 16-bit (/ 256, the rule training, calibration and grad-run share and must
    keep sharing) and so reads nearly black. The extra decode runs only for a near-black result of a 16-bit PNG
    or a TIFF file, and no check at all after the warning or for an 8-bit PNG or a JPEG (grad-run reads every
    frame of a folder source through here)."""
    global _warned_low_bits
    if _warned_low_bits or not _may_be_16_bit(buf) or int(img.max()) > _LOW_12_BIT_MAX_8:
        return
    raw = _decode(buf, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype != np.uint16 or int(raw.max()) > 4095:
        return
    _warned_low_bits = True
    logger.warning("16-bit image uses only its low 12 bits (max %d of 65535): it is scaled as 16-bit (value / 256) "
                   "and reads nearly black (max %d of 255); convert such images to 8 bit (value / 16) or scale "
                   "them to the full 16-bit range (value * 16) (warned once per process): %s",
                   int(raw.max()), int(img.max()), path)


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
    8 bits (OpenCV ``IMREAD_COLOR`` semantics: value / 256, so 12-bit data in a 16-bit file reads nearly black,
    with one warning per process).

    Raises:
        DatasetError: the file is missing, unreadable, empty (0 bytes), of an unsupported pixel type (float or
            32-bit), or cannot be decoded as an image.
    """
    path = Path(path)
    buf = _read_bytes(path, "image")
    _refuse_empty_file(buf, path, "image")
    if _IMREAD_RGB is not None:
        img = _decode(buf, _IMREAD_RGB)
    else:  # older OpenCV: decode BGR then swap
        img = _decode(buf, cv2.IMREAD_COLOR)
        if img is not None:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise _undecodable(buf, path, "image")
    if img.dtype != np.uint8:  # defensive; IMREAD_COLOR already yields uint8
        img = cv2.convertScaleAbs(img)
    _warn_if_low_12_bits(buf, img, path)
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
    _refuse_empty_file(buf, path, "mask")
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
