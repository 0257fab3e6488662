"""Labelled defect images for optional real-defect supervision of stage 1 (``grad-train --defects DIR``).

The paper trains the abnormal branch on D+/D- "from FBP or Ground_Truth": a quality engineer's handful of real
defects, with masks, sits in the stage-1 batches next to the synthetic anomalies. This is what a memory-bank
method such as PatchCore cannot use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gradad.data.datasets import Sample, is_image_file
from gradad.data.images import read_mask
from gradad.errors import DatasetError

log = logging.getLogger(__name__)

#: a feature cell counts as defective when at least this fraction of its pixels is (the cell is 8x8 pixels)
CELL_FRACTION = 0.25


@dataclass
class DefectSet:
    """Features (N, C, h, w) of defect images and their masks at feature resolution (N, 1, h, w) in {0, 1}."""

    features: torch.Tensor
    masks: torch.Tensor
    samples: list[Sample]

    def batch(self, size: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` random defect images (with replacement) as float32 on ``device``."""
        idx = torch.randint(len(self.features), (size,), generator=gen)
        return self.features[idx].to(device, torch.float32), self.masks[idx].to(device, torch.float32)

    def subset(self, indices: list[int]) -> "DefectSet":
        """The defects at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return DefectSet(self.features[idx], self.masks[idx], [self.samples[i] for i in indices])

    def split(self, holdout: float) -> tuple["DefectSet", "DefectSet | None"]:
        """(training defects, held-out defects): ``round(n * holdout)`` images of each defect folder, spread over
        its sorted files, are held out, but at least one image of every folder stays in training."""
        by_folder: dict[Path, list[int]] = {}
        for i, s in enumerate(self.samples):
            by_folder.setdefault(s.image_path.parent, []).append(i)
        train, held = [], []
        for members in by_folder.values():
            n_held = min(len(members) - 1, int(round(len(members) * holdout)))
            step = len(members) / n_held if n_held else 0
            picked = {members[int(step * k + step / 2)] for k in range(n_held)}
            train += [i for i in members if i not in picked]
            held += sorted(picked)
        return self.subset(train), (self.subset(held) if held else None)


def _mask_for(image: Path, images_dir: Path, masks_dir: Path | None) -> Path | None:
    if masks_dir is None:
        return None
    rel = image.relative_to(images_dir).parent
    for name in (f"{image.stem}_mask", image.stem):
        for ext in (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"):
            candidate = masks_dir / rel / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    return None


def defect_samples(images_dir: str | Path, masks_dir: str | Path | None,
                   classes: Collection[str] | None = None) -> list[Sample]:
    """Every image under ``images_dir`` (sub-folders allowed) with its mask at the same relative path in
    ``masks_dir`` (``<stem>_mask.*`` or ``<stem>.*``). A masks folder that lacks an image's mask is an error.

    An image's class is its top folder when that names one of ``classes`` (``DIR/<class>/image`` or
    ``DIR/<class>/<type>/image``); without ``classes``, the top folder of ``DIR/<class>/<type>/image`` (the layout
    of ``grad-bench split``); otherwise "defects" (no known class)."""
    images_dir = Path(images_dir)
    masks = Path(masks_dir) if masks_dir else None
    if not images_dir.is_dir():
        raise DatasetError(f"defect folder not found: {images_dir} (setting data.defects)")
    if masks is not None and not masks.is_dir():
        raise DatasetError(f"defect mask folder not found: {masks} (setting data.defect_masks)")
    files = sorted(p for p in images_dir.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DatasetError(f"defect folder {images_dir} holds no images")
    samples = []
    for f in files:
        mask = _mask_for(f, images_dir, masks)
        if masks is not None and mask is None:
            raise DatasetError(f"no mask for defect image {f} in {masks} (expected <stem>_mask.png or <stem>.png)")
        parts = f.relative_to(images_dir).parts
        named = parts[0] in classes if classes is not None else len(parts) >= 3
        samples.append(Sample(f, parts[0] if len(parts) >= 2 and named else "defects", "train", 1, f.parent.name,
                              mask))
    return samples


def cell_masks(pixel_masks: torch.Tensor, feat_hw: tuple[int, int], has_mask: list[bool]) -> torch.Tensor:
    """(N, H, W) bool pixel masks -> (N, 1, h, w) cell labels; images without a mask file are all defective.

    A cell is defective when at least CELL_FRACTION of its pixels are; a thin or small defect that reaches that
    fraction in no cell still marks the cell it covers most, so a labelled defect never trains as all normal. An
    empty mask gives no cell: :func:`drop_empty_masks` leaves such defects out before (an empty mask here stays all
    normal)."""
    frac = F.adaptive_avg_pool2d(pixel_masks.float()[:, None], feat_hw)
    cells = (frac >= CELL_FRACTION).float()
    thin = 0
    for i, known in enumerate(has_mask):
        if not known:
            cells[i] = 1.0
        elif not cells[i].any() and frac[i].max() > 0:
            flat = cells[i].view(-1)
            flat[int(frac[i].view(-1).argmax())] = 1.0
            thin += 1
    if thin:
        log.info("%d labelled defect(s) cover less than %.0f%% of every feature cell: each marks its most covered "
                 "cell", thin, 100 * CELL_FRACTION)
    return cells


_NAMES_SHOWN = 3  # files named in a message; a large labelled set would flood it


def _named(samples: list[Sample]) -> str:
    """The first few files of ``samples``, and how many more there are."""
    shown = ", ".join(str(s.image_path) for s in samples[:_NAMES_SHOWN])
    return shown + (f", ... ({len(samples) - _NAMES_SHOWN} more)" if len(samples) > _NAMES_SHOWN else "")


def _full_size_cover(sample: Sample, size: int) -> np.ndarray | None:
    """The mask of ``sample`` at ``size`` marking every pixel a defect pixel of the full-size mask falls in (area
    interpolation, not nearest-neighbour: a defect thinner than the sampling step stays), or None when the mask
    file has no defect pixel at all."""
    full = read_mask(sample.mask_path, threshold=sample.mask_threshold)
    if not full.any():
        return None
    return cv2.resize(full.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0


def drop_empty_masks(samples: list[Sample], masks: np.ndarray, masks_dir: str | Path | None
                     ) -> tuple[list[Sample], np.ndarray]:
    """The labelled defects whose masks mark a defect, and their (N, size, size) bool masks.

    A mask with no pixel above the binarisation threshold would teach stage 1 that its defect is normal: such a
    defect is left out, with one warning naming how many and the first few (MTD has tiny defects whose masks
    vanish when binarised). A mask that only lost its defect when shrunk to the working size (nearest-neighbour
    drops thin lines) is redrawn from the full-size file instead. None left: one error naming ``masks_dir``."""
    keep, empty = [], []
    masks = masks.copy()
    for i, sample in enumerate(samples):
        if sample.mask_path is None or masks[i].any():
            keep.append(i)
            continue
        cover = _full_size_cover(sample, masks.shape[-1])
        if cover is None:
            empty.append(sample)
        else:
            masks[i] = cover
            keep.append(i)
    if empty and not keep:
        raise DatasetError(f"--masks {masks_dir}: every mask of the {len(samples)} labelled defect(s) is empty (no "
                           f"pixel above the threshold), so none could train as a defect: {_named(empty)}")
    if empty:
        log.warning("%d labelled defect(s) left out of stage 1: their masks in %s mark no defect pixel (a tiny "
                    "defect lost when binarised?), so they would train as normal: %s", len(empty), masks_dir,
                    _named(empty))
    return [samples[i] for i in keep], masks[keep]
