"""Duplicate and near-identical calibration images: counted once, so copies cannot fake a large calibration set.

Twelve copies of one image are one observation: counted as twelve they shrink the false-alarm bound and set a
threshold that flags most distinct good parts.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from gradad.data.images import read_image_rgb

log = logging.getLogger(__name__)

THUMB = 32  # near-identical check on 32x32 grey thumbnails
NEAR_MEAN_ABS = 1.0  # grey levels (0..255): re-encodings and copies, not two photographs of two parts


def _fingerprint(path: Path) -> tuple[str, np.ndarray]:
    """(SHA-256 of the decoded pixels, 32x32 grey thumbnail as float32)."""
    image = read_image_rgb(path)
    digest = hashlib.sha256(str(image.shape).encode() + image.tobytes()).hexdigest()
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return digest, cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()


def _near_copy(thumb: np.ndarray, kept: list[np.ndarray], means: np.ndarray) -> int:
    """Index of a kept thumbnail within NEAR_MEAN_ABS mean absolute difference, or -1.

    Only thumbnails whose mean brightness is that close can qualify (|mean difference| <= mean |difference|).
    """
    if not kept:
        return -1
    candidates = np.flatnonzero(np.abs(means - thumb.mean()) <= NEAR_MEAN_ABS)
    for i in candidates:
        if float(np.abs(kept[i] - thumb).mean()) <= NEAR_MEAN_ABS:
            return int(i)
    return -1


def distinct_images(files: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """(files that are not copies of an earlier one, [(copy, the file it repeats)]), in input order."""
    kept: list[Path] = []
    thumbs: list[np.ndarray] = []
    by_digest: dict[str, Path] = {}
    copies: list[tuple[Path, Path]] = []
    for path in files:
        digest, thumb = _fingerprint(Path(path))
        original = by_digest.get(digest)
        if original is None:
            near = _near_copy(thumb, thumbs, np.array([t.mean() for t in thumbs]))
            original = kept[near] if near >= 0 else None
        if original is not None:
            copies.append((Path(path), original))
            continue
        by_digest[digest] = Path(path)
        kept.append(Path(path))
        thumbs.append(thumb)
    return kept, copies


def duplicates_warning(n_files: int, copies: list[tuple[Path, Path]]) -> str:
    """The warning text for ``copies`` among ``n_files`` calibration images."""
    copy, original = copies[0]
    return (f"{len(copies)} of {n_files} good images are duplicates or near-identical copies of others (e.g. "
            f"{copy} = {original}): calibrating on the {n_files - len(copies)} distinct images only")
