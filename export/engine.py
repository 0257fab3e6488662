"""``grad-export build``: a TensorRT engine for a bundle, parity-gated against ONNX Runtime, stamped into
bundle.json."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gradad.bundle import (FP16_ONNX, FP32_ONNX, INT8_ONNX, TIMING_CACHE, Bundle, EngineStamp, FileEntry,
                           bundle_file)
from gradad.cli_utils import check_writable
from gradad.data.datasets import list_image_files
from gradad.data.images import read_image_rgb
from gradad.engine_trust import TrustListError, trust
from gradad.errors import DatasetError, GradError
from gradad.export.lint import check_external_data
from gradad.export.precision import FP32_NAME_PATTERNS, keeps_fp32_name
from gradad.export.parity import ParityError, ParityGates, check_gates, check_int8_gates, compare_fp16
from gradad.export.tensorrt_build import EngineBuildConfig, build_engine, check_tensorrt_version
from gradad.runtime.tensorrt_device import TensorRTUnavailable, gpu_identity, import_tensorrt
from gradad.runtime.backend import Backend, infer_in_batches
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.runtime.preprocess import to_model_input

log = logging.getLogger(__name__)


def _default_engine_backend(path: Path) -> Backend:
    from gradad.runtime.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(path)


@dataclass(frozen=True)
class ParityImages:
    """The decoded images an engine is gated on: the model input batch and where it came from."""

    batch: np.ndarray
    description: str  # "N images from DIR", recorded in the engine's parity report


def load_parity_images(bundle: Bundle, images_dir: str | Path, max_images: int = 32) -> ParityImages:
    """List and decode up to ``max_images`` images of ``images_dir`` into the bundle's model input.

    :func:`build_bundle_engine` calls this before building: an empty folder or a file that is no image is then
    found in seconds, not after a build that takes minutes on a Jetson.

    Raises:
        DatasetError: the folder is missing or holds no images, or an image cannot be decoded.
    """
    files = list_image_files(images_dir, "--parity-images")[:max_images]
    try:  # each image made the model input as it is read: 32 large photographs held whole would take gigabytes
        batch = np.concatenate([to_model_input([read_image_rgb(f)], *bundle.input.hw) for f in files])
    except DatasetError as exc:  # name the option: the message alone names a file, not what it was given for
        raise DatasetError(f"--parity-images {images_dir}: {exc}") from None
    return ParityImages(batch, f"{len(files)} images from {images_dir}")


def engine_parity(bundle: Bundle, engine: Backend, images: ParityImages | str | Path,
                  max_images: int = 32) -> dict[str, Any]:
    """Engine vs ONNX Runtime FP32 on real images: relative L2 errors of maps and scores.

    ``images`` is what :func:`load_parity_images` returned, or a folder it is called on (``max_images`` applies
    to a folder only)."""
    if not isinstance(images, ParityImages):
        images = load_parity_images(bundle, images, max_images)
    ref_scores, ref_maps = OnnxRuntimeBackend(bundle.file(FP32_ONNX), ["cpu"]).infer_all(images.batch)
    scores, maps = infer_in_batches(engine, images.batch)
    report = compare_fp16(ref_scores, ref_maps, scores, maps, labels=None)
    report["images"] = images.description
    return report


def _checked_bundle(bundle_dir: Path, int8: bool, parity_images: str | Path) -> Bundle:
    """The bundle, its ONNX files verified against bundle.json (external data inside the bundle), and the parity
    folder present; an INT8 build of a uint8-activation QDQ model is refused."""
    bundle = Bundle.load(bundle_dir)
    if int8 and bundle.parity.get("onnx_int8_vs_fp32", {}).get("activations") == "uint8":
        raise GradError(f"{bundle_dir / INT8_ONNX} has asymmetric uint8 activations (grad-export quantize "
                        "--activations uint8, for ONNX Runtime on x86 CPUs); TensorRT's explicit quantisation needs "
                        f"symmetric int8: grad-export quantize {bundle_dir} --activations int8 ... first")
    optional = [n for n in (FP16_ONNX, INT8_ONNX) if n in bundle.files]
    bundle.verify([FP32_ONNX] + optional)
    for name in [FP32_ONNX] + optional:  # TensorRT's parser reads external data itself, symlinks followed
        check_external_data(bundle.file(name), bundle_dir)
    if not Path(parity_images).is_dir():
        raise DatasetError(f"--parity-images {parity_images}: folder not found (real images gate the engine)")
    return bundle


def _tensorrt_and_gpu(bundle: Bundle, trt: Any, gpu: dict[str, str] | None) -> tuple[Any, dict[str, str]]:
    """The tensorrt module (8.5 or newer) and the GPU's identity; without them a one-line error naming the ONNX
    files the bundle still offers ONNX Runtime."""
    try:
        trt = trt or import_tensorrt()
        check_tensorrt_version(trt)  # right after the import: an 8.4 build would be refused only once it is done
        return trt, gpu or gpu_identity()
    except TensorRTUnavailable as exc:
        # only what ONNX Runtime can run: not the engines, the refinement weights or the pixel prior
        onnx_files = ", ".join(sorted(n for n in bundle.files if n.endswith(".onnx")))
        raise TensorRTUnavailable(f"{exc}; no engine built. The bundle {bundle.directory} still holds {onnx_files} "
                                  f"for ONNX Runtime (grad-run --backend onnxruntime)") from exc


def build_bundle_engine(
    bundle_dir: str | Path,
    parity_images: str | Path,
    fp16: bool = True,
    max_batch: int = 8,
    opt_batch: int = 1,
    workspace_mib: int = 2048,
    timing_cache: str | None = None,
    gates: ParityGates = ParityGates(),
    trt: Any = None,
    gpu: dict[str, str] | None = None,
    engine_backend: Callable[[Path], Backend] = _default_engine_backend,
    int8: bool = False,
    profiles: int = 2,
) -> EngineStamp:
    """Build, parity-check, stamp and register an engine. TensorRT or GPU absence, or a TensorRT older than 8.5, is
    a one-line error naming the ONNX files the bundle still offers; an engine that misses the parity gate is not
    written and the numbers reported. The settings, the TensorRT version and the parity images (listed and
    decoded) are all checked before the build starts.

    ``int8`` builds from the bundle's QDQ model (explicit quantisation) and gates the engine with the INT8
    map/score errors against ONNX Runtime FP32."""
    bundle_dir = Path(bundle_dir)
    bundle = _checked_bundle(bundle_dir, int8, parity_images)
    # Everything that can be checked is checked before the build, which takes minutes on a Jetson.
    cfg = EngineBuildConfig(fp16=fp16, opt_batch=opt_batch, max_batch=max_batch, workspace_mib=workspace_mib,
                            timing_cache=timing_cache or str(bundle_file(bundle_dir, TIMING_CACHE)),
                            fp32_layer_name_patterns=FP32_NAME_PATTERNS,
                            fp32_layer_name_rule=keeps_fp32_name, int8=int8, profiles=profiles)
    cfg.validate()
    if timing_cache:  # the default lives in the bundle folder, whose writability the CLI has checked
        check_writable(timing_cache, "--timing-cache")
    trt, gpu = _tensorrt_and_gpu(bundle, trt, gpu)
    # after the TensorRT check (no TensorRT is the first thing to say) and before the build
    images = load_parity_images(bundle, parity_images)
    log.info("parity gate: %s, decoded before the build", images.description)
    inp = bundle.input
    fp16_onnx = bundle.file(FP16_ONNX) if FP16_ONNX in bundle.files else None
    int8_onnx = bundle.file(INT8_ONNX) if INT8_ONNX in bundle.files else None
    # Built into a scratch folder: a rebuild that fails parity never touches the engine already in the bundle.
    scratch = bundle_dir / ".engine-build-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        stamp = build_engine(bundle.file(FP32_ONNX), scratch, inp.name, (3, *inp.hw), cfg,
                             fp16_onnx_path=fp16_onnx, trt=trt, gpu=gpu, int8_onnx_path=int8_onnx)
        engine = engine_backend(scratch / stamp["file"])
        try:
            report = engine_parity(bundle, engine, images)
        finally:
            engine.close()
        if int8:
            failed = [f.replace("INT8", "INT8 engine") for f in check_int8_gates(report, gates, need_auroc=False)]
        else:
            failed = [f.replace("FP16", "engine") for f in check_gates({"max_abs_over_scale": 0.0}, report, gates)]
        if failed:
            raise ParityError(f"engine {stamp['file']} rejected (not written): " + "; ".join(failed))
        stamp["parity_vs_onnxruntime"] = report
        # the runtime refuses this engine once one of these files changes (grad-export quantize again, ...)
        stamp["built_from"] = {name: bundle.files[name].sha256
                               for name in [FP32_ONNX] + [n for n in (FP16_ONNX, INT8_ONNX) if n in bundle.files]}
        typed = EngineStamp.from_json(stamp)
        entry = FileEntry.of(scratch / typed.file)  # hashed before the move: the move and the save follow at once
        engine_path = bundle.file(typed.file)
        bundle.engines = [e for e in bundle.engines if e.file != typed.file] + [typed]
        bundle.files[typed.file] = entry
        os.replace(scratch / typed.file, engine_path)
        bundle.save()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:  # built here: this machine may load it (after the save: a trust-list problem never loses the build)
        trust(bundle.files[typed.file].sha256, engine_path, "engine")
    except TrustListError as exc:
        log.warning("engine %s built and recorded, but not trusted (%s): grad-run will not load it until "
                    "`grad-export trust %s` succeeds", typed.file, exc, bundle_dir)
    log.info("engine %s: map rel L2 %.2e vs ONNX Runtime", typed.file, report["map_rel_l2"])
    return typed
