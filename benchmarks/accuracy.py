"""``grad-bench accuracy``: one test set, one protocol, every backend and the peer baselines in one run.

Rows (each optional): GRAD from a checkpoint (PyTorch), GRAD from a bundle (ONNX Runtime FP32 / FP16, TensorRT
where importable), a NORMAL-only GRAD checkpoint (ablation) and PatchCore on the same extractor. Each row has
per-class and mean image AUROC/AUPR, pixel AUROC/AUPR, PRO and F1: at the bundle's calibrated threshold when
there is one (rule ``score > threshold``, as the runtime decides), otherwise the best F1 over thresholds,
marked as an oracle.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from gradad.benchmarks.environment import engine_note, environment, tensorrt_engine_record
from gradad.bundle import Bundle
from gradad.data.datasets import Sample, load_samples_from_roots
from gradad.data.tuning_split import scoring_selection
from gradad.errors import GradError
from gradad.evaluation.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, METRICS as PAIRED_METRICS
from gradad.evaluation.bootstrap import PairedScores, format_interval, paired_differences, paired_scores
from gradad.evaluation.evaluate import evaluate_predictions
from gradad.evaluation.report import TABLE_COLUMNS, markdown_table

if TYPE_CHECKING:
    from gradad.training.config import BackboneConfig

log = logging.getLogger(__name__)

BACKEND_PYTORCH = "pytorch"
BACKEND_ORT_FP32 = "onnxruntime-fp32"
BACKEND_ORT_FP16 = "onnxruntime-fp16"
BACKEND_ORT_INT8 = "onnxruntime-int8"
BACKEND_TENSORRT = "tensorrt"
BACKENDS = (BACKEND_PYTORCH, BACKEND_ORT_FP32, BACKEND_ORT_FP16, BACKEND_ORT_INT8, BACKEND_TENSORRT)
#: bundle backend name -> (runtime backend, precision); INT8 needs grad-export quantize
BUNDLE_BACKENDS = {BACKEND_ORT_FP32: ("onnxruntime", "fp32"), BACKEND_ORT_FP16: ("onnxruntime", "fp16"),
                   BACKEND_ORT_INT8: ("onnxruntime", "int8"), BACKEND_TENSORRT: ("tensorrt", "fp16")}
F1_CALIBRATED = "calibrated threshold"
F1_ORACLE = "oracle (best F1 over thresholds)"
METHOD_GRAD = "grad"
METHOD_NORMAL_ONLY = "grad_normal_only"
METHOD_PATCHCORE = "patchcore"


@dataclass
class AccuracyConfig:
    """What ``grad-bench accuracy`` evaluates, and how."""

    data_roots: list[str]
    classes: list[str] | None = None  # None: the model's classes, else every class of the root
    layout: str = "auto"
    checkpoint: str | None = None  # GRAD model.pt -> PyTorch row
    bundle: str | None = None  # bundle dir -> ONNX Runtime / TensorRT rows
    backends: tuple[str, ...] = BACKENDS  # rows wanted, where their model is given
    normal_only: str | None = None  # NORMAL-only GRAD model.pt -> ablation row
    patchcore: bool = False
    coreset_ratio: float = 0.01
    cache_dir: str = "cache/features"  # PatchCore training features (shared with grad-train)
    batch_size: int = 8
    threads: int = 0  # 0 = library default
    device: str = "cpu"
    exclude: str | None = None  # a tuning split (benchmarks/split.py): its images are not scored
    # paired bootstrap resamples of the test images for every row's difference to the first row (0 = none)
    bootstrap: int = DEFAULT_RESAMPLES
    skipped: list[dict[str, str]] = field(default_factory=list)

    def validate(self) -> None:
        """Refuse settings that cannot give a row, naming the option at fault."""
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise GradError(f"--backend {unknown[0]!r}: choose from {', '.join(BACKENDS)}")
        if not (self.checkpoint or self.bundle or self.normal_only or self.patchcore):
            raise GradError("nothing to evaluate: give --checkpoint, --bundle, --normal-only or --patchcore")
        if not 0 < self.coreset_ratio <= 1:
            raise GradError(f"--coreset-ratio {self.coreset_ratio}: must be in (0, 1]")
        if self.batch_size < 1:
            raise GradError(f"--batch-size {self.batch_size}: must be at least 1")


@dataclass(frozen=True)
class Calibration:
    """The bundle's calibrated image threshold and where it came from."""

    threshold: float
    method: str
    data: dict[str, Any]
    # resolved paths of the images the threshold was set on (None: not recorded, a bundle calibrated by an older
    # gradad): the F1 at the threshold leaves them out, it would otherwise be measured on its own fitting data
    images: frozenset[str] | None = None
    # classes calibrated on their own (grad-calibrate, one --good DIR per class): the threshold grad-run --class uses
    class_thresholds: dict[str, float] | None = None
    # the false-alarm rate grad-calibrate aimed at on the good images (its config), for the operating-point table
    target_false_alarm_rate: float | None = None


def calibration_of(bundle: Bundle) -> Calibration | None:
    """The calibration of a bundle, or None for an uncalibrated bundle; warns when the bundle does not record the
    images it was calibrated on."""
    from gradad.calibration.calibrate import CALIBRATION_IMAGES

    cal = bundle.calibration
    if cal is None:
        return None
    data = cal.data or {}
    recorded = data.get(CALIBRATION_IMAGES)
    if not isinstance(recorded, list):
        log.warning("bundle %s does not record its calibration images (calibrated by an older gradad): the F1 at its "
                    "calibrated threshold may include them; re-run grad-calibrate to leave them out",
                    bundle.directory)
    return Calibration(float(cal.image_threshold), str(cal.method or ""),
                       {k: data.get(k) for k in ("good_dirs", "n_good", "defect_dir", "n_defect")},
                       frozenset(str(p) for p in recorded) if isinstance(recorded, list) else None,
                       cal.class_values("image_threshold") or None,
                       (cal.config or {}).get("false_alarm_rate"))


def calibration_f1_images(samples: Sequence[Sample], calibration: Calibration | None) -> np.ndarray | None:
    """Boolean mask over ``samples``: True for images the F1 at the calibrated threshold may score (not one the
    threshold was calibrated on); None when nothing is left out (no calibration, or no record)."""
    if calibration is None or not calibration.images:
        return None
    keep = np.array([str(s.image_path.resolve()) not in calibration.images for s in samples], bool)
    return None if keep.all() else keep


#: where a row keeps its reduced predictions until the paired comparison (not written to the result files)
PAIRED_KEY = "_paired"


def _paired_of(samples: Sequence[Sample], scores: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> PairedScores:
    """One row's predictions reduced for the paired bootstrap (classes and labels from the samples)."""
    return paired_scores([s.class_name for s in samples], [s.label for s in samples], scores, maps, masks)


def score_row(row: dict[str, Any], samples: Sequence[Sample], scores: np.ndarray, maps: np.ndarray,
              masks: np.ndarray, calibration: Calibration | None, paired: bool = True) -> dict[str, Any]:
    """Add per-class metrics and the F1 summary to ``row``.

    With a calibration, ``image_f1`` is the F1 of ``score > threshold`` (the runtime's decision rule);
    without one, the row reports ``image_best_f1`` and says it is an oracle.
    """
    # f1_at_threshold flags score >= t; the runtime flags score > t: move t to the next float up.
    def above(t: float) -> float:
        return float(np.nextafter(np.float32(t), np.inf))

    threshold = None if calibration is None else above(calibration.threshold)
    own = {c: above(t) for c, t in (calibration.class_thresholds or {}).items()} if calibration else {}
    keep = calibration_f1_images(samples, calibration)  # the threshold was fitted on the others: no F1 on them
    # a class calibrated on its own is scored at its threshold, the one grad-run --class runs at
    per_class = evaluate_predictions(samples, scores, maps, masks, threshold=threshold, f1_images=keep,
                                     class_thresholds=own or None)
    row["per_class"] = per_class
    if paired:  # reduced predictions for the paired bootstrap against the first row
        row[PAIRED_KEY] = _paired_of(samples, scores, maps, masks)
    if calibration is None:
        row["f1"] = {"kind": F1_ORACLE, "key": "image_best_f1", "mean": per_class["mean"]["image_best_f1"]}
    else:
        row["f1"] = {"kind": F1_CALIBRATED, "key": "image_f1", "mean": per_class["mean"]["image_f1"],
                     "threshold": calibration.threshold, "calibration_method": calibration.method,
                     **({"class_thresholds": calibration.class_thresholds} if calibration.class_thresholds else {}),
                     "calibration_images_left_out": 0 if keep is None else int((~keep).sum())}
    return row


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def checkpoint_row(path: str, method: str, samples: Sequence[Sample], cfg: AccuracyConfig,
                   calibration: Calibration | None) -> tuple[dict[str, Any], Any]:
    """Evaluate a GRAD checkpoint with PyTorch; returns (row, predictions) so bundle rows can reuse the images."""
    from gradad.training.checkpoint import load_detector
    from gradad.training.inference import predict

    detector, payload = load_detector(path, cfg.device)
    run_cfg = payload["resolved_config"]
    if method == METHOD_NORMAL_ONLY and run_cfg.model.abnormal_branch:
        log.warning("%s has model.abnormal_branch=true: it is not a NORMAL-only model", path)
    norm = payload["normalisation"]
    t0 = time.perf_counter()
    preds = predict(detector, samples, run_cfg.data.image_size, norm["mean"], norm["std"], cfg.device,
                    cfg.batch_size)
    wall = time.perf_counter() - t0
    variant = " NORMAL-only" if method == METHOD_NORMAL_ONLY else ""
    row = {"label": f"GRAD {run_cfg.preset}{variant} · PyTorch {cfg.device.upper()} FP32",
           "method": method, "preset": run_cfg.preset, "backend": BACKEND_PYTORCH, "precision": "fp32",
           "device": cfg.device, "model": str(path), "image_size": run_cfg.data.image_size,
           "abnormal_branch": bool(run_cfg.model.abnormal_branch),
           "training": {"epochs": [run_cfg.train.stage1_epochs if run_cfg.model.abnormal_branch else 0,
                                   run_cfg.train.stage2_epochs], "train_seconds": payload.get("train_seconds"),
                        "final_losses": payload.get("final_losses"), "data_root": run_cfg.data.root},
           "wall_seconds": round(wall, 2), "seconds_per_image": round(wall / max(1, len(samples)), 4),
           "timing_note": "includes reading and resizing the test images"}
    return score_row(row, samples, preds.scores, preds.maps, preds.masks, calibration, cfg.bootstrap > 0), preds


def _skip(cfg: AccuracyConfig, label: str, reason: str) -> None:
    log.warning("skipped %s: %s", label, reason)
    cfg.skipped.append({"label": label, "reason": reason})


def bundle_rows(cfg: AccuracyConfig, samples: Sequence[Sample], bundle: Bundle,
                calibration: Calibration | None, images_by_hw: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
                ) -> list[dict[str, Any]]:
    """One row per requested bundle backend; a backend that cannot run here is a skip line, never a number."""
    from gradad.runtime.backend import infer_in_batches
    from gradad.runtime.loader import load_backend
    from gradad.training.features import load_images

    rows = []
    for name in (b for b in cfg.backends if b in BUNDLE_BACKENDS):
        kind, precision = BUNDLE_BACKENDS[name]
        label = f"GRAD {bundle.preset} · {name}"
        if kind == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
            _skip(cfg, label, "TensorRT is not importable here (no tensorrt Python package)")
            continue
        try:
            backend, loaded = load_backend(cfg.bundle, kind, precision, threads=cfg.threads,
                                           max_batch=cfg.batch_size)
        except GradError as exc:
            _skip(cfg, label, str(exc))
            continue
        # a TensorRT row's numbers hold for one engine file, TensorRT version and GPU: the row names them
        engine_record = tensorrt_engine_record(backend, loaded)
        hw = backend.input_hw
        if hw not in images_by_hw:
            if hw[0] != hw[1]:
                raise GradError(f"{cfg.bundle}: input {hw[0]}x{hw[1]} is not square; evaluate its checkpoint instead")
            images_by_hw[hw] = load_images(samples, hw[0], desc="reading test images")
        images, masks = images_by_hw[hw]
        t0 = time.perf_counter()
        scores, maps = infer_in_batches(backend, images.transpose(0, 3, 1, 2).astype(np.float32), cfg.batch_size)
        wall = time.perf_counter() - t0
        backend.close()
        device = "cpu" if "CPUExecutionProvider" in backend.name else "cuda"
        row = {"label": f"GRAD {bundle.preset} · {'TensorRT' if kind == 'tensorrt' else 'ONNX Runtime'} "
                        f"{device.upper()} {precision.upper()}",
               "method": METHOD_GRAD, "preset": bundle.preset, "backend": kind, "precision": precision,
               "device": device, "engine": backend.name, "model": str(cfg.bundle), "image_size": hw[0],
               "wall_seconds": round(wall, 2), "seconds_per_image": round(wall / max(1, len(samples)), 4),
               "timing_note": "inference on pre-read images"}
        if engine_record is not None:
            row["tensorrt_engine"] = engine_record
        rows.append(score_row(row, samples, scores, maps, masks, calibration, cfg.bootstrap > 0))
    return rows


def patchcore_row(cfg: AccuracyConfig, test: Sequence[Sample], classes: list[str] | None,
                  image_size: int, backbone: BackboneConfig | None = None) -> dict[str, Any]:
    """PatchCore on the same extractor and input size, one memory bank for all classes, scored with its own map
    head (the original 21x21 mean filter and 32x32 score pool, which suits its smoother patch distances better
    than GRAD's head on MTD) so the baseline is not handicapped by GRAD's choices."""
    from gradad.benchmarks.patchcore import PatchCoreConfig, run_patchcore

    pc_cfg = PatchCoreConfig(coreset_ratio=cfg.coreset_ratio)
    t0 = time.perf_counter()
    result = run_patchcore(cfg.data_roots, classes, pc_cfg, image_size, cfg.cache_dir, test=test, backbone=backbone,
                           keep_predictions=cfg.bootstrap > 0)
    per_class = result["metrics"]
    predictions = result.pop("predictions", None)
    return {"label": f"PatchCore {100 * cfg.coreset_ratio:g}% coreset · PyTorch CPU FP32",
            "method": METHOD_PATCHCORE, "preset": "edge", "backend": BACKEND_PYTORCH, "precision": "fp32",
            "device": "cpu", "image_size": image_size, "wall_seconds": round(time.perf_counter() - t0, 2),
            "seconds_per_image": result["seconds_per_image"], "fit_seconds": result["fit_seconds"],
            "memory_bank": result["memory_bank"], "config": result["config"], "n_train": result["n_train"],
            "backbone": result["backbone"],
            "timing_note": "seconds_per_image: extractor + nearest-neighbour search; wall includes the fit",
            "per_class": per_class,
            "f1": {"kind": F1_ORACLE, "key": "image_best_f1", "mean": per_class["mean"]["image_best_f1"]},
            **({PAIRED_KEY: _paired_of(test, *predictions)} if predictions is not None else {})}


def patchcore_reference(cfg: AccuracyConfig, bundle: Bundle | None) -> tuple[int, BackboneConfig | None]:
    """(input size, extractor) of the GRAD model PatchCore is compared with, so both rows see the same features:
    the checkpoint's (or the NORMAL-only one's) backbone, weights, normalisation and input size, else the bundle's;
    (256, None = the edge preset's extractor) when no model is given."""
    from gradad.training.config import BackboneConfig

    reference = cfg.checkpoint or cfg.normal_only
    if reference:
        from gradad.training.checkpoint import read_checkpoint
        from gradad.training.config import config_from_dict

        run = config_from_dict(read_checkpoint(reference)["config"])
        return run.data.image_size, run.backbone
    if bundle is not None:
        spec = bundle.backbone
        norm = bundle.input.normalisation
        return int(bundle.input.model_height), BackboneConfig(
            name=spec.name, out_indices=tuple(spec.out_indices), weights=spec.weights,
            mean=tuple(norm.mean), std=tuple(norm.std), exposure=spec.exposure,
            exposure_max_gain=spec.exposure_max_gain)
    return 256, None


def _default_classes(cfg: AccuracyConfig, bundle: Bundle | None) -> list[str] | None:
    if cfg.classes:
        return cfg.classes
    if cfg.checkpoint:
        from gradad.training.checkpoint import read_checkpoint

        return list(read_checkpoint(cfg.checkpoint)["classes"])
    if bundle is not None:
        return list(bundle.classes)
    return None


def _exported_from(bundle: Bundle | None, checkpoint: str) -> bool:
    """Whether ``bundle`` was exported from ``checkpoint``, so its calibrated threshold means something for it."""
    if bundle is None or not bundle.source_checkpoint:
        return False
    same = Path(bundle.source_checkpoint).resolve() == Path(checkpoint).resolve()
    if not same:
        log.warning("bundle %s was exported from %s, not %s: the checkpoint row's F1 is its oracle best F1, not at "
                    "the bundle's calibrated threshold", bundle.directory, bundle.source_checkpoint, checkpoint)
    return same


def _trained_images(cfg: AccuracyConfig, bundle: Bundle | None) -> tuple[set[str], frozenset[str]]:
    """What any compared model trained on, each model file read once: the labelled defects its stage 1 used
    (recorded in its model file; a bundle's in its refinement copy) and the content digests of its good images
    (model files and the bundle's ``training_data``, as grad-eval leaves them out). No row scores either, so rows
    stay comparable and none scores images it learnt."""
    from gradad.training.checkpoint import read_checkpoint, trained_defect_paths

    checkpoints = [read_checkpoint(p) for p in (cfg.checkpoint, cfg.normal_only) if p]
    defects = set().union(*(trained_defect_paths(c) for c in checkpoints))
    if bundle is not None and bundle.refine is not None and bundle.refine.model:
        defects |= trained_defect_paths(read_checkpoint(bundle.file(bundle.refine.model)))
    goods = {d for c in checkpoints for d in c.get("trained_good_digests") or ()}
    if bundle is not None:
        goods.update(bundle.training_data.get("trained_good_digests") or ())
    return defects, frozenset(goods)


def run_accuracy(cfg: AccuracyConfig) -> dict[str, Any]:
    """Evaluate every requested row on one test set; returns the result dict (without header fields)."""
    cfg.validate()
    _set_threads(cfg.threads)
    bundle = Bundle.load(cfg.bundle) if cfg.bundle else None
    calibration = calibration_of(bundle) if bundle else None
    if bundle is not None and calibration is None:
        log.info("bundle %s is not calibrated: F1 is the oracle best F1", cfg.bundle)
    classes = _default_classes(cfg, bundle)
    trained_defects, trained_goods = _trained_images(cfg, bundle)
    selection = scoring_selection(load_samples_from_roots(cfg.data_roots, "test", classes, cfg.layout),
                                  cfg.exclude, trained_defects, trained_goods=trained_goods)
    samples, n_excluded = selection.kept, selection.n_split
    n_trained = selection.n_trained + selection.n_tuned
    rows: list[dict[str, Any]] = []
    images_by_hw: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    image_size = 256
    if cfg.checkpoint and BACKEND_PYTORCH in cfg.backends:
        row, preds = checkpoint_row(cfg.checkpoint, METHOD_GRAD, samples, cfg,
                                    calibration if _exported_from(bundle, cfg.checkpoint) else None)
        rows.append(row)
        images_by_hw[(row["image_size"], row["image_size"])] = (preds.images, preds.masks)
    if cfg.bundle:
        rows += bundle_rows(cfg, samples, bundle, calibration, images_by_hw)
    if cfg.normal_only:
        rows.append(checkpoint_row(cfg.normal_only, METHOD_NORMAL_ONLY, samples, cfg, None)[0])
    if cfg.patchcore:
        image_size, backbone = patchcore_reference(cfg, bundle)
        rows.append(patchcore_row(cfg, samples, classes, image_size, backbone))
    compare_with_first_row(rows, cfg.bootstrap)
    n_anomalous = sum(s.label for s in samples)
    f1_keep = calibration_f1_images(samples, calibration)
    n_calibration = 0 if f1_keep is None else int((~f1_keep).sum())
    if n_calibration:
        log.info("%d test images are calibration images of bundle %s: left out of the F1 at its calibrated "
                 "threshold (every other metric scores them)", n_calibration, cfg.bundle)
    return {
        "dataset": {"root": ", ".join(cfg.data_roots), "layout": cfg.layout,
                    "name": " + ".join(Path(r).name for r in cfg.data_roots), "excluded": cfg.exclude,
                    "n_excluded": n_excluded, "n_trained_defects_left_out": n_trained,
                    "n_trained_goods_left_out": selection.n_trained_goods,
                    # None: the bundle does not record them, its calibrated F1 may include them
                    "n_calibration_images_left_out_of_f1": (None if calibration is not None
                                                            and calibration.images is None else n_calibration),
                    "classes": sorted({s.class_name for s in samples}), "n_test_images": len(samples),
                    "n_anomalous": n_anomalous},
        "protocol": "unified: one model for all classes, metrics class by class, mean over classes",
        "calibration": None if calibration is None else {
            "threshold": calibration.threshold, "method": calibration.method, "data": calibration.data,
            "target_false_alarm_rate": calibration.target_false_alarm_rate},
        "threads": cfg.threads,
        "environment": environment(),
        "rows": rows,
        "skipped": list(cfg.skipped),
    }


def compare_with_first_row(rows: list[dict[str, Any]], resamples: int, level: float = DEFAULT_LEVEL) -> None:
    """Give every row after the first ``"vs_first_row"``: its difference to the first row in image AUROC, pixel
    AUROC and pixel AUPR per class and mean, with a paired bootstrap interval over ``resamples`` resamples of the
    test images (see :mod:`gradad.evaluation.bootstrap`); drops the rows' reduced predictions afterwards."""
    paired = [row.pop(PAIRED_KEY, None) for row in rows]
    if resamples <= 0 or len(rows) < 2 or paired[0] is None:
        return
    for row, other in zip(rows[1:], paired[1:]):
        if other is None:
            continue
        row["vs_first_row"] = {"first_row": rows[0]["label"], "resamples": resamples, "level": level,
                               "unit": "images of each class, defective and good resampled separately",
                               "metrics": paired_differences(paired[0], other, resamples, level)}


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: every row's difference to the first row per metric and class, with its bootstrap interval."""
    compared = [r for r in rows if "vs_first_row" in r]
    if not compared:
        return ""
    first = compared[0]["vs_first_row"]
    classes = list(first["metrics"][PAIRED_METRICS[0]])
    lines = [f"Difference to **{first['first_row']}** (points; {100 * first['level']:g} % paired bootstrap interval "
             f"over {first['resamples']} resamples of the test images of each class; pixel metrics from binned "
             "maps; P(≤ 0): share of resamples where the row is not above the first):", "",
             "| row | metric | " + " | ".join(classes) + " |", "|---|---|" + "---:|" * len(classes)]
    for row in compared:
        for metric in PAIRED_METRICS:
            cells = [format_interval(row["vs_first_row"]["metrics"][metric][c], 2) for c in classes]
            lines.append(f"| {row['label']} | {metric.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * float(value):.1f}"


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per row with the mean metrics, F1 (kind marked) and seconds per image."""
    header = ["model", *(h for _, h in TABLE_COLUMNS), "F1", "s / image"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        mean = row["per_class"]["mean"]
        f1 = _pct(row["f1"]["mean"]) + ("" if row["f1"]["kind"] == F1_CALIBRATED else " (oracle)")
        cells = [row["label"], *(_pct(mean.get(k)) for k, _ in TABLE_COLUMNS), f1, f"{row['seconds_per_image']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _calibration_note(dataset: dict[str, Any]) -> list[str]:
    """The report line saying which images the F1 at the calibrated threshold leaves out (or may include)."""
    if "n_calibration_images_left_out_of_f1" not in dataset:
        return []
    n = dataset["n_calibration_images_left_out_of_f1"]
    if n is None:
        return ["The bundle does not record its calibration images: F1 at its calibrated threshold may include "
                "them.", ""]
    return [f"F1 at the calibrated threshold leaves out the {n} test images the threshold was calibrated on.", ""] if n \
        else []


def _class_threshold_note(rows: list[dict[str, Any]]) -> list[str]:
    """The report line naming the classes scored at their own calibrated threshold (grad-run --class)."""
    own = next((r["f1"]["class_thresholds"] for r in rows if (r.get("f1") or {}).get("class_thresholds")), None)
    if not own:
        return []
    listed = ", ".join(f"{c} {t:.4g}" for c, t in sorted(own.items()))
    return [f"F1 at the calibrated threshold: each class at its own ({listed}), as `grad-run --class` runs.", ""]


def _rate_with_bound(k: int, n: int, lower: bool) -> str:
    """``k / n = r %`` with its one-sided 95 % Clopper-Pearson bound (upper for a false-alarm rate, lower for a
    recall, as grad-calibrate states them)."""
    from gradad.calibration.thresholds import binomial_upper_bound

    if n == 0:
        return "–"
    bound = 1.0 - binomial_upper_bound(n - k, n) if lower else binomial_upper_bound(k, n)
    return f"{k} / {n} = {100 * k / n:.1f}% ({'≥' if lower else '≤'} {100 * bound:.1f}%)"


def operating_point_table(result: dict[str, Any]) -> list[str]:
    """Markdown: what the calibrated threshold does on the test images, per class of every calibrated row (the
    runtime's decision: good parts flagged, defective parts found), with 95 % bounds; nothing without a calibration
    or for a result file written before the counts were recorded."""
    cal = result.get("calibration")
    rows = [r for r in result["rows"] if (r.get("f1") or {}).get("kind") == F1_CALIBRATED]
    if not cal or not rows:
        return []
    target = cal.get("target_false_alarm_rate")
    aim = f", aimed at {100 * target:g}% false alarms on the calibration images" if target and \
        cal.get("method") == "far" else ""
    lines = []
    for row in rows:
        own = row["f1"].get("class_thresholds") or {}
        for cls, m in row["per_class"].items():
            if cls == "mean" or "n_good_scored" not in m:
                continue
            t = own.get(cls, row["f1"]["threshold"])
            lines.append(f"| {row['label']} | {cls} | {t:.4g} | "
                         f"{_rate_with_bound(m['n_false_alarms'], m['n_good_scored'], lower=False)} | "
                         f"{_rate_with_bound(m['n_detected'], m['n_defective_scored'], lower=True)} |")
    if not lines:  # a result file written before the operating point was recorded
        return []
    unrecorded = result.get("dataset", {}).get("n_calibration_images_left_out_of_f1", 0) is None
    which = ("on the test images (the bundle does not record its calibration images: they may be among them)"
             if unrecorded else "on the test images it was not calibrated on")
    return [f"At the calibrated threshold (method `{cal.get('method')}`{aim}), {which}: good parts flagged and "
            "defective parts found, with one-sided 95% bounds:", "",
            "| row | class | threshold | false alarms (good) | recall (defective) |", "|---|---|---:|---:|---:|",
            *lines, ""]


def accuracy_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one accuracy result: command, summary table, skips, per-class tables."""
    ds = result["dataset"]
    parts = [f"# {result.get('name', 'accuracy')}", "",
             f"`{result.get('command', '')}`", "",
             f"Dataset `{ds['root']}`: {ds['n_test_images']} test images ({ds['n_anomalous']} anomalous), "
             f"classes {', '.join(ds['classes'])}. {result['protocol']}.", "",
             *_calibration_note(ds), *_class_threshold_note(result["rows"]), summary_table(result["rows"]),
             *operating_point_table(result)]
    table = comparison_table(result["rows"])
    if table:
        parts += [table]
    parts += [f"- {note}." for note in filter(None, map(engine_note, result["rows"]))]
    parts += [f"- skipped {s['label']}: {s['reason']}" for s in result.get("skipped", [])]
    for row in result["rows"]:
        parts += ["", f"## {row['label']}", "", markdown_table(row["per_class"])]
    return "\n".join(parts)
