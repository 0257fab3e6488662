"""The results page: ``benchmarks/results/README.md`` and an accuracy-vs-latency plot, made only from the JSON
files in the results folder (``grad-bench report`` or ``python -m gradad.benchmarks.report_page``).

Every number on the page comes from a JSON file; the prose around it is chosen by comparing those numbers, so a
re-run that changes a conclusion changes the sentence too.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from gradad.benchmarks.accuracy import (F1_CALIBRATED, METHOD_GRAD, METHOD_NORMAL_ONLY, METHOD_PATCHCORE,
                                        comparison_table, operating_point_table, summary_table)
from gradad.benchmarks.environment import engine_note
from gradad.benchmarks.gpu_check import KIND_GPU, gpu_device_line, gpu_row_groups
from gradad.benchmarks.latency import latency_table, row_notes
from gradad.benchmarks.results_io import (KIND_ACCURACY, KIND_LATENCY, KIND_PREPARATION, KIND_REFINE,
                                          load_result_files)
from gradad.errors import GradError
from gradad.files import atomic_write_text
from gradad.runtime.refine_result import STATUS_EMPTY_REGION

log = logging.getLogger(__name__)

README = "README.md"
TITLE = "# Benchmark results"  # the first line of every page this module writes
PLOT = "accuracy_vs_latency.png"
PLOT_DPI = 120
#: metrics compared in the prose: (key, name)
COMPARED = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupr", "pixel AUPR"),
            ("pro", "PRO"))
DEFECT_METRICS = ("image_auroc", "pixel_auroc", "pro")
LOAD_MARGIN = 1.0  # load average above threads + this: the row shared the CPU with other jobs
PAPER_WEIGHTS_NOTE = ("The `paper` preset (EfficientNet-b6 stages 3/4, 9 BasicBlocks, R_g = 8) appears in latency "
                      "and model size only: its ImageNet weights cannot be downloaded on this machine, so it has no "
                      "trained model here (`--set backbone.weights=/path/to/b6.pth` where the file exists).")


@dataclass
class Results:
    """The result files of one folder, by kind."""

    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    complexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime: dict[str, dict[str, Any]] = field(default_factory=dict)
    preparation: dict[str, dict[str, Any]] = field(default_factory=dict)
    refine: dict[str, dict[str, Any]] = field(default_factory=dict)
    gpu: dict[str, dict[str, Any]] = field(default_factory=dict)  # grad-bench gpu
    other: list[str] = field(default_factory=list)  # JSON of other tools: linked, with their command


def classify(files: dict[str, dict[str, Any]]) -> Results:
    """Sort result files by kind: grad-bench accuracy/latency/refine/gpu, complexity counts, grad-run benchmark
    summaries; anything else is listed under other results."""
    out = Results()
    for name, data in files.items():
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind == KIND_ACCURACY:
            out.accuracy[name] = data
        elif kind == KIND_LATENCY:
            out.latency[name] = data
        elif kind == KIND_PREPARATION:
            out.preparation[name] = data
        elif kind == KIND_REFINE:
            out.refine[name] = data
        elif kind == KIND_GPU:
            out.gpu[name] = data
        elif isinstance(data, dict) and isinstance(data.get("presets"), list):
            out.complexity[name] = data
        elif isinstance(data, dict) and isinstance(data.get("runs"), list):
            out.runtime[name] = data
        else:
            out.other.append(name)
            # the message says which of the two it is: a file with a kind this page has no section for is a
            # grad-bench (or newer) result, not a foreign file
            why = (f"kind {kind!r} not rendered here" if kind is not None
                   else "not a grad-bench result file (no JSON object with a 'kind')")
            log.info("%s: %s; listed under other results", name, why)
    return out


def pct(value: Any) -> str:
    """0.934 -> '93.4'; missing -> '–'."""
    return "–" if value is None else f"{100 * float(value):.1f}"


def find(rows: Iterable[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    """First row whose fields equal every ``want`` item."""
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def grad_reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The GRAD row other rows are compared with: ONNX Runtime FP32 (what a line runs), else PyTorch."""
    return (find(rows, method=METHOD_GRAD, backend="onnxruntime", precision="fp32")
            or find(rows, method=METHOD_GRAD, backend="pytorch"))


def same_shown(a: float, b: float) -> bool:
    """Equal as the page prints them (percent, one decimal): the prose never calls 99.8 vs 99.8 a win."""
    return pct(a) == pct(b)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Metric names where mean of ``a`` is (higher, equal, lower) than ``b``, with both values."""
    higher, equal, lower = [], [], []
    for key, name in COMPARED:
        va, vb = a["per_class"]["mean"].get(key), b["per_class"]["mean"].get(key)
        if va is None or vb is None:
            continue
        text = f"{name} {pct(va)} vs {pct(vb)}"
        (equal if same_shown(va, vb) else higher if va > vb else lower).append(text)
    return higher, equal, lower


def _join(parts: list[str]) -> str:
    return "; ".join(parts) if parts else "none"


def comparison_sentence(subject: str, other: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    """'X vs Y — ahead on ..., level on ..., behind on ...' from the mean metrics."""
    higher, equal, lower = compare(a, b)
    return (f"{subject} vs {other}: ahead on {_join(higher)}; level on {_join(equal)}; behind on {_join(lower)}.")


def skip_notes(result: dict[str, Any]) -> list[str]:
    """One sentence per row the run could not measure here, with the reason (``Failed`` for a row that was
    attempted and failed)."""
    return [f"{str(s.get('status', 'skipped')).capitalize()} {s['label']}: {s['reason']}."
            for s in result.get("skipped", [])]


def accuracy_notes(result: dict[str, Any]) -> list[str]:
    """Prose for one dataset: F1 rule, PatchCore and NORMAL-only comparisons, skipped rows."""
    rows = result["rows"]
    notes = []
    cal = result.get("calibration")
    if cal:
        data = cal.get("data") or {}
        dirs = ", ".join(data.get("good_dirs") or []) or "?"
        own = next((r["f1"]["class_thresholds"] for r in rows if (r.get("f1") or {}).get("class_thresholds")), None)
        at = (f"each class's own calibrated threshold ({', '.join(f'{c} {t:.4g}' for c, t in sorted(own.items()))}, "
              "as `grad-run --class` runs)" if own else f"the bundle's calibrated threshold {cal['threshold']:.4g}")
        notes.append(f"F1 of GRAD rows is at {at} (method `{cal['method']}`, {data.get('n_good')} good images from "
                     f"{dirs}); rule score > threshold. Rows marked (oracle) have no calibration and report the best "
                     "F1 over thresholds.")
    else:
        notes.append("No calibrated bundle: F1 is the oracle best F1 over thresholds (marked).")
    ref = grad_reference(rows)
    torch_row = find(rows, method=METHOD_GRAD, backend="pytorch")
    if ref and torch_row and ref is not torch_row:
        diff = abs(ref["per_class"]["mean"]["image_auroc"] - torch_row["per_class"]["mean"]["image_auroc"])
        notes.append(f"ONNX Runtime FP32 and PyTorch image AUROC differ by {100 * diff:.2f} points.")
        f1_ref, f1_torch = ref["f1"], torch_row["f1"]
        if f1_ref["kind"] == F1_CALIBRATED and not same_shown(f1_ref["mean"], f1_torch["mean"]):
            notes.append(f"F1 at the calibrated threshold differs between them ({pct(f1_torch['mean'])} PyTorch vs "
                         f"{pct(f1_ref['mean'])} ONNX Runtime): the threshold sits on a calibration score, and "
                         "PyTorch scores differ from ONNX Runtime's in the 5th-6th digit.")
    fp16 = find(rows, method=METHOD_GRAD, backend="onnxruntime", precision="fp16")
    if ref and fp16 and ref is not fp16:
        diff = fp16["per_class"]["mean"]["image_auroc"] - ref["per_class"]["mean"]["image_auroc"]
        notes.append(f"FP16 ONNX changes mean image AUROC by {100 * diff:+.2f} points vs FP32.")
    patchcore = find(rows, method=METHOD_PATCHCORE)
    if ref and patchcore:
        notes.append(comparison_sentence(f"GRAD {ref['preset']}", "PatchCore", ref, patchcore)
                     + f" PatchCore memory bank {patchcore['memory_bank'][0]}×{patchcore['memory_bank'][1]} "
                       f"({100 * patchcore['config']['coreset_ratio']:g}% coreset), fit {patchcore['fit_seconds']} s.")
    normal = find(rows, method=METHOD_NORMAL_ONLY)
    if ref and normal:
        higher, _, lower = compare(normal, ref)
        tally = f"ahead on {len(higher)} of {len(COMPARED)} metrics, behind on {len(lower)}"
        if len(higher) > len(lower):
            verdict = (f"The NORMAL-only ablation (no abnormal grids, no stage 1) is *better* than the full bi-grid "
                       f"model here ({tally}) — unlike the paper's Table II; the abnormal branch's settings (FBP "
                       "intensity, stage-1 length, fusion weight) are the first thing to tune.")
        elif len(lower) > len(higher):
            gains = [(ref["per_class"]["mean"].get(k), normal["per_class"]["mean"].get(k)) for k, _ in COMPARED]
            clear = sum(1 for a, b in gains if a is not None and b is not None and a - b >= 0.01 - 1e-9)
            verdict = (f"The full bi-grid model is ahead of its NORMAL-only ablation on more metrics (the ablation is "
                       f"{tally}), by at least 1 point on {clear} of them (the paper's Table II has the abnormal "
                       "grid adding 0.8-6.6 points).")
        else:
            verdict = f"The NORMAL-only ablation and the full bi-grid model are level here ({tally})."
        notes.append(comparison_sentence("NORMAL-only", f"full GRAD {ref['preset']}", normal, ref) + " " + verdict)
    notes += [f"{note}." for note in filter(None, map(engine_note, rows))]  # what each TensorRT row ran
    return notes + skip_notes(result)


def defect_table(result: dict[str, Any]) -> list[str]:
    """Per defect type (image AUROC / pixel AUROC / PRO) of each row, for single-class datasets."""
    rows = result["rows"]
    classes = result["dataset"]["classes"]
    if len(classes) != 1 or not rows:
        return []
    cls = classes[0]
    defects = list(rows[0]["per_class"][cls].get("by_defect", {}))
    if not defects:
        return []
    lines = ["| defect | " + " | ".join(r["label"] for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for d in defects:
        cells = []
        for r in rows:
            m = r["per_class"][cls]["by_defect"].get(d, {})
            cells.append(" / ".join(pct(m.get(k)) for k in DEFECT_METRICS))
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    ref = grad_reference(rows) or rows[0]
    worst = min(defects, key=lambda d: ref["per_class"][cls]["by_defect"][d].get("pro") or 0.0)
    return ["Per defect type (image AUROC / pixel AUROC / PRO, each defect type against the class's good images):",
            "", *lines, "",
            f"Hardest defect type for {ref['label']}: **{worst}** (PRO "
            f"{pct(ref['per_class'][cls]['by_defect'][worst].get('pro'))})."]


def sections(title: str, files: dict[str, dict[str, Any]], block: Callable[[str, dict[str, Any]], list[str]]
             ) -> list[str]:
    """A ``## title`` section with one block per result file; nothing when there are no files."""
    out = [f"## {title}", ""] if files else []
    for name, result in files.items():
        out += block(name, result)
    return out


def accuracy_block(name: str, result: dict[str, Any]) -> list[str]:
    """Summary table, notes and per-defect table of one accuracy file."""
    ds = result["dataset"]
    out = [f"### {ds['name']} — `{name}`", "",
           f"{ds['n_test_images']} test images ({ds['n_anomalous']} anomalous), classes: "
           f"{', '.join(ds['classes'])}. Mean over classes; percent.", "",
           summary_table(result["rows"]),
           "s / image: wall time of this accuracy run per test image (PyTorch rows include reading the images; "
           "PatchCore's excludes its fit) — the Latency section has the controlled timings.", ""]
    paired = comparison_table(result["rows"])
    out += [f"- {n}" for n in accuracy_notes(result)] + [""] + operating_point_table(result)
    return out + ([paired] if paired else []) + defect_table(result) + [""]


def complexity_section(res: Results) -> list[str]:
    """Model size table from complexity files."""
    out = ["## Model size", ""] if res.complexity else []
    for name, data in res.complexity.items():
        out += [f"`{name}` (`python -m gradad.benchmarks.complexity`; FLOPs = 2 × multiply-accumulates of "
                "convolutions and matrix products):", "",
                "| preset | backbone | GFLOP / image | extractor | GRAD | params extractor M | params GRAD M |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for p in data["presets"]:
            out.append(f"| {p['preset']} | {p['backbone']} | {p['gflop_total']:.2f} | {p['gflop_extractor']:.2f} | "
                       f"{p['gflop_grad']:.2f} | {p['params_extractor_m']:.2f} | {p['params_grad_m']:.2f} |")
        out.append("")
    return out


def batch1_ms(row: dict[str, Any], key: str = "p50") -> float | None:
    """Total ms per image at batch 1 (``p50`` or ``min``; None when not recorded)."""
    b1 = row.get("batch1")
    value = (b1 or {}).get("latency_ms", {}).get("total", {}).get(key)
    return None if value is None else float(value)


def latency_notes(result: dict[str, Any]) -> list[str]:
    """Ratios within one latency file: PyTorch eager vs ONNX Runtime, FP16 vs FP32, PatchCore vs GRAD."""
    rows = result["rows"]
    notes = []
    for preset in dict.fromkeys(r["preset"] for r in rows if r["method"] == METHOD_GRAD):
        eager = find(rows, method=METHOD_GRAD, preset=preset, backend="pytorch", device="cpu")
        fp32 = find(rows, method=METHOD_GRAD, preset=preset, backend="onnxruntime", precision="fp32", device="cpu")
        fp16 = find(rows, method=METHOD_GRAD, preset=preset, backend="onnxruntime", precision="fp16", device="cpu")
        if eager and fp32:
            ratio = batch1_ms(eager) / batch1_ms(fp32)
            faster, slower, factor = ("ONNX Runtime FP32", "PyTorch eager", ratio) if ratio >= 1 else (
                "PyTorch eager", "ONNX Runtime FP32", 1 / ratio)
            notes.append(f"{preset}: {faster} is {factor:.1f}× faster than {slower} on CPU ({batch1_ms(fp32):.1f} ms "
                         f"ONNX Runtime vs {batch1_ms(eager):.1f} ms eager per image).")
        if fp32 and fp16:
            ratio = batch1_ms(fp16) / batch1_ms(fp32)
            if ratio > 1:
                notes.append(f"{preset}: FP16 ONNX is {ratio:.2f}× *slower* than FP32 on this CPU (ONNX Runtime's "
                             "CPU kernels are FP32-first); FP16 is meant for TensorRT / GPUs.")
            else:
                notes.append(f"{preset}: FP16 ONNX is {1 / ratio:.2f}× faster than FP32 here.")
    bank = result.get("patchcore_bank")
    if bank and find(rows, method=METHOD_PATCHCORE):
        notes.append(f"PatchCore row: edge extractor + nearest-neighbour search over {bank['rows']} memory-bank "
                     f"features ({bank['note']}) + GRAD's map head, PyTorch eager.")
    busy = [f"{r['label']} ({max(r['load_average_1min']):.1f})" for r in rows
            if max(r.get("load_average_1min") or [0.0]) > result["threads"] + LOAD_MARGIN]
    if busy:
        notes.append(f"Measured while other jobs shared the CPU (1-min load average above {result['threads']} "
                     f"threads + {LOAD_MARGIN:g}): {', '.join(busy)}; those numbers are pessimistic.")
    if not any(r["device"] == "cuda" for r in rows):
        notes.append("No GPU on this machine: no CUDA or TensorRT rows (the harness adds them where torch.cuda / "
                     "tensorrt are available).")
    notes += [f"{note}." for note in row_notes(rows)]  # TensorRT engines run, batch sizes not measured
    return notes + skip_notes(result)


def latency_block(name: str, result: dict[str, Any]) -> list[str]:
    """Environment line, stage table, FPS by batch size and notes of one latency file."""
    env = result["environment"]
    out = [f"### `{name}`", "",
           f"{env['cpu_model']} ({env['cpu_count']} cores), GPU: {env['gpu'] or 'none'}; {result['threads']} "
           f"threads; python {env['python']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, numpy "
           f"{env['numpy']}, opencv {env['opencv']}. Decode stage: "
           f"{'; '.join(str(v) for v in result.get('decode_images', {}).values())}. Stages: ms per image, p50 "
           "at batch 1; each row ran in its own process (peak RSS is the row's).", "",
           latency_table(result["rows"]), "FPS by batch size:", "",
           "| row | " + " | ".join(f"b{b}" for b in result["settings"]["batches"]) + " |",
           "|---|" + "---:|" * len(result["settings"]["batches"])]
    for r in result["rows"]:
        fps = {b["batch"]: b["fps"] for b in r["by_batch"]}
        out.append(f"| {r['label']} | " + " | ".join(f"{fps[b]:.1f}" if b in fps else "–"
                                                      for b in result["settings"]["batches"]) + " |")
    return out + [""] + [f"- {n}" for n in latency_notes(result)] + [""]


def runtime_section(res: Results) -> list[str]:
    """``grad-run --benchmark`` summaries (end to end on an image folder)."""
    out = []
    for name, data in res.runtime.items():
        out += [f"## Runtime end to end — `{name}`", "", data.get("description", ""), "",
                "| batch | FPS | decode p50 | preprocess p50 | inference p50 / frame | total p50 / frame |",
                "|---:|---:|---:|---:|---:|---:|"]
        for run in data["runs"]:
            lat = run["latency_ms"]
            out.append(f"| {run['batch_size']} | {run['fps']:.1f} | " + " | ".join(
                f"{lat[s]['p50']:.2f} ms" for s in ("decode", "preprocess", "inference", "total")) + " |")
        out.append("")
    return out


def gpu_block(name: str, result: dict[str, Any]) -> list[str]:
    """One ``grad-bench gpu`` file: the device it ran on, what was measured (ok and failed rows with their
    summary or error) and the rows skipped here, grouped by reason."""
    measured, skipped = gpu_row_groups(result)
    counts = result.get("row_counts") or {}
    out = [f"### `{name}`", "", gpu_device_line(result)
           + (f" Rows: {counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} "
              "failed." if counts else ""), ""]
    if measured:
        out += ["| section | row | status | result / error |", "|---|---|---|---|"]
        out += [f"| {r['section']} | {r['label']} | {r['status']} | "
                f"{str(r.get('summary') or r.get('reason') or '').replace('|', '/')} |" for r in measured]
        out.append("")
    else:
        out += ["Nothing was measured on this machine: every row was skipped.", ""]
    for reason, labels in skipped.items():
        out.append(f"- Skipped {', '.join(labels)}: {reason}.")
    return out + ([""] if skipped else [])


def short_label(row: dict[str, Any]) -> str:
    """'ORT FP32', 'PyTorch FP32', 'PatchCore', ... for the plot."""
    if row["method"] == METHOD_PATCHCORE:
        return "PatchCore"
    engine = {"onnxruntime": "ORT", "pytorch": "PyTorch", "tensorrt": "TensorRT"}.get(row["backend"], row["backend"])
    prefix = "NORMAL-only " if row["method"] == METHOD_NORMAL_ONLY else ""
    return f"{prefix}{row['preset']} {engine} {row['precision'].upper()}"


def model_name(row: dict[str, Any]) -> str | None:
    """The short name of an accuracy row's model: a bundle's folder name, or the run folder of a ``.pt`` checkpoint
    (``runs/demo/model.pt`` -> ``demo``); None for a row of no model file (PatchCore)."""
    model = row.get("model")
    if not model:
        return None
    path = PurePosixPath(str(model).replace("\\", "/"))
    return (path.parent.name if path.suffix else path.name) or str(model)


def latency_of(row: dict[str, Any], lat_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latency row of an accuracy row: its own bundle's measurement (``grad-bench latency --bundle``) where one
    exists, else the preset's on the same engine and precision (a row of no bundle; never another bundle's, whose
    weights, quantisation or input path may differ, nor a bundle file's "today" comparison row)."""
    same = {key: row[key] for key in ("method", "preset", "backend", "precision", "device")}
    own = find(lat_rows, bundle=row["model"], **same) if row.get("model") else None
    if own and batch1_ms(own):
        return own
    return find((r for r in lat_rows if not r.get("bundle") and not r.get("path")), **same)


def _distinct_tags(keys: list[tuple[Any, ...]], sources: dict[tuple[Any, ...], dict[str, list[str]]]) -> list[str]:
    """Tags telling apart points of one dataset that share a label: their models' names, else (models alike or
    unnamed) their result files' names; empty tags when neither tells them apart."""
    for kind in ("models", "files"):
        tags = [", ".join(sources[key][kind]) for key in keys]
        if all(tags) and len(set(tags)) == len(tags):
            return tags
    return [""] * len(keys)


def plot_points(res: Results) -> list[dict[str, Any]]:
    """(dataset, label, method, ms/img, image AUROC) for accuracy rows that have a matching latency row.

    A point already plotted (the same bundle scored in two result files, or two bundles that score and time alike)
    is plotted once. Points of one dataset whose labels would read the same (two INT8 bundles quantised
    differently, say) get their models' names after the label, so the plot tells them apart."""
    lat_rows = [r for data in res.latency.values() for r in data["rows"]]
    # point -> the models and result files it stands for, in the order met
    sources: dict[tuple[Any, ...], dict[str, list[str]]] = {}
    for name, result in res.accuracy.items():
        for row in result["rows"]:
            match = latency_of(row, lat_rows)
            ms = batch1_ms(match) if match else None
            if not ms:
                continue
            key = (result["dataset"]["name"], short_label(row), row["method"], ms,
                   row["per_class"]["mean"]["image_auroc"])
            seen = sources.setdefault(key, {"models": [], "files": []})
            for kind, value in (("models", model_name(row)), ("files", Path(name).stem)):
                if value and value not in seen[kind]:
                    seen[kind].append(value)
    groups: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for key in sources:
        groups.setdefault(key[:2], []).append(key)
    tag_of = {key: "" for key in sources}
    for keys in groups.values():
        if len(keys) > 1:
            tag_of.update(zip(keys, _distinct_tags(keys, sources)))
    points = []
    for key, tag in tag_of.items():
        dataset, label, method, ms, auroc = key
        points.append({"dataset": dataset, "label": f"{label} · {tag}" if tag else label, "method": method,
                       "ms": ms, "auroc": auroc})
    return points


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels (y up)
PLOT_FONT = 7  # label font size, points
MARKER_AREA = 50  # scatter marker size, points²
LABEL_GAP_PX = 2.0  # clear space kept around every label and marker
#: label offsets tried around each point, nearest first: radii (points) x directions (degrees, right first)
LABEL_RADII = (6, 12, 20, 30, 42, 56, 72, 90, 110, 135, 165, 200)
LABEL_ANGLES = (0, 180, 90, 270, 45, 315, 135, 225, 30, 330, 150, 210, 60, 300, 120, 240)
LEADER_MIN_PX = 14.0  # a label further than this from its point gets a thin line to it
CROWD_PX = 80.0  # points with more neighbours within this distance are labelled first


@dataclass
class LabelSpot:
    """Where one label went: its offset from the point (pixels), alignment, box and leader line (or None), and what
    it could not avoid: ``hidden`` (text overlapped or struck through, in pixels² or 100 a line) and ``crossings``
    (its line crossing another line or passing a marker); both 0 for a clear label."""

    offset: tuple[float, float]
    ha: str
    va: str
    box: Box
    leader: tuple[tuple[float, float], tuple[float, float]] | None
    hidden: float = 0.0
    crossings: float = 0.0


def _grow(box: Box, pad: float) -> Box:
    """The box with ``pad`` pixels added on every side."""
    return box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad


def _overlap(a: Box, b: Box) -> float:
    """Area the two boxes share (0 when they are apart or only touch)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _segment_hits_box(p: tuple[float, float], q: tuple[float, float], box: Box) -> bool:
    """Whether the segment p-q passes through the box's interior (Liang-Barsky clipping)."""
    t0, t1 = 0.0, 1.0
    dx, dy = q[0] - p[0], q[1] - p[1]
    for d, lo, hi in ((dx, box[0] - p[0], box[2] - p[0]), (dy, box[1] - p[1], box[3] - p[1])):
        if abs(d) < 1e-12:
            if not lo < 0 < hi:
                return False
            continue
        a, b = sorted((lo / d, hi / d))
        t0, t1 = max(t0, a), min(t1, b)
        if t0 >= t1:
            return False
    return True


def _segments_cross(p1: tuple[float, float], p2: tuple[float, float], q1: tuple[float, float],
                    q2: tuple[float, float]) -> bool:
    """Whether two segments cross at a point inside both (touching ends do not count)."""
    def side(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> float:
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    return side(p1, p2, q1) * side(p1, p2, q2) < 0 and side(q1, q2, p1) * side(q1, q2, p2) < 0


def _candidates(point: tuple[float, float], size: tuple[float, float], px_per_pt: float, marker_px: float
                ) -> Iterable[LabelSpot]:
    """Label spots around a point, nearest first: the text is aligned away from the point in each direction so
    that it grows outwards, never back over its own marker."""
    w, h = size
    for radius in LABEL_RADII:
        r = radius * px_per_pt
        for angle in LABEL_ANGLES:
            dx, dy = round(r * math.cos(math.radians(angle)), 6), round(r * math.sin(math.radians(angle)), 6)
            ha = "left" if dx > 0.5 else "right" if dx < -0.5 else "center"
            va = "bottom" if dy > 0.5 else "top" if dy < -0.5 else "center"
            x = point[0] + dx - {"left": 0.0, "right": w, "center": w / 2}[ha]
            y = point[1] + dy - {"bottom": 0.0, "top": h, "center": h / 2}[va]
            box = (x, y, x + w, y + h)
            near = (min(max(point[0], box[0]), box[2]), min(max(point[1], box[1]), box[3]))
            dist = math.hypot(near[0] - point[0], near[1] - point[1])
            leader = None
            if dist > LEADER_MIN_PX:  # the line starts at the marker's edge, not under it
                start = (point[0] + (near[0] - point[0]) * marker_px / dist,
                         point[1] + (near[1] - point[1]) * marker_px / dist)
                leader = (start, near)
            yield LabelSpot((dx, dy), ha, va, box, leader)


def _place_in_order(order: list[int], points: list[tuple[float, float]], sizes: list[tuple[float, float]],
                    area: Box, px_per_pt: float, marker_px: float) -> list[LabelSpot]:
    """One greedy pass of ``place_labels``, labelling the points in ``order``."""
    markers = [_grow((x - marker_px, y - marker_px, x + marker_px, y + marker_px), LABEL_GAP_PX) for x, y in points]
    inside = _grow(area, -LABEL_GAP_PX)
    placed: dict[int, LabelSpot] = {}
    for i in order:
        # markers drawn on this point's own spot are passed through by its line anyway
        others = [m for j, m in enumerate(markers) if math.dist(points[i], points[j]) > 1.0]
        boxes = [_grow(s.box, LABEL_GAP_PX) for s in placed.values()]
        lines = [s.leader for s in placed.values() if s.leader]
        best: LabelSpot | None = None
        for spot in _candidates(points[i], sizes[i], px_per_pt, marker_px):
            if not (inside[0] <= spot.box[0] and spot.box[2] <= inside[2] and inside[1] <= spot.box[1]
                    and spot.box[3] <= inside[3]):
                continue
            box = _grow(spot.box, LABEL_GAP_PX)
            # text hidden (overlapped, or struck through by a line) is worse than lines that cross
            spot.hidden = sum(_overlap(box, b) for b in boxes + markers) + sum(100.0 for a, b in lines
                                                                              if _segment_hits_box(a, b, box))
            if spot.leader:
                a, b = spot.leader
                spot.hidden += sum(100.0 for other in boxes if _segment_hits_box(a, b, other))
                spot.crossings = sum(1.0 for m in others if _segment_hits_box(a, b, m)) + sum(
                    1.0 for c, d in lines if math.dist(a, c) > 1.0 and _segments_cross(a, b, c, d))
            if best is None or (spot.hidden, spot.crossings) < (best.hidden, best.crossings):
                best = spot
            if spot.hidden == spot.crossings == 0.0:
                break
        # no spot inside the axes at all (a label wider than the plot): the first one, counted as hidden
        placed[i] = best or replace(next(iter(_candidates(points[i], sizes[i], px_per_pt, marker_px))),
                                    hidden=math.inf)
    return [placed[i] for i in range(len(points))]


def place_labels(points: list[tuple[float, float]], sizes: list[tuple[float, float]], area: Box,
                 px_per_pt: float = 1.0, marker_px: float = 6.0) -> list[LabelSpot]:
    """Greedy label placement, in display pixels: each point in turn takes the nearest spot (``_candidates``) whose
    box stays inside ``area`` and clears every marker, the labels placed so far and their leader lines, and whose
    own leader line passes through no label or other marker and crosses no other line; where none is that clear,
    a spot whose text is clear (only lines cross) beats one whose text is hidden.

    Greedy placement depends on the order, so the points are taken most crowded first, then left to right, then
    right to left, and the first clear result (else the least hidden) is returned; ``hidden``/``crossings`` on the
    spots say what could not be avoided."""
    crowd = [sum(math.dist(p, q) < CROWD_PX for q in points) for p in points]
    orders = [sorted(range(len(points)), key=lambda i: (-crowd[i], i)),
              sorted(range(len(points)), key=lambda i: (points[i][0], i)),
              sorted(range(len(points)), key=lambda i: (-points[i][0], i))]
    best: list[LabelSpot] = []
    for order in orders:
        spots = _place_in_order(order, points, sizes, area, px_per_pt, marker_px)
        cost = (sum(s.hidden for s in spots), sum(s.crossings for s in spots))
        if not best or cost < (sum(s.hidden for s in best), sum(s.crossings for s in best)):
            best = spots
        if cost == (0.0, 0.0):
            break
    return best


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Round tick values (1, 2, 5, ... x 10^k) between lo and hi: at least four where the range allows, and finer
    steps (1.1, 1.2, ... x 10^k) for a range too narrow to hold any whole step."""
    ticks: list[float] = []
    for subs in ((1,), (1, 2, 5), (1, 2, 3, 5), tuple(range(1, 10)), tuple(m / 10 for m in range(10, 100))):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in subs if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 4:
            break
    return ticks


def _label_points(ax: Any, renderer: Any, points: list[dict[str, Any]], groups: list[list[int]], texts: list[str],
                  colours: list[Any]) -> tuple[list[Any], list[LabelSpot]]:
    """Write one of ``texts`` beside each group of points (drawn at one spot) where ``place_labels`` puts it, with a
    thin leader line to a label set away from its point; returns the artists drawn (texts and lines) and the
    spots."""
    anchors = [(points[g[0]]["ms"], 100 * points[g[0]]["auroc"]) for g in groups]
    artists = [ax.annotate(text, xy, xytext=(0, 0), textcoords="offset points", fontsize=PLOT_FONT,
                           color=colours[g[0]], ha="left", va="bottom", zorder=4)
               for text, xy, g in zip(texts, anchors, groups)]
    sizes = [tuple(a.get_window_extent(renderer).size) for a in artists]
    at = [tuple(xy) for xy in ax.transData.transform(anchors)]
    px_per_pt = PLOT_DPI / 72
    spots = place_labels(at, sizes, tuple(ax.bbox.extents), px_per_pt, math.sqrt(MARKER_AREA) / 2 * px_per_pt)
    to_data = ax.transData.inverted()
    drawn = list(artists)
    for artist, spot in zip(artists, spots):
        artist.xyann = (spot.offset[0] / px_per_pt, spot.offset[1] / px_per_pt)
        artist.set_horizontalalignment(spot.ha)
        artist.set_verticalalignment(spot.va)
        if spot.leader:
            (x0, y0), (x1, y1) = to_data.transform(spot.leader)
            drawn += ax.plot([x0, x1], [y0, y1], color=artist.get_color(), linewidth=0.6, alpha=0.8, zorder=2)
    return drawn, spots


def plot_figure(points: list[dict[str, Any]]) -> Any:
    """The accuracy-vs-latency figure (an Agg ``Figure``): image AUROC vs ms per image on a log x axis fitted to the
    points. Each point is labelled where its label clears every other label and marker; where the points are too
    crowded for that, they are numbered instead and a key beside the axes names them."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    markers = {METHOD_GRAD: "o", METHOD_PATCHCORE: "s", METHOD_NORMAL_ONLY: "^"}
    datasets = list(dict.fromkeys(p["dataset"] for p in points))
    palette = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(9, 5.4), dpi=PLOT_DPI)  # the dpi it is saved at: labels are measured in its pixels
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [palette(datasets.index(p["dataset"]) % 10) for p in points]
    for p, colour in zip(points, colours):
        ax.scatter(p["ms"], 100 * p["auroc"], marker=markers.get(p["method"], "x"), color=colour, s=MARKER_AREA,
                   zorder=3)
    for i, d in enumerate(datasets):
        ax.scatter([], [], color=palette(i % 10), label=d)
    ax.set_xscale("log")
    ms = [p["ms"] for p in points]
    pad = 10 ** max(0.05, 0.06 * math.log10(max(ms) / min(ms)))  # a small margin, as a factor on the log axis
    ax.set_xlim(min(ms) / pad, max(ms) * pad)
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(min(ms) / pad, max(ms) * pad)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    aurocs = [100 * p["auroc"] for p in points]
    y_pad = max(0.5, 0.06 * (max(aurocs) - min(aurocs)))
    ax.set_ylim(min(aurocs) - y_pad, max(aurocs) + y_pad)
    ax.set_xlabel("latency, ms per image (total p50, batch 1, CPU)")
    ax.set_ylabel("image AUROC, mean over classes (%)")
    ax.set_title("Accuracy vs latency (circle: GRAD, square: PatchCore, triangle: NORMAL-only)")
    ax.grid(True, alpha=0.3)
    # beside the axes, so that it never sits on a point or a label
    datasets_legend = ax.legend(title="dataset", fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                borderaxespad=0)
    fig.tight_layout()  # before measuring: it moves the axes
    renderer = canvas.get_renderer()
    # points of one dataset at one spot (rows alike in speed and accuracy) share one label, a line each: their
    # markers are one, and separate labels would need lines crossing each other's to reach it
    by_spot: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(points):
        by_spot.setdefault((p["ms"], p["auroc"], p["dataset"]), []).append(i)
    groups = list(by_spot.values())
    drawn, spots = _label_points(ax, renderer, points, groups,
                                 ["\n".join(points[i]["label"] for i in g) for g in groups], colours)
    if any(s.hidden or s.crossings for s in spots):
        log.info("plot: the points are too crowded to label clearly; numbering them with a key beside the plot")
        for artist in drawn:
            artist.remove()
        # kept beside the key (a second ax.legend replaces the first) and, unclipped, still counted by the layout
        ax.add_artist(datasets_legend).set_clip_on(False)
        # numbered dataset by dataset, left to right, so that the key reads in the order the eye finds them
        order = sorted(range(len(points)), key=lambda i: (datasets.index(points[i]["dataset"]), points[i]["ms"],
                                                          -points[i]["auroc"], i))
        numbers = [""] * len(points)
        for n, i in enumerate(order, 1):
            numbers[i] = str(n)
        ax.legend([Line2D([], [], marker=markers.get(points[i]["method"], "x"), color=colours[i], linestyle="none",
                          markersize=5) for i in order], [f"{numbers[i]}  {points[i]['label']}" for i in order],
                  title="points", fontsize=7, loc="lower left", bbox_to_anchor=(1.02, 0.0), borderaxespad=0)
        fig.tight_layout()  # the key narrows the axes: lay out again before measuring
        _label_points(ax, renderer, points, groups, [", ".join(numbers[i] for i in g) for g in groups], colours)
    return fig


def write_plot(points: list[dict[str, Any]], path: Path) -> Path | None:
    """Scatter of image AUROC vs ms per image (log x), every point labelled; None when nothing can be plotted."""
    if not points:
        return None
    plot_figure(points).savefig(path, dpi=PLOT_DPI)
    return path


def headline(res: Results) -> list[str]:
    """The ratios users choose by: GRAD vs PatchCore on one engine (speed and accuracy), eager vs ONNX Runtime.

    Speed is compared engine with engine: GRAD's ONNX Runtime FP32 row against PatchCore's ONNX Runtime row; a
    result that timed PatchCore in PyTorch eager only is compared eager with eager, and says so."""
    lines = []
    for result in res.latency.values():
        rows = result["rows"]
        grad = find(rows, method=METHOD_GRAD, preset="edge", backend="onnxruntime", precision="fp32", device="cpu")
        patchcore = find(rows, method=METHOD_PATCHCORE, backend="onnxruntime")
        engine = "ONNX Runtime FP32"
        if patchcore is None:  # older results: PatchCore in PyTorch eager only
            grad = find(rows, method=METHOD_GRAD, preset="edge", backend="pytorch", device="cpu")
            patchcore = find(rows, method=METHOD_PATCHCORE, backend="pytorch")
            engine = "PyTorch eager"
        if not (grad and patchcore):
            continue
        speed = batch1_ms(patchcore) / batch1_ms(grad)
        acc = []
        for data in res.accuracy.values():
            ref, pc = grad_reference(data["rows"]), find(data["rows"], method=METHOD_PATCHCORE)
            if ref and pc:
                a, b = ref["per_class"]["mean"]["image_auroc"], pc["per_class"]["mean"]["image_auroc"]
                word = "equal" if same_shown(a, b) else "better" if a > b else "lower"
                acc.append(f"{word} image AUROC on {data['dataset']['name']} ({pct(a)} vs {pct(b)})")
        infer = [r["batch1"]["latency_ms"]["inference"]["p50"] for r in (patchcore, grad)]
        fastest = [batch1_ms(r, "min") for r in (patchcore, grad)]
        robust = (f"; {_ratio_words(fastest[0] / fastest[1])} on the fastest image of each, which other jobs on a "
                  "shared CPU disturb least" if None not in fastest else "")
        lines.append(f"**GRAD-edge is {_ratio_words(speed)} than PatchCore on the same extractor and the same engine, "
                     f"{engine}** ({batch1_ms(grad):.1f} vs {batch1_ms(patchcore):.1f} ms per image end to end, "
                     f"{_ratio_words(infer[0] / infer[1])} on the inference stage alone{robust}; batch 1, "
                     f"{result['threads']} CPU threads, {grad['best_fps']:.0f} vs {patchcore['best_fps']:.0f} FPS at "
                     f"the best batch; PatchCore's bank: {patchcore.get('bank_size')} rows), at "
                     f"{', '.join(acc) or 'no common accuracy run'}.")
        loads = [max(r.get("load_average_1min") or [0.0]) for r in (grad, patchcore)]
        if max(loads) > result["threads"] + LOAD_MARGIN:
            lines[-1] += (f" **Caveat: measured while other jobs loaded the CPU (1-min load average up to "
                          f"{max(loads):.1f} on {result['environment']['cpu_count']} cores); PyTorch rows suffer most "
                          "(thread barriers wait for descheduled threads). Treat this ratio as unreliable and re-run "
                          "`grad-bench latency` on an idle machine.**")
        lines += latency_notes({**result, "skipped": [], "patchcore_bank": None})[:2]
    return [f"- {line}" for line in lines]


def _ratio_words(ratio: float) -> str:
    """``2.1× faster`` / ``1.3× slower`` / ``as fast`` for a time ratio other / GRAD."""
    if abs(ratio - 1) < 0.05:
        return "as fast"
    return f"{ratio:.1f}× faster" if ratio > 1 else f"{1 / ratio:.1f}× slower"


def _f2pad_off_classes(result: dict[str, Any]) -> set[str]:
    """The classes whose tuning switched F2PAD off (``use_f2pad: false``): their masks are the coarse ones."""
    return {c for c, v in (result.get("class_settings") or {}).items() if v.get("use_f2pad") is False}


def _kept_note(result: dict[str, Any]) -> str:
    """How many images kept a coarse mask and why: their class has F2PAD off (its tuning found it no better), or
    their coarse mask was empty (nothing to refine)."""
    off = _f2pad_off_classes(result)
    images = result.get("images") or []
    n_off = sum(1 for r in images if r["class"] in off)
    n_empty = sum(1 for r in images if r["class"] not in off and r.get("status") == STATUS_EMPTY_REGION)
    note = ""
    if n_off:
        note += (f" {n_off} of {len(images)} images kept their coarse masks: F2PAD is off for "
                 f"{', '.join(sorted(off))}, whose tuning found it no better than the coarse mask (no solver ran for "
                 "them; their time and iterations are 0).")
    if n_empty:
        note += f" {n_empty} image(s) had an empty coarse mask: nothing to refine, the empty mask kept."
    return note


def refine_block(name: str, result: dict[str, Any]) -> list[str]:
    """One F2PAD mask benchmark: the sentence follows the numbers, then the table and links to the panels."""
    from gradad.benchmarks.refine_masks import markdown as refine_table

    from gradad.refine.config import RefineConfig

    m = result["mean"]
    gain = 100 * (m["f2pad_iou"] - m["coarse_iou"])
    defaults = RefineConfig().to_dict()
    changed = [f"{k}={v}" for k, v in result.get("config", {}).items()
               if k not in ("device", "threads") and defaults.get(k) != v]
    verdict = "raises" if gain > 0.05 else "lowers" if gain < -0.05 else "keeps"
    kept_note = _kept_note(result)
    own = result.get("f2pad_coarse_thresholds") or {}
    classes = result.get("per_class") or {}
    calibrated = {c: v for c, v in (result.get("class_pixel_thresholds") or {}).items() if c in classes}
    own_note = (f" F2PAD's own coarse threshold per class: "
                f"{', '.join(f'{c} {t:.2f}' for c, t in own.items())}."
                if any(abs(t - calibrated.get(c, result["pixel_threshold"])) > 1e-6 for c, t in own.items()) else "")
    threshold = (f"each class's own calibrated pixel threshold "
                 f"({', '.join(f'{c} {v:.2f}' for c, v in calibrated.items())})" if calibrated
                 else f"{result['threshold_rule']} = {result['pixel_threshold']:.2f}")
    off = _f2pad_off_classes(result)
    # F2PAD off for every class scored: its "F2PAD" masks are the coarse masks at the tuned coarse threshold
    all_off = bool(classes) and set(classes) <= off
    subject = "Refinement (F2PAD off here: the coarse masks at the tuned coarse threshold)" if all_off else "F2PAD"
    oracle = (f" (oracle coarse threshold {result['oracle_pixel_threshold']:.2f}: IoU {pct(m['oracle_iou'])}, "
              f"{'refined' if all_off else 'F2PAD'} {100 * (m['f2pad_iou'] - m['oracle_iou']):+.1f} points)"
              ) if "oracle_iou" in m else ""
    lines = [f"### {Path(result['data']).name} — `{name}`", "",
             f"{subject} {verdict} the mean IoU from {pct(m['coarse_iou'])} to {pct(m['f2pad_iou'])} "
             f"({gain:+.1f} points) and DICE from {pct(m['coarse_dice'])} to {pct(m['f2pad_dice'])} on "
             f"{m['images']} defect images{oracle}, at {m['seconds_per_image']:.1f} s and "
             f"{m['iterations_mean']:.0f} iterations per image ({result['device']}, {result['threads']} threads); "
             f"coarse threshold: {threshold}.{own_note} "
             f"Tuned per class: "
             f"{result.get('class_settings') or 'nothing'}. Settings different from the defaults: "
             f"{', '.join(changed) or 'none'}.{kept_note}", "", refine_table(result).rstrip("\n"), ""]
    panels = [(r["panel"], f"{r['class']}/{r['defect']}/{Path(r['image']).stem}") for r in result["images"]
              if r.get("panel")]
    if panels:
        lines += ["Panels (image | truth | coarse | F2PAD | repaired x_n): "
                  + ", ".join(f"[{label}]({path})" for path, label in panels), ""]
    return lines


def other_section(res: Results, folder: Path) -> list[str]:
    """Result files of other tools (no ``kind``): a link to their markdown table where there is one."""
    if not res.other:
        return []
    out = ["## Other results in this folder", ""]
    for name in res.other:
        md = Path(name).with_suffix(".md").name
        out.append(f"- `{name}`" + (f": see [{md}]({md})" if (folder / md).is_file() else ""))
    return out + [""]


def preparation_section(res: Results) -> list[str]:
    """The commands that made the data, models and bundles the result files evaluate."""
    out = []
    for name, data in res.preparation.items():
        out += [f"## Data and models behind the results (`{name}`)", "", data.get("note", ""), ""]
        out += [f"- {step['what']}: `{step['command']}`" for step in data["steps"]]
        out.append("")
    return out


def commands_section(files: dict[str, dict[str, Any]]) -> list[str]:
    """The exact command behind each result file (and its training command where recorded)."""
    out = ["## How each file was made", ""]
    for name, data in files.items():
        if not isinstance(data, dict):  # another tool's JSON (a list, a number): listed under other results
            continue
        cmds = [data.get("command")] if data.get("command") else [r.get("command") for r in data.get("runs", [])]
        cmds += [data[k] for k in ("train_command", "train_commands") if data.get(k)]
        flat = [c for item in cmds for c in (item if isinstance(item, list) else [item]) if c]
        if flat:
            out += [f"- `{name}`:"] + [f"  - `{c}`" for c in flat]
    return out + [""]


def render(res: Results, files: dict[str, dict[str, Any]], plot_name: str | None, folder: Path) -> str:
    """The whole README text."""
    out = [TITLE, "",
           "Generated by `grad-bench report` from the JSON files in this folder — edit those (or re-run the "
           "commands at the end), not this page.", ""]
    head = headline(res)
    if head:
        out += ["## Headline", "", *head, ""]
    if plot_name:
        out += [f"![accuracy vs latency]({plot_name})", "",
                "Image AUROC (accuracy runs) against total ms per image at batch 1 (latency runs), for every "
                "accuracy row that has a latency row of the same method, preset, backend and precision.", ""]
    out += sections("Accuracy (unified protocol: one model for all classes)", res.accuracy, accuracy_block)
    has_paper = any(r["preset"] == "paper" for d in res.latency.values() for r in d["rows"])
    paper_trained = any(r["preset"] == "paper" for d in res.accuracy.values() for r in d["rows"])
    if has_paper and not paper_trained:
        out += [PAPER_WEIGHTS_NOTE, ""]
    out += sections("F2PAD pixel refinement (coarse thresholded GRAD mask vs F2PAD mask)", res.refine, refine_block)
    out += complexity_section(res) + sections("Latency", res.latency, latency_block) + runtime_section(res)
    out += sections("GPU check (`grad-bench gpu`)", res.gpu, gpu_block)
    out += other_section(res, folder) + preparation_section(res) + commands_section(files)
    return "\n".join(out).rstrip("\n") + "\n"


#: what a result file of a known kind with missing or wrongly shaped fields raises while its part is rendered
MALFORMED = (KeyError, TypeError, AttributeError, ValueError, IndexError, ZeroDivisionError)


def check_each_file(res: Results, files: dict[str, Any], folder: Path) -> None:
    """Render each result file on its own first: one whose fields are missing or of the wrong shape (hand-edited,
    cut short) is one error naming it, as a file that is not JSON is, rather than a traceback from the page."""
    for field_name in ("accuracy", "latency", "complexity", "runtime", "preparation", "refine", "gpu"):
        for name, data in getattr(res, field_name).items():
            alone = Results(**{field_name: {name: data}})
            try:
                render(alone, {name: data}, None, folder)
                plot_points(alone)
            except MALFORMED as exc:
                log.debug("rendering %s", name, exc_info=True)
                why = f"no field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
                raise GradError(f"{folder / name} is not a readable {field_name} result ({why}): fix it or move it "
                                f"out of {folder}") from None


def write_report(results_dir: str | Path) -> tuple[Path, Path | None]:
    """Regenerate ``README.md`` (and the plot PNG when there is something to plot) in ``results_dir``."""
    folder = Path(results_dir)
    files = load_result_files(folder)
    if not files:
        raise GradError(f"{folder} holds no grad-bench result files (JSON with a 'kind'): nothing to report")
    readme = folder / README
    if readme.is_file() and not readme.read_text(encoding="utf-8", errors="replace").startswith(TITLE + "\n"):
        raise GradError(f"{readme} was not written by grad-bench report: refusing to replace it (move it away, or "
                        f"give the folder that holds the result files)")
    res = classify(files)
    check_each_file(res, files, folder)
    plot = write_plot(plot_points(res), folder / PLOT)
    atomic_write_text(readme, render(res, files, plot.name if plot else None, folder))
    return readme, plot


def main() -> None:
    """``python -m gradad.benchmarks.report_page [RESULTS_DIR]``."""
    logging.basicConfig(level=logging.INFO)
    readme, plot = write_report(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    print(f"wrote {readme}" + (f" and {plot}" if plot else ""))


if __name__ == "__main__":
    main()
