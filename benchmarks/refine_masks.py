"""F2PAD benchmark: IoU / DICE of the coarse thresholded GRAD mask vs the F2PAD mask on labelled defect images.

    grad-bench refine --bundle models/demo --data demo_data -o benchmarks/results --name demo_f2pad

The coarse mask is the runtime's anomaly map (ONNX Runtime FP32, the numbers the line sees) above a pixel threshold;
by default the pixel-F1-optimal threshold over the evaluated images, i.e. the best single threshold the coarse
mask could have (an oracle for the baseline, so the F2PAD gain is not flattered). F2PAD refines that same mask.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from gradad.cli_utils import setup_logging, user_errors_as_exit
from gradad.data.datasets import load_samples
from gradad.data.images import load_sample_arrays
from gradad.errors import GradError

log = logging.getLogger(__name__)


def iou_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """IoU and DICE of two bool masks (1.0 / 1.0 when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    union = float(np.logical_or(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    return (inter / union if union else 1.0), (2 * inter / total if total else 1.0)


def pick_samples(samples: list, per_defect: int, seed: int = 0) -> list:
    """Up to ``per_defect`` labelled defect samples per (class, defect type), seeded, in a stable order."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for s in samples:
        if s.label == 1 and s.mask_path is not None:
            groups[(s.class_name, s.defect_type)].append(s)
    rng = np.random.default_rng(seed)
    out = []
    for key in sorted(groups):
        group = groups[key]
        take = sorted(rng.choice(len(group), min(per_defect, len(group)), replace=False)) if per_defect else range(len(group))
        out.extend(group[i] for i in take)
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("coarse_iou", "coarse_dice", "f2pad_iou", "f2pad_dice")
    out: dict[str, Any] = {"images": len(rows)}
    out.update({k: float(np.mean([r[k] for r in rows])) for k in keys})
    out["iou_gain"] = out["f2pad_iou"] - out["coarse_iou"]
    out["seconds_per_image"] = float(np.mean([r["seconds_per_image"] for r in rows]))
    out["iterations_mean"] = float(np.mean([r["iterations"] for r in rows]))
    return out


def run_benchmark(bundle_dir: str, data_root: str, classes: list[str] | None, per_defect: int,
                  pixel_threshold: float | None, assignments: tuple[str, ...], device: str | None,
                  threads: int) -> dict[str, Any]:
    """Refine the selected defect images; per-image rows and per-class / overall means."""
    import torch

    from gradad.bundle import read_manifest
    from gradad.calibration.thresholds import pixel_threshold_f1
    from gradad.refine.bundle_files import load_refine_parts
    from gradad.refine.cli import apply_refine_set
    from gradad.refine.refiner import Refiner
    from gradad.runtime.loader import load_backend

    manifest = read_manifest(bundle_dir)
    size = manifest["input"]["model_height"]
    samples = pick_samples(load_samples(data_root, "test", classes), per_defect)
    if not samples:
        raise GradError(f"no labelled defect images (with masks) under {data_root}")
    arrays = [load_sample_arrays(s, size) for s in tqdm(samples, desc="reading", unit="img")]
    images = np.stack([a[0] for a in arrays])
    truths = np.stack([a[1] for a in arrays]).astype(bool)
    backend, _ = load_backend(bundle_dir, "onnxruntime", "fp32", threads=threads)
    _, maps = backend.infer_all(images.astype(np.float32).transpose(0, 3, 1, 2))
    rule = "given"
    if pixel_threshold is None:
        pixel_threshold, _ = pixel_threshold_f1(maps, truths)
        rule = "pixel-F1-optimal over the evaluated images (oracle for the coarse mask)"
    parts = load_refine_parts(bundle_dir, pixel_threshold)
    config = parts.config if device is None else dataclasses.replace(parts.config, device=device)
    config = apply_refine_set(dataclasses.replace(config, threads=threads), assignments)
    refiner = Refiner.from_parts(parts, config)
    rows: list[dict[str, Any]] = []
    statuses: Counter = Counter()
    bar = tqdm(total=len(samples), desc="F2PAD", unit="img")
    for start in range(0, len(samples), config.max_batch):
        idx = list(range(start, min(start + config.max_batch, len(samples))))
        t0 = time.perf_counter()
        results = refiner.refine([images[i] for i in idx], [maps[i] for i in idx])
        per_image = (time.perf_counter() - t0) / len(idx)
        for i, r in zip(idx, results):
            c_iou, c_dice = iou_dice(r.coarse_mask, truths[i])
            f_iou, f_dice = iou_dice(r.mask, truths[i])
            statuses[r.status] += 1
            rows.append({"image": str(samples[i].image_path), "class": samples[i].class_name,
                         "defect": samples[i].defect_type, "coarse_iou": c_iou, "coarse_dice": c_dice,
                         "f2pad_iou": f_iou, "f2pad_dice": f_dice, "iterations": r.iterations, "status": r.status,
                         "seconds_per_image": per_image})
        bar.update(len(idx))
        bar.set_postfix(iou=f"{np.mean([r['coarse_iou'] for r in rows]):.3f}->"
                            f"{np.mean([r['f2pad_iou'] for r in rows]):.3f}")
    bar.close()
    by_class: dict[str, list] = defaultdict(list)
    by_defect: dict[str, list] = defaultdict(list)
    for r in rows:
        by_class[r["class"]].append(r)
        by_defect[f"{r['class']}/{r['defect']}"].append(r)
    return {
        "bundle": str(bundle_dir), "data": str(data_root), "images_per_defect_type": per_defect,
        "pixel_threshold": float(pixel_threshold), "threshold_rule": rule,
        "device": str(refiner.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "config": config.to_dict(), "statuses": dict(statuses),
        "mean": _summary(rows),
        "per_class": {k: _summary(v) for k, v in sorted(by_class.items())},
        "per_defect": {k: _summary(v) for k, v in sorted(by_defect.items())},
        "images": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """Per-class table: coarse vs F2PAD IoU / DICE, seconds and iterations per image."""
    lines = ["| class | images | coarse IoU | F2PAD IoU | coarse DICE | F2PAD DICE | s / image | iterations |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in [*result["per_class"].items(), ("**mean**", result["mean"])]:
        lines.append(f"| {name} | {s['images']} | {100 * s['coarse_iou']:.1f} | {100 * s['f2pad_iou']:.1f} | "
                     f"{100 * s['coarse_dice']:.1f} | {100 * s['f2pad_dice']:.1f} | {s['seconds_per_image']:.2f} | "
                     f"{s['iterations_mean']:.0f} |")
    return "\n".join(lines) + "\n"


@click.command("refine")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
              help="Bundle prepared with grad-refine prepare.")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False), help="Dataset root.")
@click.option("--classes", multiple=True)
@click.option("--per-defect", type=int, default=0, help="Images per (class, defect type); 0 = all.")
@click.option("--pixel-threshold", type=float, help="Coarse threshold [default: pixel-F1-optimal, see module doc].")
@click.option("--set", "assignments", multiple=True, help="RefineConfig override, e.g. --set max_iterations=200.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads (torch and ONNX Runtime).")
@click.option("-o", "--out", "out_dir", default="benchmarks/results", show_default=True)
@click.option("--name", required=True, help="Result file stem.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors_as_exit
def main(bundle_dir, data_root, classes, per_defect, pixel_threshold, assignments, device, threads, out_dir, name,
         verbose) -> None:
    """F2PAD masks: IoU / DICE of coarse vs refined masks, seconds and iterations per image (NAME.json/.md)."""
    setup_logging(verbose)
    from gradad.benchmarks.results_io import KIND_REFINE, command_line, result_header, write_result_files

    result = run_benchmark(bundle_dir, data_root, list(classes) or None, per_defect, pixel_threshold, assignments,
                           device, threads)
    ctx = click.get_current_context()
    # under `grad-bench refine` the group recorded the raw arguments (subcommand included)
    raw = ctx.find_root().meta.get("gradad.bench.raw_args")
    command = command_line(raw) if raw is not None else command_line(sys.argv[1:], "grad-bench refine")
    payload = {**result_header(KIND_REFINE, name, command), **result}
    table = markdown(result)
    write_result_files(out_dir, name, payload, f"# F2PAD masks: {name}\n\n`{command}`\n\n{table}")
    click.echo(table)


if __name__ == "__main__":
    main()
