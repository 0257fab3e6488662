"""Checkpoint -> model bundle: FP32 + FP16 ONNX at opset 17, lint, parity gates, bundle.json."""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from gradad import __version__
from gradad.bundle import (BUNDLE_SCHEMA_VERSION, FP16_ONNX, FP32_ONNX, INPUT_DTYPE_BY_VERSION, MANIFEST_NAME,
                           Backbone, Bundle, BundleError, FileEntry, InputSpec, Normalisation, OnnxInfo,
                           foreign_entries, read_manifest)
from gradad.data.datasets import Sample, list_image_files, load_samples
from gradad.data.images import read_image_rgb
from gradad.errors import DatasetError
from gradad.export.fp16 import convert_to_fp16, default_fp32_nodes, fp32_tensor_check
from gradad.export.graph import ExportModule
from gradad.export.lint import GridSampleSettings, lint_or_raise
from gradad.export.parity import ParityError, ParityGates, check_gates, compare_fp16, compare_fp32, gates_dict
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.runtime.preprocess import to_model_input
from gradad.training.checkpoint import load_detector
from gradad.training.model import GRADDetector

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME, OUTPUT_NAMES = "image", ("score", "anomaly_map")


@dataclass
class ExportOptions:
    """Settings of ``grad-export onnx``."""

    name: str | None = None  # bundle name (default: the output folder's name)
    data_root: str | None = None  # parity images: test split of this dataset (default: the training dataset)
    parity_images: str | None = None  # or: a folder of unlabelled images
    parity_max_images: int = 64  # images for FP16 parity / AUROC (all test images up to this count)
    torch_parity_images: int = 8  # images for the PyTorch vs ONNX comparison (PyTorch on CPU is slow)
    input_size: tuple[int, int] | None = None  # frame size the graph takes (default: the model's)
    simplify: bool = True
    fp16: bool = True
    overwrite: bool = False
    threads: int = 0
    gates: ParityGates = field(default_factory=ParityGates)


def export_onnx_fp32(module: ExportModule, path: Path) -> onnx.ModelProto:
    """TorchScript-based export (dynamo=False) at opset 17 with a dynamic batch axis; the input is uint8."""
    h, w = module.input_hw
    dummy = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module, (dummy,), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, "score": {0: "batch"}, "anomaly_map": {0: "batch"}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.save(model, path)
    return model


def declare_output_shapes(model: onnx.ModelProto, map_chw: tuple[int, ...]) -> None:
    """Write the outputs' declared shapes: score (batch,), anomaly_map (batch, 1, H, W). The TorchScript exporter's
    shape inference names the map's height after the batch axis ("batch") and its width after a Conv: tools that
    read the graph (TensorRT's bindings, Netron, an integrator's code) would see a wrong shape."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        want: list[int | str] = ["batch", *map_chw] if output.name == "anomaly_map" else ["batch"]
        del dims[:]
        for value in want:
            dim = dims.add()
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = int(value)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim: constant folding and dead-node removal (keeps opset and dynamic axes)."""
    import onnxslim

    slim = onnxslim.slim(model)
    onnx.checker.check_model(slim)
    return slim


def _balanced_subset(samples: list[Sample], n: int) -> list[Sample]:
    """Up to n samples taking classes and labels in turn, so a small subset still has good and defective ones."""
    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.class_name, s.label), []).append(s)
    out: list[Sample] = []
    queues = [list(v) for v in groups.values()]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def load_parity_images(payload: dict[str, Any], opts: ExportOptions) -> tuple[list[np.ndarray], np.ndarray | None, str]:
    """Real images for the parity gates: (RGB images, labels or None, description)."""
    if opts.parity_images:
        folder = Path(opts.parity_images)
        files = list_image_files(folder, "--parity-images")[: opts.parity_max_images]
        return [read_image_rgb(p) for p in files], None, f"{len(files)} images from {folder}"
    cfg = payload["resolved_config"]
    root = opts.data_root or cfg.data.root
    try:
        samples = load_samples(root, "test", payload["classes"], cfg.data.layout)
    except DatasetError as exc:
        raise DatasetError(f"parity gates need real images: {exc}; pass --data ROOT or --parity-images DIR") from exc
    chosen = _balanced_subset(samples, opts.parity_max_images)
    labels = np.array([s.label for s in chosen])
    return [read_image_rgb(s.image_path) for s in chosen], labels, f"{len(chosen)} test images of {root}"


def _prepare_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder whose replacement could lose anything that is not a gradad bundle's."""
    if out_dir.is_symlink():
        raise BundleError(f"{out_dir} is a symbolic link: give the folder itself ({out_dir.resolve()})")
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"{out_dir} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if out_dir.exists() and (cwd == out_dir.resolve() or out_dir.resolve() in cwd.parents):
        raise BundleError(f"{out_dir} is the current folder or holds it: give a bundle folder such as models/NAME")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST_NAME).is_file():
            raise BundleError(f"{out_dir} exists and is not a model bundle: refusing to write into it")
        if not overwrite:
            raise BundleError(f"{out_dir} already holds a bundle: pass --overwrite to replace it")
        try:
            manifest = read_manifest(out_dir)
        except BundleError as exc:
            raise BundleError(f"{out_dir} is not a readable gradad bundle ({exc}): --overwrite replaces only "
                              f"bundles; move it away or choose another folder") from None
        foreign = foreign_entries(out_dir, manifest)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BundleError(f"{out_dir} holds {shown}, which the bundle does not list: --overwrite replaces the "
                              f"whole folder, so move them away first")


def _swap_in(work: Path, out_dir: Path) -> None:
    """Put the finished bundle ``work`` at ``out_dir``; the old bundle is deleted only once the new one is there
    (restored if the move fails)."""
    old = out_dir.parent / f".{out_dir.name}.export-old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    try:
        work.rename(out_dir)
    except OSError:
        if old.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def training_data_section(payload: dict[str, Any]) -> dict[str, Any]:
    """bundle.json's ``training_data``: the model's data summary plus what grad-calibrate's input check reads.

    Content digests of the training goods: they find copies of a training image on any machine, and a bundle that
    travels to a line or a customer names none of the training images. A model file from before digests carries
    its training roots, trained goods (by folder) and held-out goods, checked by path. Files a model file names
    are never read here (a hostile one could name any file of the user's and learn its digest from the bundle)."""
    section = dict(payload.get("data_summary", {}))
    digests = payload.get("trained_good_digests")
    if digests is not None:
        section["trained_good_digests"] = list(digests)
        return section
    for key in ("data_roots", "trained_goods", "held_out_goods"):
        if key in payload:
            section[key] = dict(payload[key]) if isinstance(payload[key], dict) else list(payload[key])
    return section


def score_meaning(detector: GRADDetector) -> str:
    """What the bundle's image score is, in words (bundle.json ``outputs.score.meaning``)."""
    pooled = f"max of the {detector.head.score_pool}x{detector.head.score_pool} mean-pooled map"
    gaussian = detector.model.image_gaussian
    if gaussian is None or not gaussian.fitted:
        return f"image anomaly score: {pooled}"
    return (f"image anomaly score in the map's units: max(0, {pooled} + s_map * (Mahalanobis distance of the "
            f"pooled feature statistics from the nearest of {gaussian.mean.shape[0]} class Gaussian(s) - its mean) / "
            "its std), i.e. the sum of both parts' z-scores on held-out good images, times s_map plus the map "
            "score's mean")


def _write_fp32(module: ExportModule, work: Path, sample: np.ndarray, opts: ExportOptions,
                grid_settings: GridSampleSettings) -> tuple[onnx.ModelProto, int]:
    """Export, simplify, shape-declare, check and lint the FP32 graph into ``work``; (model, GridSample nodes)."""
    log.info("exporting ONNX (opset %d, TorchScript exporter)", OPSET)
    model = export_onnx_fp32(module, work / "raw.onnx")
    if opts.simplify:
        model = simplify(model)
    with torch.no_grad():
        declare_output_shapes(model, tuple(module(torch.from_numpy(sample))[1].shape[1:]))
    onnx.checker.check_model(model)
    n_grid = lint_or_raise(model, "FP32 ONNX", grid_settings)
    onnx.save(model, work / FP32_ONNX)
    (work / "raw.onnx").unlink()
    return model, n_grid


def _parity_report(module: ExportModule, model: onnx.ModelProto, work: Path, batch: np.ndarray, labels: Any,
                   parity_source: Any, opts: ExportOptions, grid_settings: GridSampleSettings,
                   checkpoint: str | Path) -> dict[str, Any]:
    """FP32 ONNX Runtime vs PyTorch and (with ``opts.fp16``) the FP16 graph, written into ``work``, vs FP32;
    raises :class:`ParityError` when a gate fails."""
    fp32 = OnnxRuntimeBackend(work / FP32_ONNX, ["cpu"], opts.threads)
    n_pt = min(opts.torch_parity_images, len(batch))
    with torch.no_grad():
        pt_scores, pt_maps = module(torch.from_numpy(batch[:n_pt]))
    ort_scores, ort_maps = fp32.infer_all(batch, batch_size=8)
    parity: dict[str, Any] = {
        "images": parity_source,
        "onnx_fp32_vs_pytorch": compare_fp32(pt_scores.numpy(), pt_maps[:, 0].numpy(),
                                             ort_scores[:n_pt], ort_maps[:n_pt]),
        "gates": gates_dict(opts.gates),
    }
    fp16_report = None
    if opts.fp16:
        log.info("converting to FP16 (the FP32 rule of gradad.export.precision kept FP32)")
        model16, kept = convert_to_fp16(model, default_fp32_nodes)
        lint_or_raise(model16, "FP16 ONNX", grid_settings)
        leaked = fp32_tensor_check(model16)
        if leaked:
            raise ParityError(f"FP16 conversion left FP16 tensors on block-listed nodes: {leaked[:5]}")
        onnx.save(model16, work / FP16_ONNX)
        fp16 = OnnxRuntimeBackend(work / FP16_ONNX, ["cpu"], opts.threads)
        s16, m16 = fp16.infer_all(batch, batch_size=8)
        fp16_report = compare_fp16(ort_scores, ort_maps, s16, m16, labels)
        fp16_report["fp32_nodes"] = kept
        parity["onnx_fp16_vs_fp32"] = fp16_report
    failed = check_gates(parity["onnx_fp32_vs_pytorch"], fp16_report, opts.gates)
    parity["passed"] = not failed
    if failed:
        raise ParityError(f"export of {checkpoint} rejected: " + "; ".join(failed))
    return parity


def _manifest(module: ExportModule, detector: GRADDetector, payload: dict[str, Any], work: Path, parity: dict[str, Any],
              n_grid: int, grid_settings: GridSampleSettings, name: str, checkpoint: str | Path,
              opts: ExportOptions, t0: float) -> Bundle:
    """bundle.json's record of the graphs just written into ``work``."""
    cfg, norm = payload["resolved_config"], payload["normalisation"]
    h, w = module.input_hw
    files = {FP32_ONNX: FileEntry.of(work / FP32_ONNX)}
    if opts.fp16:
        files[FP16_ONNX] = FileEntry.of(work / FP16_ONNX)
    resize = ("caller, per axis: cv2.INTER_AREA where it shrinks, INTER_LINEAR where it grows "
              "(gradad.data.images.resize_hw)"
              if (h, w) == module.model_hw else
              f"caller to {h}x{w}; graph: bilinear to {module.model_hw[0]}x{module.model_hw[1]}")
    return Bundle(
        schema_version=BUNDLE_SCHEMA_VERSION,
        gradad_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        name=name,
        preset=cfg.preset,
        backbone=Backbone(cfg.backbone.name, list(cfg.backbone.out_indices), cfg.backbone.weights,
                          cfg.backbone.exposure,
                          cfg.backbone.exposure_max_gain if cfg.backbone.exposure == "gain" else None),
        input=InputSpec(
            name=INPUT_NAME, layout="NCHW", dtype=INPUT_DTYPE_BY_VERSION[BUNDLE_SCHEMA_VERSION], color="RGB",
            value_range=[0, 255], height=h, width=w, model_height=module.model_hw[0],
            model_width=module.model_hw[1],
            normalisation=Normalisation(list(norm["mean"]), list(norm["std"]), in_graph=True), resize=resize),
        outputs={
            "score": {"shape": ["batch"], "meaning": score_meaning(detector)},
            "anomaly_map": {"shape": ["batch", 1, h, w], "meaning": "per-pixel anomaly, smoothed",
                            "smoothing": cfg.model.smoothing, "map_scales": list(cfg.model.map_scales),
                            "refine_mask_weight": cfg.model.map_refine_mask_weight},
        },
        classes=payload["classes"],
        training_data=training_data_section(payload),
        onnx=OnnxInfo(opset=OPSET, exporter=f"torch.onnx TorchScript (dynamo=False), torch {torch.__version__}",
                      dynamic_batch=True, simplified=opts.simplify, gridsample_nodes=n_grid,
                      gridsample={"mode": grid_settings.mode, "padding_mode": grid_settings.padding_mode,
                                  "align_corners": grid_settings.align_corners}),
        files=files,
        parity=parity,
        engines=[],
        calibration=None,
        source_checkpoint=str(checkpoint),
        data_root=str(opts.data_root or cfg.data.root),
        export_seconds=round(time.perf_counter() - t0, 1),
    )


def export_bundle(checkpoint: str | Path, out_dir: str | Path, opts: ExportOptions | None = None) -> Path:
    """Export ``checkpoint`` into a bundle folder; nothing is written unless every gate passes."""
    opts = opts or ExportOptions()
    out_dir = Path(out_dir)
    target = Path(os.path.abspath(out_dir))  # "." and "x/.." get a real name (the temporary folder is a sibling)
    _prepare_target(target, opts.overwrite)
    t0 = time.perf_counter()
    detector, payload = load_detector(checkpoint, "cpu")
    norm = payload["normalisation"]
    module = ExportModule(detector, norm["mean"], norm["std"], opts.input_size).eval()
    h, w = module.input_hw
    images, labels, parity_source = load_parity_images(payload, opts)
    batch = to_model_input(images, h, w)

    work = target.parent / f".{target.name}.export-tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        grid_settings = GridSampleSettings()
        model, n_grid = _write_fp32(module, work, batch[:1], opts, grid_settings)
        parity = _parity_report(module, model, work, batch, labels, parity_source, opts, grid_settings, checkpoint)
        _manifest(module, detector, payload, work, parity, n_grid, grid_settings, opts.name or target.name,
                  checkpoint, opts, t0).save(work)
        _swap_in(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("bundle written to %s", out_dir)
    return out_dir
