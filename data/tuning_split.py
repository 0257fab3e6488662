"""Reading a tuning split (``grad-bench split``'s split.json): which labelled test images were spent on training
or tuning and must never be scored. Shared by the benchmarks, ``grad-refine tune --split`` and anything else that
needs to leave those images out; writing a split is ``gradad.benchmarks.split``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from gradad.data.datasets import Sample
from gradad.errors import DatasetError

SPLIT_FILE = "split.json"


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
