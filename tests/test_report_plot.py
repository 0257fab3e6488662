"""The accuracy-vs-latency plot of the results page: every label readable, clear of the other labels and of the
markers, axes fitted to the points, and labels that tell apart rows the plain label would not."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from gradad.benchmarks.report_page import (LEADER_MIN_PX, MARKER_AREA, PLOT_DPI, Results, classify, place_labels,
                                           plot_figure, plot_points, write_plot)
from gradad.benchmarks.results_io import load_result_files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _apart(a: Any, b: Any) -> bool:
    """Whether two (x0, y0, x1, y1) boxes share no area."""
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _crowded_points() -> list[dict[str, Any]]:
    """A band of near points (as the real MTD rows are), three of them at identical coordinates, and a second
    dataset far above."""
    points = [{"dataset": "mtd", "label": f"edge ORT INT8 · bundle_{i}", "method": "grad", "ms": 22.0 + 0.7 * i,
               "auroc": 0.893 + 0.0002 * (i % 3)} for i in range(8)]
    points += [{"dataset": "mtd", "label": f"same spot {i}", "method": "grad", "ms": 30.0, "auroc": 0.894}
               for i in range(3)]
    points += [{"dataset": "demo", "label": "PatchCore", "method": "patchcore", "ms": 72.3, "auroc": 1.0},
               {"dataset": "demo", "label": "edge ORT FP32", "method": "grad", "ms": 22.2, "auroc": 1.0}]
    return points


def _drawn(points: list[dict[str, Any]]) -> tuple[Any, list[Any], list[Any], list[str]]:
    """Draw the figure; its axes, the rendered boxes of the texts beside the points and of the markers (pixels), and
    the entries of the numbered key (empty when the points carry their labels)."""
    fig = plot_figure(points)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    texts = [tuple(t.get_window_extent(renderer).extents) for t in ax.texts]
    half = math.sqrt(MARKER_AREA) / 2 * PLOT_DPI / 72
    centres = ax.transData.transform([(p["ms"], 100 * p["auroc"]) for p in points])
    markers = [(x - half, y - half, x + half, y + half) for x, y in centres]
    legend = ax.get_legend()
    key = [t.get_text() for t in legend.get_texts()] if legend.get_title().get_text() == "points" else []
    return ax, texts, markers, key


def _assert_readable(points: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """Every text beside a point clears every other text and every marker and lies inside the axes; each point's
    label is written beside it (points of one dataset at one spot share a text, a line each) or, numbered, in the
    key. Returns the axes and the key."""
    ax, texts, markers, key = _drawn(points)
    for (i, a), (j, b) in itertools.combinations(enumerate(texts), 2):
        assert _apart(a, b), (ax.texts[i].get_text(), ax.texts[j].get_text())
    for (i, text), marker in itertools.product(enumerate(texts), markers):
        assert _apart(text, marker), (ax.texts[i].get_text(), "on a marker")
    x0, y0, x1, y1 = ax.bbox.extents
    assert all(x0 <= b[0] and b[2] <= x1 and y0 <= b[1] and b[3] <= y1 for b in texts)
    spots = {(p["ms"], p["auroc"], p["dataset"]) for p in points}
    assert len(texts) == len(spots)
    if key:
        written = sorted((n for t in ax.texts for n in t.get_text().split(", ")), key=int)
        assert written == [str(n) for n in range(1, len(points) + 1)]
        assert sorted(entry.split("  ", 1)[1] for entry in key) == sorted(p["label"] for p in points)
    else:
        written = [line for t in ax.texts for line in t.get_text().split("\n")]
        assert sorted(written) == sorted(p["label"] for p in points)
    return ax, key


def _real_points() -> list[dict[str, Any]]:
    return plot_points(classify(load_result_files(RESULTS)))


def test_real_results_are_labelled_beside_their_points_clear_of_each_other() -> None:
    points = _real_points()
    ax, key = _assert_readable(points)
    assert not key  # the committed results are few enough to be labelled in place
    ms = [p["ms"] for p in points]
    lo, hi = ax.get_xlim()
    assert min(ms) / 1.5 < lo < min(ms) and max(ms) < hi < max(ms) * 1.5


def test_real_results_labels_tell_apart_rows_of_different_bundles() -> None:
    points = _real_points()
    by_dataset: dict[str, list[str]] = {}
    for p in points:
        by_dataset.setdefault(p["dataset"], []).append(p["label"])
    for labels in by_dataset.values():
        assert len(labels) == len(set(labels)), labels
    int8 = sorted(p["label"] for p in points if "INT8" in p["label"])
    # the int8- and uint8-activation bundles: the label names the bundle
    assert int8 == ["edge ORT INT8 · s22_gain_prec", "edge ORT INT8 · s22_gain_prec_u8"]


def test_points_at_identical_coordinates_share_one_label_a_line_each() -> None:
    points = _real_points()
    alone = next(p for p in points if p["label"] == "PatchCore" and p["auroc"] < 0.9)  # bottom right, on its own
    points += [{**alone, "label": f"PatchCore · copy {i}"} for i in range(3)]
    ax, key = _assert_readable(points)
    assert not key
    assert "PatchCore\nPatchCore · copy 0\nPatchCore · copy 1\nPatchCore · copy 2" in [t.get_text() for t in ax.texts]


def test_points_at_identical_coordinates_inside_the_crowd_stay_readable() -> None:
    points = _real_points()
    crowded = next(p for p in points if p["label"].endswith("_u8"))
    _assert_readable(points + [{**crowded, "label": f"{crowded['label']} · copy {i}"} for i in range(3)])


def test_a_crowded_band_is_numbered_with_a_key_when_labels_cannot_all_fit() -> None:
    _, key = _assert_readable(_crowded_points())
    assert key


def test_labels_of_points_at_one_spot_are_placed_apart_with_lines_back() -> None:
    point = (200.0, 200.0)
    spots = place_labels([point] * 4, [(90.0, 12.0)] * 4, (0.0, 0.0, 600.0, 400.0))
    assert all(s.hidden == 0 and s.crossings == 0 for s in spots)
    for a, b in itertools.combinations(spots, 2):
        assert _apart(a.box, b.box)
    for s in spots:
        near = (min(max(point[0], s.box[0]), s.box[2]), min(max(point[1], s.box[1]), s.box[3]))
        if s.leader is None:  # only a label right by its point goes without a line
            assert math.dist(point, near) <= LEADER_MIN_PX
        else:  # the line runs from the point's marker to its own label
            assert s.leader[1] == near and math.dist(point, s.leader[0]) < math.dist(point, near)


def test_labels_that_cannot_all_fit_are_reported_as_hidden() -> None:
    """The plot numbers its points when a label is hidden, so a placement that had to overlap must say so."""
    spots = place_labels([(50.0, 20.0)] * 3, [(90.0, 12.0)] * 3, (0.0, 0.0, 400.0, 40.0))
    assert any(s.hidden for s in spots)
    for a, b in itertools.combinations(spots, 2):  # of two labels that overlap, one at least says so
        assert _apart(a.box, b.box) or a.hidden or b.hidden


def test_rows_alike_but_for_their_file_are_told_apart_by_the_file() -> None:
    """Two PatchCore runs on one dataset (no model file to name) read 'PatchCore · <result file>'; a label no
    other point shares stays plain."""
    def acc(auroc: float, method: str = "patchcore", model: str | None = None) -> dict[str, Any]:
        return {"method": method, "preset": "edge", "backend": "pytorch", "precision": "fp32", "device": "cpu",
                "model": model, "per_class": {"mean": {"image_auroc": auroc}}}

    lat = {"rows": [{"method": m, "preset": "edge", "backend": "pytorch", "precision": "fp32", "device": "cpu",
                     "bundle": None, "batch1": {"latency_ms": {"total": {"p50": ms}}}}
                    for m, ms in (("patchcore", 70.0), ("grad", 50.0))]}
    data = {"name": "tiles"}
    res = Results(accuracy={"old_run.json": {"dataset": data, "rows": [acc(0.90), acc(0.97, "grad", "runs/a/m.pt")]},
                            "new_run.json": {"dataset": data, "rows": [acc(0.92)]}},
                  latency={"lat.json": lat})
    labels = sorted(p["label"] for p in plot_points(res))
    assert labels == ["PatchCore · new_run", "PatchCore · old_run", "edge PyTorch FP32"]


def test_the_plot_file_is_the_same_bytes_each_time(tmp_path: Path) -> None:
    points = _crowded_points()
    first, second = write_plot(points, tmp_path / "a.png"), write_plot(points, tmp_path / "b.png")
    assert first is not None and second is not None and first.read_bytes() == second.read_bytes()
