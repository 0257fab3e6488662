"""``grad-export quantize``: an INT8 QDQ ONNX of a bundle, calibrated on good images and parity-gated.

ONNX Runtime static quantisation in QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised
operator), per-channel symmetric INT8 weights. Activations are symmetric int8 by default, the form TensorRT's
explicit quantisation reads (``grad-export build --int8``) and ARM CPUs run; ``--activations uint8`` gives the
asymmetric form ONNX Runtime runs fastest on x86 CPUs (no TensorRT engine is built from it).

Kept in FP32, by the rule shared with FP16 and TensorRT (:mod:`gradad.export.precision`, :func:`int8_fp32_nodes`):
GridSample, the coordinate mappers (node names containing ``mapper/``: ``/mapper/`` and ``/abnormal_mapper/``), the
grid modules and every node between a mapper and a GridSample coordinate input, the model's own arithmetic
(cosines, refinement, map fusion, image Gaussian), the map head (up-sampling, smoothing, image score) and, for INT8
only, the whole extractor (FP16 keeps its blocks 3-4 in FP16; see :func:`~gradad.export.precision.keeps_fp32_in_int8`
for the numbers). What INT8 quantises are the convolutions of the two fusion CNNs.

The gate (:class:`~gradad.export.parity.ParityGates`, ``int8_*``): map and score relative L2 error against the FP32
ONNX, and the image-AUROC drop on a labelled parity set (a dataset's test split) of at most 0.5 point. A model
that misses it is not added to the bundle; the numbers are printed and stored nowhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from gradad.bundle import FP32_ONNX, INT8_ONNX, Bundle, BundleError, FileEntry
from gradad.data.datasets import list_image_files, load_samples_from_roots
from gradad.data.images import read_image_rgb
from gradad.errors import DatasetError, GradError
from gradad.export import precision
from gradad.export.fp16 import _after_mapper, coordinate_path
from gradad.export.lint import GridSampleSettings, lint_or_raise
from gradad.export.parity import ParityError, ParityGates, check_int8_gates, compare_fp16, gates_dict
from gradad.export.tensorrt_build import is_engine_filename
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.runtime.preprocess import to_model_input

log = logging.getLogger(__name__)

#: Operators quantised: the compute (convolutions, matrix products). Element-wise arithmetic stays FP32: the
#: GRAD model normalises features (Sqrt, Max, Div) where an INT8 denominator near zero blows the map up.
OPS_TO_QUANTIZE = ("Conv", "MatMul", "Gemm")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Activation encodings: "int8" symmetric (what TensorRT's explicit quantisation and ARM CPUs take) or "uint8"
#: asymmetric (ONNX Runtime's fast INT8 kernels on x86 CPUs: the headline model 20.1 -> 15.4 ms at batch 1 on
#: the 2-core AMD EPYC here, where symmetric int8 ran no faster than FP32).
ACTIVATION_TYPES = ("int8", "uint8")


@dataclass
class QuantizeOptions:
    """Settings of ``grad-export quantize``."""

    calib: list[str] = field(default_factory=list)  # folders of good images (calibration)
    calib_max_images: int = 64  # spread over the folders, sorted, every k-th
    # labelled parity set: the test split of these dataset roots (default: the bundle's training root); several
    # roots for a unified model trained on several
    data_roots: list[str] = field(default_factory=list)
    parity_max_images: int = 64
    method: str = "minmax"  # activation range: minmax | entropy | percentile
    activations: str = "int8"  # int8 (symmetric; TensorRT, ARM) | uint8 (asymmetric; ONNX Runtime on x86)
    per_channel: bool = True
    threads: int = 0
    gates: ParityGates = field(default_factory=ParityGates)

    def validate(self) -> None:
        """Refuse settings that cannot give a gated INT8 model, naming the option."""
        if not self.calib:
            raise GradError("--calib DIR: give at least one folder of good images to calibrate on")
        if self.method not in CALIBRATION_METHODS:
            raise GradError(f"--method {self.method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if self.activations not in ACTIVATION_TYPES:
            raise GradError(f"--activations {self.activations!r}: choose one of {', '.join(ACTIVATION_TYPES)}")
        if self.calib_max_images < 1 or self.parity_max_images < 2:
            raise GradError("--calib-max-images must be >= 1 and --parity-max-images >= 2")


# Why the extractor stays out of INT8 (the FP32 rule, gradad.export.precision): INT8 noise in its first layers (the
# input quantised to a symmetric grid, then amplified) moved the edge model's map by 95% relative L2 (stem FP32:
# 27%; stem + first block: 13%), the unified MTD + tyre model's by 39% with the stem + first block FP32 (blocks 0-2
# FP32: 9.7%); blocks 3-4: see keeps_fp32_in_int8. The head's smoothing convolutions are no place for INT8.
def int8_fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in FP32: the FP16 ONNX's FP32 nodes (the shared rule of
    :mod:`gradad.export.precision` and the coordinate path after a mapper) plus the rest of the extractor."""
    path = coordinate_path(model)
    return [n.name for n in model.graph.node
            if precision.keeps_fp32_in_int8(n) or (n.name in path and _after_mapper(n, model.graph))]


def _spread(files: list[Path], n: int) -> list[Path]:
    """Up to ``n`` files spread evenly over a sorted list (every k-th), so a slice covers the whole folder."""
    if len(files) <= n:
        return files
    return [files[int(i * len(files) / n)] for i in range(n)]


def calibration_batches(folders: Sequence[str], hw: tuple[int, int], max_images: int) -> list[np.ndarray]:
    """Model inputs (1, 3, H, W) uint8 of up to ``max_images`` good images spread over ``folders``."""
    per_folder = max(1, max_images // len(folders))
    files = [f for d in folders for f in _spread(list_image_files(d, "--calib"), per_folder)]
    log.info("calibrating on %d good images from %s", len(files), ", ".join(map(str, folders)))
    return [to_model_input([read_image_rgb(f)], *hw) for f in files]


class _Reader:
    """ONNX Runtime's CalibrationDataReader over prepared batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name, self._it = input_name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # pragma: no cover - called by some ORT versions only
        pass


def quantize_model(src: Path, dst: Path, input_name: str, batches: list[np.ndarray], opts: QuantizeOptions
                   ) -> list[str]:
    """Write the INT8 QDQ model of ``src`` to ``dst``; returns the nodes kept FP32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(src)
    keep = int8_fp32_nodes(model)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[opts.method]
    symmetric = opts.activations == "int8"
    with tempfile.TemporaryDirectory(prefix="grad-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_optimization=True)  # shapes for the quantiser, names kept
        quantize_static(
            str(pre), str(dst), _Reader(input_name, batches), quant_format=QuantFormat.QDQ,
            per_channel=opts.per_channel, activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=keep,
            op_types_to_quantize=list(OPS_TO_QUANTIZE),
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                           "CalibTensorRangeSymmetric": symmetric, "CalibMovingAverage": opts.method == "minmax"},
        )
    return keep


def labelled_parity_set(bundle: Bundle, opts: QuantizeOptions) -> tuple[list[np.ndarray], np.ndarray, str]:
    """(images, labels, description) of the AUROC gate: a balanced slice of the dataset's test split."""
    from gradad.export.onnx_export import _balanced_subset

    roots = list(opts.data_roots) or ([bundle.data_root] if bundle.data_root else [])
    if not roots:
        raise GradError("the INT8 gate needs labelled images: pass --data ROOT (a dataset with a test split)")
    root = ", ".join(roots)
    try:
        samples = load_samples_from_roots(roots, "test", bundle.classes)
    except DatasetError as exc:
        raise DatasetError(f"INT8 parity gate: {exc}; pass --data ROOT (repeatable) with a test split") from exc
    chosen = _balanced_subset(samples, opts.parity_max_images)
    labels = np.array([s.label for s in chosen])
    if not 0 < labels.sum() < len(labels):
        raise GradError(f"INT8 parity gate: the test split of {root} needs good and defective images")
    return [read_image_rgb(s.image_path) for s in chosen], labels, f"{len(chosen)} test images of {root}"


def int8_parity(fp32_path: Path, int8_path: Path, batch: np.ndarray, labels: np.ndarray, threads: int
                ) -> dict[str, Any]:
    """INT8 vs FP32 on the parity set: relative map/score errors and the image-AUROC change."""
    ref_scores, ref_maps = OnnxRuntimeBackend(fp32_path, ["cpu"], threads).infer_all(batch)
    scores, maps = OnnxRuntimeBackend(int8_path, ["cpu"], threads).infer_all(batch)
    report = compare_fp16(ref_scores, ref_maps, scores, maps, labels)
    report["auroc_int8"] = report.pop("auroc_fp16")
    return report


def quantize_bundle(bundle_dir: str | Path, opts: QuantizeOptions) -> dict[str, Any]:
    """Add ``model.int8.onnx`` to a bundle when it passes the INT8 gate; returns the parity report.

    Raises ParityError (nothing written) when the INT8 model misses a gate.
    """
    opts.validate()
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    bundle.require_current("grad-export quantize")
    bundle.verify([FP32_ONNX])
    hw = bundle.input.hw
    t0 = time.perf_counter()
    batches = calibration_batches(opts.calib, hw, opts.calib_max_images)
    images, labels, described = labelled_parity_set(bundle, opts)
    parity_batch = to_model_input(images, *hw)
    scratch = bundle_dir / ".int8-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        keep = quantize_model(bundle.file(FP32_ONNX), scratch / INT8_ONNX, bundle.input.name, batches, opts)
        lint_or_raise(onnx.load(scratch / INT8_ONNX), "INT8 ONNX", GridSampleSettings())
        report = int8_parity(bundle_dir / FP32_ONNX, scratch / INT8_ONNX, parity_batch, labels, opts.threads)
        report.update(images=described, fp32_nodes=len(keep), method=opts.method, per_channel=opts.per_channel,
                      activations=opts.activations,
                      calibration_images=len(batches), calibration=[str(c) for c in opts.calib])
        failed = check_int8_gates(report, opts.gates)
        if failed:
            raise ParityError(f"INT8 model of {bundle_dir} rejected (not written): " + "; ".join(failed))
        target = bundle.file(INT8_ONNX)  # checked first: a name linked out of the bundle is refused, not written
        if target.is_dir() or target.is_symlink():
            raise BundleError(f"{target} is a folder or a link: remove it, then quantise again")
        entry = FileEntry.of(scratch / INT8_ONNX)  # hashed before the swap: replace and save back to back
        os.replace(scratch / INT8_ONNX, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    bundle.files[INT8_ONNX] = entry
    bundle.parity["onnx_int8_vs_fp32"] = report
    bundle.parity["gates"] = {**bundle.parity.get("gates", {}), **gates_dict(opts.gates)}
    # INT8 engines were built from the QDQ model just replaced: they no longer run what this bundle describes
    stale = bundle.engines_for("int8")
    bundle.engines = [e for e in bundle.engines if e not in stale]
    for engine in stale:
        bundle.files.pop(engine.file, None)
    bundle.save()
    for engine in stale:  # deleted once the manifest no longer names them; a name we never write is left alone
        if not is_engine_filename(engine.file):
            log.warning("INT8 engine %s no longer listed (built from the previous %s); not deleted: gradad never "
                        "names an engine so", engine.file, INT8_ONNX)
            continue
        bundle.file(engine.file).unlink(missing_ok=True)
        log.warning("removed INT8 engine %s: it was built from the previous %s; rebuild it on the device with "
                    "grad-export build --int8 %s --parity-images DIR", engine.file, INT8_ONNX, bundle_dir)
    log.info("INT8: map rel L2 %.3f, image AUROC %s -> %s", report["map_rel_l2"], report["auroc_fp32"],
             report["auroc_int8"])
    return report
