"""Reading a tuning split (``grad-bench split``'s split.json): which labelled test images were spent on training
or tuning and must never be scored. Shared by the benchmarks, ``grad-refine tune --split`` and anything else that
needs to leave those images out; writing a split is ``gradad.benchmarks.split``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

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


def partition_by_paths(samples: Sequence[Sample], paths: set[str]) -> tuple[list[Sample], list[Sample]]:
    """(samples whose resolved image path is not in ``paths``, those whose path is), each in the given order."""
    kept: list[Sample] = []
    matched: list[Sample] = []
    for s in samples:
        (matched if str(s.image_path.resolve()) in paths else kept).append(s)
    return kept, matched


def exclude_held_out(samples: Sequence[Sample], held_out: set[str]) -> list[Sample]:
    """``samples`` without the held-out images; an exclusion list that matches nothing is an error."""
    kept, _ = partition_by_paths(samples, held_out)
    if held_out and len(kept) == len(samples):
        raise DatasetError("the tuning split names none of the test images: was it made for other data roots?")
    return kept


def scored_samples(samples: Sequence[Sample], split: str | Path | None, trained: set[str]
                   ) -> tuple[list[Sample], int, int]:
    """The test images an evaluation may score: without a tuning split's images (``split``: its split.json or
    folder, optional) and without the labelled defects a model's stage 1 trained on (``trained``: resolved paths).
    Returns (kept, number left out for the split, number left out as trained)."""
    kept = list(samples)
    n_split = 0
    if split:
        kept = exclude_held_out(kept, read_held_out(split))
        n_split = len(samples) - len(kept)
        log.info("tuning split %s: %d test images left out of scoring", split, n_split)
    kept, learnt = partition_by_paths(kept, trained)
    if learnt:  # the model learnt these: scoring them would flatter it
        log.warning("%d test images left out of scoring: stage 1 of the model trained on them", len(learnt))
    return kept, n_split, len(learnt)
