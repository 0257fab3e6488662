"""Reading a tuning split (``grad-bench split``'s split.json): which labelled test images were spent on training
or tuning and must never be scored. Shared by the benchmarks, ``grad-refine tune --split`` and anything else that
needs to leave those images out; writing a split is ``gradad.benchmarks.split``."""

from __future__ import annotations

import json
import logging
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gradad.data.datasets import Sample
from gradad.errors import DatasetError

SPLIT_FILE = "split.json"

log = logging.getLogger(__name__)


def read_held_out(path: str | Path) -> set[str]:
    """Resolved image paths listed in a split.json (or the split folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    try:
        data = json.loads(path.read_text())
        return {str(Path(p)) for p in data["held_out"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read the tuning split {path}: {exc}") from exc


#: Prefix of a content-digest entry among recorded image paths: a model file copied into a bundle names its
#: labelled defects by content (``digest:<image_digest>``), never by the training machine's paths.
DIGEST_PREFIX = "digest:"


def sample_matcher(keys: Set[str]) -> Callable[[Sample], bool]:
    """Whether ``keys`` (resolved paths and/or ``digest:`` entries) name a sample's image; an image file is read
    (for its digest) only when some key names one by content."""
    by_content = any(k.startswith(DIGEST_PREFIX) for k in keys)

    def names(sample: Sample) -> bool:
        if str(Path(sample.image_path).resolve()) in keys:
            return True
        if not by_content:
            return False
        from gradad.bundle import image_digest

        return DIGEST_PREFIX + image_digest(sample.image_path) in keys

    return names


def partition_by_paths(samples: Sequence[Sample], paths: Set[str]) -> tuple[list[Sample], list[Sample]]:
    """(samples ``paths`` does not name, those it names: by resolved image path or ``digest:`` content entry),
    each in the given order."""
    names = sample_matcher(paths)
    kept: list[Sample] = []
    matched: list[Sample] = []
    for s in samples:
        (matched if names(s) else kept).append(s)
    return kept, matched


def exclude_held_out(samples: Sequence[Sample], held_out: set[str]) -> list[Sample]:
    """``samples`` without the held-out images; an exclusion list that matches nothing is an error."""
    kept, _ = partition_by_paths(samples, held_out)
    if held_out and len(kept) == len(samples):
        raise DatasetError("the tuning split names none of the test images: was it made for other data roots?")
    return kept


@dataclass(frozen=True)
class ScoringSelection:
    """The test images an evaluation may score and how many were left out, and why."""

    kept: list[Sample]
    n_split: int  # left out because the tuning split holds them
    n_trained: int  # left out because stage 1 of the model trained on them
    n_tuned: int  # left out because they were held out of stage 1 to pick its epoch and fit the fusion weight
    n_trained_goods: int = 0  # good test images that are copies of the model's training goods (by content)


def scoring_selection(samples: Sequence[Sample], split: str | Path | None, trained: set[str],
                      tuned: Set[str] = frozenset(), trained_goods: Set[str] = frozenset()) -> ScoringSelection:
    """The test images an evaluation may score: without a tuning split's images (``split``: its split.json or
    folder, optional), without the labelled defects the model's training used: ``trained`` (resolved paths;
    may already include ``tuned``) and ``tuned`` (held out of stage 1 for its self-check and the fusion fit), and
    without good images whose content digest is among ``trained_goods`` (the model's ``trained_good_digests``: a
    generic folder layout picks its test goods by position, so goods added later move training images there)."""
    kept = list(samples)
    n_split = 0
    if split:
        kept = exclude_held_out(kept, read_held_out(split))
        n_split = len(samples) - len(kept)
        log.info("tuning split %s: %d test images left out of scoring", split, n_split)
    kept, used = partition_by_paths(kept, set(trained) | set(tuned))
    n_tuned = sum(map(sample_matcher(tuned), used))
    if used:  # the model learnt or was tuned on these: scoring them would flatter it
        log.warning("%d test images left out of scoring: the model's training used them (%d trained stage 1, %d "
                    "picked its epoch and fitted the fusion weight)", len(used), len(used) - n_tuned, n_tuned)
    n_goods = 0
    if trained_goods:
        from gradad.bundle import image_digest

        before = len(kept)
        kept = [s for s in kept if s.label != 0 or image_digest(s.image_path) not in trained_goods]
        n_goods = before - len(kept)
        if n_goods:
            log.warning("%d good test images left out of scoring: the model trained on them (the same content; "
                        "a folder layout picks its test goods by position, and goods added since moved these)",
                        n_goods)
    return ScoringSelection(kept, n_split, len(used) - n_tuned, n_tuned, n_goods)
