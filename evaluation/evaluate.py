"""Turn predictions on a test set into the metrics JSON/markdown and per-class figures (numpy + OpenCV only)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gradad.data.datasets import Sample
from gradad.evaluation.figures import save_overlay_figure
from gradad.evaluation.metrics import per_class_metrics
from gradad.evaluation.report import write_results

log = logging.getLogger(__name__)


def evaluate_predictions(
    samples: Sequence[Sample],
    scores: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    threshold: float | None = None,
    f1_images: np.ndarray | None = None,
    class_thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per-class and mean metrics (unified protocol: one model, metrics class by class); ``f1_images``: the
    images the F1 at ``threshold`` may score (see :func:`gradad.evaluation.metrics.compute_metrics`);
    ``class_thresholds``: a class's own threshold in place of ``threshold``."""
    return per_class_metrics(
        [s.class_name for s in samples],
        [s.defect_type for s in samples],
        np.array([s.label for s in samples]),
        scores,
        masks,
        maps,
        threshold=threshold,
        f1_images=f1_images,
        class_thresholds=class_thresholds,
    )


def pick_figure_indices(samples: Sequence[Sample], scores: np.ndarray, per_class: int) -> list[int]:
    """A few images per class for figures: the highest-scoring good image and one image per defect type."""
    chosen: list[int] = []
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.class_name, []).append(i)
    for idx in by_class.values():
        picks: list[int] = []
        good = [i for i in idx if samples[i].label == 0]
        if good:
            picks.append(max(good, key=lambda i: scores[i]))
        seen: set[str] = set()
        for i in idx:
            if samples[i].label == 1 and samples[i].defect_type not in seen:
                seen.add(samples[i].defect_type)
                picks.append(i)
        chosen += picks[:per_class]
    return chosen


_UNSAFE_NAME_CHARS = re.compile(r"[^\w.+-]+")


def _name_part(text: str) -> str:
    """``text`` as a harmless file-name part: separators and other odd characters become ``-``, no leading dot."""
    return _UNSAFE_NAME_CHARS.sub("-", text).lstrip(".") or "-"


def figure_file_name(sample: Sample) -> str:
    """The figure's file name: class, defect type and image stem, each made one plain name part, so a class
    or defect name read from a dataset file (a VisA CSV) never places the figure outside the figures folder."""
    parts = (sample.class_name, sample.defect_type, sample.image_path.stem)
    return "_".join(_name_part(p) for p in parts) + ".png"


def save_figures(
    out_dir: Path,
    samples: Sequence[Sample],
    scores: np.ndarray,
    maps: np.ndarray,
    images: np.ndarray,
    masks: np.ndarray,
    per_class: int = 5,
) -> list[Path]:
    """Write image | ground truth | heat-map PNGs; maps share one colour range per class so they compare."""
    ranges: dict[str, tuple[float, float]] = {}
    for cls in {t.class_name for t in samples}:
        cls_maps = maps[[j for j, t in enumerate(samples) if t.class_name == cls]]
        ranges[cls] = float(np.min(cls_maps)), float(np.percentile(cls_maps, 99.9))
    paths = []
    for i in pick_figure_indices(samples, scores, per_class):
        s = samples[i]
        vmin, vmax = ranges[s.class_name]
        name = figure_file_name(s)
        title = f"{s.class_name}/{s.defect_type}/{s.image_path.name}  score {scores[i]:.3f}"
        paths.append(save_overlay_figure(out_dir / "figures" / name, images[i],
                                         masks[i] if s.label else None, maps[i], title=title, vmin=vmin, vmax=vmax))
    return paths


def write_evaluation(out_dir: str | Path, name: str, metrics: dict[str, Any], meta: dict[str, Any]) -> tuple[Path, Path]:
    """metrics.json/.md with run metadata in front of the per-class results."""
    return write_results({**meta, "per_class": metrics}, out_dir, name)
