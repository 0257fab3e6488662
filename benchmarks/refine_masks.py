"""F2PAD benchmark: IoU / DICE of coarse GRAD masks vs F2PAD masks on labelled defect images, with pictures.

    grad-bench refine --bundle models/demo --data demo_data -o benchmarks/results --name demo_f2pad

The coarse mask is the runtime's anomaly map (ONNX Runtime FP32, the numbers the line sees) above a pixel threshold.
Two baselines are reported: the runtime's calibrated pixel threshold (what the line gets; F2PAD starts from it, or
from a tighter part of it, see RefineConfig.start_peak_fraction) and the pixel-F1-optimal threshold over the evaluated images (an oracle: the best single threshold the coarse mask
could have). Images ``grad-refine tune`` used (recorded in bundle.json) are never scored. One panel PNG per image
(image, truth, coarse mask, F2PAD mask, repaired x_n) goes to ``NAME_panels/``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
from tqdm import tqdm

from gradad.cli_utils import grad_command
from gradad.data.datasets import Sample, load_samples
from gradad.errors import GradError
from gradad.evaluation.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, format_interval, paired_mean_difference
from gradad.runtime.refine_result import RefineResult

if TYPE_CHECKING:
    from gradad.refine.refiner import Refiner

log = logging.getLogger(__name__)

METRIC_KEYS = ("coarse_iou", "coarse_dice", "oracle_iou", "oracle_dice", "f2pad_iou", "f2pad_dice")
# panel colours (RGB) of the mask overlays
_TRUTH, _COARSE, _F2PAD = (0, 200, 0), (255, 200, 0), (255, 0, 0)


def iou_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """IoU and DICE of two bool masks (1.0 / 1.0 when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    union = float(np.logical_or(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    return (inter / union if union else 1.0), (2 * inter / total if total else 1.0)


def _overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` with ``mask`` tinted in ``colour`` and its outline drawn."""
    import cv2

    out = image.copy()
    tint = np.array(colour, np.float32)
    out[mask] = (0.5 * out[mask] + 0.5 * tint).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def write_panel(path: Path, image: np.ndarray, truth: np.ndarray, coarse: np.ndarray, refined: np.ndarray,
                repaired: np.ndarray, scores: tuple[float, float]) -> None:
    """One PNG: image | truth | coarse mask | F2PAD mask | repaired x_n, each tile titled (IoUs on the masks)."""
    import cv2

    tiles = [(image, "image"), (_overlay(image, truth, _TRUTH), "truth"),
             (_overlay(image, coarse, _COARSE), f"coarse IoU {100 * scores[0]:.0f}"),
             (_overlay(image, refined, _F2PAD), f"F2PAD IoU {100 * scores[1]:.0f}"), (repaired, "repaired x_n")]
    h, w = image.shape[:2]
    bar = 18
    canvas = np.full((h + bar, len(tiles) * (w + 4), 3), 255, np.uint8)
    for k, (tile, title) in enumerate(tiles):
        x0 = k * (w + 4)
        canvas[bar:, x0:x0 + w] = tile
        cv2.putText(canvas, title, (x0 + 2, bar - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    _write_small_png(path, canvas)


def _write_small_png(path: Path, rgb: np.ndarray) -> None:
    """PNG with a 256-colour adaptive palette (Pillow, ~20x smaller for photographs: panels are committed with the
    results); a plain OpenCV PNG where Pillow is missing."""
    import cv2

    try:
        from PIL import Image
    except ImportError:
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise GradError(f"cannot write {path}") from None
        return
    try:
        Image.fromarray(rgb).quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
            path, "PNG", optimize=True)
    except OSError as exc:
        raise GradError(f"cannot write {path}: {exc}") from exc


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"images": len(rows)}
    out.update({k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS})
    out["iou_gain"] = out["f2pad_iou"] - out["coarse_iou"]
    out["iou_gain_over_oracle"] = out["f2pad_iou"] - out["oracle_iou"]
    out["seconds_per_image"] = float(np.mean([r["seconds_per_image"] for r in rows]))
    out["iterations_mean"] = float(np.mean([r["iterations"] for r in rows]))
    return out


#: the coarse masks F2PAD is compared with: the runtime's (calibrated threshold) and the oracle-threshold one
BASELINES = {"calibrated": "coarse_iou", "oracle": "oracle_iou"}


def iou_gain_intervals(rows: list[dict[str, Any]], resamples: int = DEFAULT_RESAMPLES,
                       level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """F2PAD IoU minus each coarse baseline's, over all images and per class, with a bootstrap interval over the
    images (paired: the same image's three masks stay together)."""
    groups = {"mean": rows, **{c: [r for r in rows if r["class"] == c] for c in sorted({r["class"] for r in rows})}}
    return {"resamples": resamples, "level": level, "unit": "images",
            "groups": {g: {b: paired_mean_difference([r[key] for r in members], [r["f2pad_iou"] for r in members],
                                                     resamples, level)
                           for b, key in BASELINES.items()} for g, members in groups.items()}}


def _image_row(i: int, sample: Sample, image: np.ndarray, amap: np.ndarray, truth: np.ndarray,
               result: RefineResult, refiner: Refiner, oracle_threshold: float, seconds: tuple[float, float],
               panels_dir: Path | None) -> dict[str, Any]:
    """One refined image's row: IoU / DICE of the calibrated coarse mask, the oracle coarse mask and F2PAD's, their
    areas, the timing (wall, CPU seconds per image) and its panel in ``panels_dir`` (None: no picture)."""
    # the runtime's coarse mask without F2PAD (grad-run --class): the class's calibrated pixel threshold, else the
    # bundle's (or the one given); a class's tuned coarse threshold is an F2PAD setting, part of what F2PAD is
    # measured on
    coarse = amap > refiner.calibrated_pixel(sample.class_name)
    c_iou, c_dice = iou_dice(coarse, truth)
    o_iou, o_dice = iou_dice(amap >= oracle_threshold, truth)  # best_f1 picks t for map >= t
    f_iou, f_dice = iou_dice(result.mask, truth)
    row = {"image": str(sample.image_path), "class": sample.class_name, "defect": sample.defect_type,
           "coarse_iou": c_iou, "coarse_dice": c_dice, "oracle_iou": o_iou, "oracle_dice": o_dice,
           "f2pad_iou": f_iou, "f2pad_dice": f_dice, "iterations": result.iterations, "status": result.status,
           "seconds_per_image": seconds[0], "cpu_seconds_per_image": seconds[1],
           "f2pad_coarse_threshold": float(refiner.coarse_threshold(sample.class_name)),
           "truth_area_px": int(truth.sum()), "coarse_area_px": int(coarse.sum()),
           "start_area_px": int(result.coarse_mask.sum()),
           "f2pad_area_px": int(result.mask.sum())}
    if panels_dir is not None:
        panel = panels_dir / f"{i:03d}_{sample.class_name}_{sample.defect_type}_{Path(sample.image_path).stem}.png"
        write_panel(panel, image, truth, coarse, result.mask, result.repaired, (c_iou, f_iou))
        row["panel"] = f"{panels_dir.name}/{panel.name}"
    return row


def run_benchmark(bundle_dir: str, data_root: str, classes: list[str] | None, per_defect: int,
                  pixel_threshold: float | None, assignments: tuple[str, ...], device: str | None,
                  threads: int, panels_dir: Path | None = None, exclude: str | None = None) -> dict[str, Any]:
    """Refine the selected defect images (the bundle's F2PAD tuning images and the images of the tuning split
    ``exclude`` left out); per-image rows, per-class / per-defect-type / overall means; a panel per image in
    ``panels_dir`` (None: no pictures)."""
    import torch

    from gradad.calibration.thresholds import pixel_threshold_f1
    from gradad.data.tuning_split import partition_by_paths, read_held_out
    from gradad.refine.bundle_files import load_refine_parts, tuning_images
    from gradad.refine.cli import apply_refine_set, with_set_over_classes
    from gradad.refine.refiner import Refiner
    from gradad.refine.tuning import labelled_arrays, pick_samples
    from gradad.runtime.loader import load_backend

    excluded = tuning_images(bundle_dir)
    labelled = load_samples(data_root, "test", classes)
    if exclude:
        _, held = partition_by_paths(labelled, read_held_out(exclude))
        excluded |= {str(s.image_path.resolve()) for s in held}
    parts = load_refine_parts(bundle_dir, pixel_threshold)  # the calibrated pixel threshold unless given
    config = parts.config if device is None else dataclasses.replace(parts.config, device=device)
    config = apply_refine_set(dataclasses.replace(config, threads=threads), assignments)
    parts = with_set_over_classes(parts, assignments)
    refiner = Refiner.from_parts(parts, config)
    # never scored: the model maps the defects it trained on better than new ones, and the ones that selected it
    _, trained = partition_by_paths(labelled, (refiner.trained_defects or set()) | refiner.tuned_defects)
    trained_excluded = {str(s.image_path.resolve()) for s in trained} - excluded
    samples = pick_samples(labelled, per_defect, exclude=excluded | trained_excluded)
    if not samples:
        raise GradError(f"no labelled defect images (with masks) under {data_root}")
    images, truths = labelled_arrays(samples, refiner.detector.head.image_hw[0])
    outlined = [i for i in range(len(samples)) if truths[i].any()]
    n_empty = len(samples) - len(outlined)
    if n_empty:  # a defect too small to survive the resize: no outline to score (IoU would be 1 or 0 by convention)
        log.warning("%d defect image(s) left out: their mask is empty at %d px", n_empty, truths.shape[1])
        samples, images, truths = [samples[i] for i in outlined], images[outlined], truths[outlined]
    if not samples:
        raise GradError(f"no labelled defect images with a non-empty mask under {data_root}")
    backend, _ = load_backend(bundle_dir, "onnxruntime", "fp32", threads=threads)
    _, maps = backend.infer_all(images.astype(np.float32).transpose(0, 3, 1, 2))
    backend.close()
    oracle_threshold, _ = pixel_threshold_f1(maps, truths)
    calibrated_threshold = float(parts.pixel_threshold)  # the bundle's calibrated one, or the one given
    if panels_dir is not None:
        panels_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    statuses: Counter = Counter()
    bar = tqdm(total=len(samples), desc="F2PAD", unit="img")
    for start in range(0, len(samples), config.max_batch):
        idx = list(range(start, min(start + config.max_batch, len(samples))))
        t0, c0 = time.perf_counter(), time.process_time()
        results = refiner.refine([images[i] for i in idx], [maps[i] for i in idx],
                                 [samples[i].class_name for i in idx])
        per_image = (time.perf_counter() - t0) / len(idx)
        cpu_per_image = (time.process_time() - c0) / len(idx)
        for i, r in zip(idx, results):
            statuses[r.status] += 1
            rows.append(_image_row(i, samples[i], images[i], maps[i], truths[i], r, refiner, oracle_threshold,
                                   (per_image, cpu_per_image), panels_dir))
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
        "pixel_threshold": calibrated_threshold,
        "threshold_rule": "given" if pixel_threshold is not None else "the bundle's calibrated pixel threshold",
        # classes calibrated on their own: the runtime's (grad-run --class) coarse baseline uses theirs
        "class_pixel_thresholds": dict(sorted(parts.class_pixel_thresholds.items())),
        # the threshold F2PAD's own coarse mask used per class (a tuned one where grad-refine tune chose it)
        "f2pad_coarse_thresholds": {c: float(refiner.coarse_threshold(c)) for c in sorted(by_class)},
        "scored_at": f"{images.shape[1]}x{images.shape[2]} px, the model input (truth masks resized with nearest "
                     "neighbour; maps and masks at that size)",
        "seconds_per_image_rule": f"wall time of each refine call / its images (batches of up to "
                                  f"{config.max_batch}; the time budget scales with the batch)",
        "oracle_pixel_threshold": float(oracle_threshold),
        "oracle_rule": "pixel-F1-optimal over the evaluated images (oracle for the coarse mask)",
        "feature_scale": refiner.feature_scale, "class_settings": parts.class_settings,
        "tuning_images_excluded": len(excluded), "trained_images_excluded": len(trained_excluded),
        "empty_masks_excluded": n_empty,
        "tuning_split": exclude,
        "device": str(refiner.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "config": config.to_dict(), "statuses": dict(statuses),
        "mean": _summary(rows),
        "per_class": {k: _summary(v) for k, v in sorted(by_class.items())},
        "per_defect": {k: _summary(v) for k, v in sorted(by_defect.items())},
        "images": rows,
        "iou_gain_intervals": iou_gain_intervals(rows),
    }


def markdown(result: dict[str, Any]) -> str:
    """Per-class and per-defect-type table: coarse (calibrated and oracle threshold) vs F2PAD IoU / DICE."""
    lines = ["| class / defect | images | coarse IoU (calibrated) | coarse IoU (oracle) | F2PAD IoU | coarse DICE "
             "(calibrated) | coarse DICE (oracle) | F2PAD DICE | s / image | iterations |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups = [*result["per_class"].items(), *result.get("per_defect", {}).items(), ("**mean**", result["mean"])]

    # Results written before both baselines existed had one coarse mask, at the oracle threshold (their rule says so)
    legacy_oracle = "oracle_pixel_threshold" not in result and "oracle" in result.get("threshold_rule", "")

    def cell(s: dict[str, Any], key: str) -> str:
        if legacy_oracle and key.startswith(("coarse_", "oracle_")):
            key = key.replace("oracle_", "coarse_") if key.startswith("oracle_") else "missing"
        return f"{100 * s[key]:.1f}" if key in s else "–"

    for name, s in groups:
        lines.append(f"| {name} | {s['images']} | {cell(s, 'coarse_iou')} | {cell(s, 'oracle_iou')} | "
                     f"{cell(s, 'f2pad_iou')} | {cell(s, 'coarse_dice')} | {cell(s, 'oracle_dice')} | "
                     f"{cell(s, 'f2pad_dice')} | {s['seconds_per_image']:.2f} | {s['iterations_mean']:.0f} |")
    if not legacy_oracle:
        scored = result.get("per_class") or {}
        own = {c: t for c, t in (result.get("class_pixel_thresholds") or {}).items() if not scored or c in scored}
        lines += ["", "Coarse (calibrated): the runtime's mask at the bundle's calibrated pixel threshold"
                  + (f" (each class's own: {', '.join(f'{c} {t:.2f}' for c, t in own.items())})" if own else "")
                  + ". Coarse (oracle): one pixel threshold for all these images, chosen on them for the best pooled pixel F1 "
                  "(an optimistic baseline; not the best per image)."
                  + (f" Scored at {result['scored_at']}." if "scored_at" in result else "")
                  + (f" s / image: {result['seconds_per_image_rule']}." if "seconds_per_image_rule" in result
                     else "")]
    gains = result.get("iou_gain_intervals")
    if gains:
        lines += ["", f"F2PAD IoU minus coarse IoU (points; {100 * gains['level']:g} % bootstrap interval over "
                  f"{gains['resamples']} resamples of the images, paired; P(≤ 0): share of resamples with no gain):",
                  "", "| group | vs calibrated coarse | vs oracle coarse |", "|---|---:|---:|"]
        for group, cells in gains["groups"].items():
            lines.append(f"| {group} | " + " | ".join(format_interval(cells[b]) for b in BASELINES) + " |")
    return "\n".join(lines) + "\n"


@click.command("refine")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
              help="Bundle prepared with grad-refine prepare.")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False), help="Dataset root.")
@click.option("--classes", multiple=True)
@click.option("--per-defect", type=int, default=0, help="Images per (class, defect type); 0 = all.")
@click.option("--pixel-threshold", type=float, help="Coarse threshold F2PAD refines [default: the bundle's calibrated "
              "one; the oracle baseline is always reported too].")
@click.option("--exclude", type=click.Path(exists=True), help="A tuning split (grad-bench split's split.json): its "
              "images are not scored either (the bundle's own F2PAD tuning images never are).")
@click.option("--panels/--no-panels", default=True, show_default=True, help="Write NAME_panels/*.png.")
@click.option("--set", "assignments", multiple=True, help="RefineConfig override, e.g. --set max_iterations=200.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads (torch and ONNX Runtime).")
@click.option("-o", "--out", "out_dir", default="benchmarks/results", show_default=True)
@click.option("--name", required=True, help="Result file stem.")
@grad_command
def main(bundle_dir, data_root, classes, per_defect, pixel_threshold, exclude, panels, assignments, device, threads,
         out_dir, name) -> None:
    """F2PAD masks: IoU / DICE of coarse vs refined masks, seconds and iterations per image (NAME.json/.md)."""
    from gradad.benchmarks.results_io import (KIND_REFINE, check_result_name, command_line, result_header,
                                              write_result_files)

    check_result_name(name)  # before NAME_panels/ is made
    result = run_benchmark(bundle_dir, data_root, list(classes) or None, per_defect, pixel_threshold, assignments,
                           device, threads, Path(out_dir) / f"{name}_panels" if panels else None, exclude)
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
