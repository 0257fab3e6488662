"""The images a run trains on — good images of every root, the validation split, their content digests and the
labelled defects — chosen and checked before any feature is extracted (minutes on real data): a run refused for
its data is refused at once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from gradad.bundle import image_digest
from gradad.data.datasets import Sample, load_samples_from_roots
from gradad.errors import DatasetError
from gradad.text import first_few
from gradad.training.config import RunConfig
from gradad.training.defects import defect_samples, drop_empty_masks
from gradad.training.features import load_images
from gradad.training.validation import validation_indices

log = logging.getLogger(__name__)


@dataclass
class TrainingImages:
    """The images a run trains on, chosen and checked before any feature is extracted (minutes on real data)."""

    samples: list[Sample]  # every good training image (train + validation)
    val_idx: np.ndarray  # indices into ``samples`` of the validation images
    digests: list[str]  # content digest of every image of ``samples``
    defects: list[Sample] | None  # labelled defects with a mask that marks a defect (or no mask file)
    defect_masks: np.ndarray | None  # their (N, size, size) bool pixel masks

    @property
    def val_files(self) -> list[str]:
        """Resolved paths of the validation images, sorted."""
        return sorted(str(self.samples[i].image_path.resolve()) for i in self.val_idx)

    @property
    def trained_digests(self) -> list[str]:
        """Content digests of the good images the model trains on (:func:`trained_good_digests`)."""
        held = set(int(i) for i in self.val_idx)
        return sorted({d for i, d in enumerate(self.digests) if i not in held})

    @property
    def train_classes(self) -> list[str]:
        """Class name of every good image the stages train on (validation images left out)."""
        held = set(int(i) for i in self.val_idx)
        return [s.class_name for i, s in enumerate(self.samples) if i not in held]

    def names_by_digest(self) -> dict[str, str]:
        """A file (as the dataset root names it) for every digest, to name new images in messages."""
        return {d: str(s.image_path) for s, d in zip(self.samples, self.digests)}


def _check_roots(cfg: RunConfig) -> None:
    """A relative dataset root that does not exist is read from the current folder: say so (a run's config.yaml
    used from another folder names its roots as they were typed where it started)."""
    for root in cfg.data.roots:
        path = Path(root).expanduser()
        if not path.is_absolute() and not path.exists():
            raise DatasetError(f"dataset root does not exist: {root} (a relative path, read from the current folder "
                               f"{Path.cwd()}: pass --data with its path from here)")


def select_training_images(cfg: RunConfig) -> TrainingImages:
    """The good training images of every root, the validation split, their digests and the labelled defects,
    checked (a defect that is a copy of a good image, empty defect masks) before any feature is extracted."""
    _check_roots(cfg)
    roots = cfg.data.roots
    samples = [s for s in load_samples_from_roots(roots, "train", cfg.data.classes, cfg.data.layout) if s.label == 0]
    if len(samples) < 2:
        raise DatasetError(f"need at least 2 good training images under {', '.join(roots)}, found {len(samples)}")
    val_idx = validation_indices(samples, cfg.data.val_fraction)
    if len(samples) - len(val_idx) < 2:
        raise DatasetError(f"data.val_fraction = {cfg.data.val_fraction} leaves fewer than 2 training images")
    _warn_classes_without_validation(samples, val_idx, cfg.data.val_fraction)
    digests = [image_digest(s.image_path) for s in tqdm(samples, desc="training-image digests", leave=False)]
    defects = masks = None
    if cfg.data.defects:
        defects = defect_samples(cfg.data.defects, cfg.data.defect_masks, {s.class_name for s in samples})
        refuse_goods_as_defects(defects, dict(zip(digests, samples)), cfg.data.defects)
        _, masks = load_images(defects, cfg.data.image_size, desc="reading defect masks")
        defects, masks = drop_empty_masks(defects, masks, cfg.data.defect_masks)
    return TrainingImages(samples, val_idx, digests, defects, masks)


def refuse_goods_as_defects(defects: Sequence[Sample], goods: dict[str, Sample], folder: str) -> None:
    """Refuse labelled defects that are copies (by content) of good images this run trains or validates on
    (``goods``: digest -> sample): stage 1 would learn them as defective and stage 2 as good."""
    same = [(d, goods[dig]) for d in defects if (dig := image_digest(d.image_path)) in goods]
    if same:
        shown = first_few(f"{d.image_path} (= {g.image_path})" for d, g in same)
        raise DatasetError(f"--defects {folder}: {len(same)} of its {len(defects)} image(s) are copies of good "
                           f"images this run trains or validates on; a part cannot be both good and defective: "
                           f"{shown}")


def _fewest_for_validation(fraction: float) -> int:
    """The fewest good images of a class that give it a validation image at ``fraction`` (validation_indices)."""
    return max(2, int(round(1.0 / fraction))) // 2 + 1


def _warn_classes_without_validation(samples: Sequence[Sample], val_idx: np.ndarray, fraction: float) -> None:
    """Warn once about the classes that hold out no validation image: what it costs and how many images they
    need. A class without one plays no part in model selection or the fusion fit; with none at all, no stage
    picks its best epoch, stage 3 gives the abnormal branch no weight and the image score is normalised on
    training images."""
    if fraction <= 0:
        return  # asked for: data.val_fraction = 0
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.class_name] = counts.get(s.class_name, 0) + 1
    held = {samples[int(i)].class_name for i in val_idx}
    none = {c: n for c, n in sorted(counts.items()) if c not in held}
    if not none:
        return
    listed = ", ".join(f"{c} ({n})" for c, n in none.items())
    need = _fewest_for_validation(fraction)
    if not held:
        log.warning("no validation images: every class has too few good images (%s) for data.val_fraction = %s: "
                    "no stage picks its best epoch (each keeps its last), stage 3 fits no fusion weight (w = 0: the "
                    "abnormal branch is unused) and the image score is normalised on training images; a class "
                    "needs at least %d good images", listed, fraction, need)
    else:
        log.warning("class(es) %s hold out no validation image (too few good images for data.val_fraction = %s): "
                    "they take no part in the choice of each stage's epoch or in the fusion weight, and their "
                    "image score is normalised on training images; a class needs at least %d good images",
                    listed, fraction, need)
