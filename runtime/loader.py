"""Open a model bundle with the best available backend, refusing bundles that do not verify."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from gradad.bundle import ONNX_BY_PRECISION, BackendKind, Bundle, BundleError, Precision
from gradad.engine_trust import TrustListError
from gradad.errors import GradError
from gradad.runtime.backend import Backend, BackendError, UntrustedEngineError
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend

log = logging.getLogger(__name__)

BACKENDS = tuple(b.value for b in BackendKind)
PRECISIONS = tuple(p.value for p in Precision)
ORT_TYPE_BY_DTYPE = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


def _io_problem(backend: OnnxRuntimeBackend, bundle: Bundle) -> str | None:
    """What in the graph's inputs/outputs differs from the bundle contract (DESIGN.md section 5), or None."""
    inp = bundle.input
    inputs, outputs = backend.session.get_inputs(), backend.session.get_outputs()
    want_shape = ["N", 3, inp.height, inp.width]
    dtype = bundle.input_dtype
    if len(inputs) != 1 or inputs[0].name != inp.name or inputs[0].type != ORT_TYPE_BY_DTYPE[dtype]:
        got = ", ".join(f"{i.name} {i.type}" for i in inputs)
        return f"inputs are [{got}], the bundle says one {dtype} input {inp.name!r}"
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != want_shape[1:]:
        return f"input {inp.name!r} has shape {shape}, the bundle says {want_shape}"
    got_out = [(o.name, len(o.shape)) for o in outputs]
    if got_out[:2] != [("score", 1), ("anomaly_map", 4)]:
        return f"outputs are {[f'{n} (rank {r})' for n, r in got_out]}, the bundle needs score (N) and anomaly_map " \
               f"(N, 1, H, W)"
    return None


def check_io(backend: OnnxRuntimeBackend, bundle: Bundle) -> None:
    """Refuse a graph whose inputs/outputs are not the bundle's (e.g. another valid ONNX with its hash updated)."""
    problem = _io_problem(backend, bundle)
    if problem:
        backend.close()
        raise BackendError(f"{backend.path} is not a gradad model for this bundle: {problem}; re-export the bundle "
                           f"with grad-export onnx")


def _onnx_backend(bundle: Bundle, precision: str, providers: Sequence[str] | None,
                  threads: int, max_batch: int, spin: bool = True) -> OnnxRuntimeBackend:
    bundle_dir = bundle.directory
    name = ONNX_BY_PRECISION[precision]
    if name not in bundle.files:
        how = (f"quantise it with grad-export quantize {bundle_dir} --calib GOOD_DIR" if precision == "int8" else
               "re-export it without --no-fp16")
        raise BackendError(f"bundle {bundle_dir} has no {name}; {how} or use --precision fp32")
    bundle.verify([name])
    backend = OnnxRuntimeBackend(bundle.file(name), providers, threads, max_batch, spin)
    check_io(backend, bundle)
    return backend


def _log_tensorrt_fallback(bundle: Bundle, precision: str, exc: GradError) -> None:
    """``--backend auto`` runs ONNX Runtime instead of TensorRT: say why, loud enough.

    A bundle problem (an engine whose hash does not match, one from elsewhere) and an engine of this precision
    that cannot run here (stamped for another TensorRT after a JetPack update, another GPU, TensorRT or cuda-python
    missing) are WARNINGs: the line silently runs on ONNX Runtime, often the CPU, at a fraction of the speed it was
    set up for. A bundle without such an engine (a CPU box's bundle) is normal: DEBUG (the backend's own INFO line
    says what runs; a paragraph about TensorRT on every CPU run read like a problem).
    """
    from gradad.runtime.tensorrt_device import rebuild_command

    bundle_problem = isinstance(exc, (BundleError, UntrustedEngineError, TrustListError))
    if not (bundle_problem or bundle.engines_for(precision)):
        log.debug("TensorRT backend not used (%s); using ONNX Runtime", exc)
        return
    how = ""
    if "grad-export" not in str(exc):  # stamp, parity and trust refusals already name their fix
        how = (f"; fix that (should the engine still not load, rebuild it on this device with "
               f"`{rebuild_command(str(bundle.directory), precision)}`)")
    log.warning("TensorRT backend not used: the bundle's %s engine cannot run here (%s)%s; running on ONNX Runtime "
                "instead", precision, exc, how)


def calibration_backend_warning(calibrated_on: str, engine_name: str, bundle: Bundle) -> str | None:
    """The warning for thresholds calibrated on ``calibrated_on`` (``bundle.calibration.backend``) used with the
    backend named ``engine_name``, or None when they are the same.

    Names are ``onnxruntime:<provider>:<file>`` and ``tensorrt:<precision>:<engine file>``. grad-calibrate before
    the TensorRT name said which engine recorded plain ``tensorrt``: that matches any TensorRT run while the bundle
    has engines of one precision only (the calibration ran on that precision), else the precision is unknown.
    """
    if calibrated_on == engine_name:
        return None
    advice = "re-run grad-calibrate with --backend/--precision of the line"
    if calibrated_on == BackendKind.TENSORRT.value and engine_name.startswith(f"{BackendKind.TENSORRT.value}:"):
        if len({e.precision for e in bundle.engines}) <= 1:
            return None
        return (f"thresholds were calibrated on a TensorRT engine of unrecorded precision (an older grad-calibrate) "
                f"and this run uses {engine_name}: scores shift between precisions (INT8 most); {advice}")
    return f"thresholds were calibrated on {calibrated_on} but this run uses {engine_name}: scores may shift " \
           f"slightly; {advice}"


def load_backend(
    bundle_dir: str | Path,
    backend: str = "auto",
    precision: str | None = None,
    providers: Sequence[str] | None = None,
    threads: int = 0,
    max_batch: int = 32,
    in_flight: int = 1,
    spin: bool = True,
) -> tuple[Backend, Bundle]:
    """(backend, bundle) for a bundle folder.

    ``auto`` uses a TensorRT engine when the bundle has one for this device and TensorRT is installed, else ONNX
    Runtime (TensorRT/CUDA/CPU providers by availability). ``precision`` defaults to fp16 for TensorRT and fp32
    for ONNX Runtime (FP16 is slower than FP32 on most CPUs); ``in_flight`` is the number of batches a TensorRT
    backend can have queued (one CUDA stream and context each); ``spin`` lets idle ONNX Runtime threads spin-wait
    (off for the pipelined loop); ``int8`` runs the QDQ model (``grad-export
    quantize``) on ONNX Runtime or its INT8 engine on TensorRT.
    """
    if backend not in BACKENDS:
        raise GradError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise GradError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    if not bundle.is_current:
        log.warning("bundle %s has schema version %s (float32 input): frames are converted to float32 on the host; "
                    "re-export it (grad-export onnx CHECKPOINT -o %s --overwrite) for uint8 input in the graph",
                    bundle_dir, bundle.schema_version, bundle_dir)
    if backend in ("auto", "tensorrt"):
        try:
            from gradad.runtime.tensorrt_backend import load_tensorrt_backend

            trt_backend = load_tensorrt_backend(bundle, precision or "fp16", in_flight=in_flight)
            return trt_backend, bundle
        except GradError as exc:
            if backend == "tensorrt":
                raise
            _log_tensorrt_fallback(bundle, precision or "fp16", exc)
    ort_backend = _onnx_backend(bundle, precision or "fp32", providers, threads, max_batch, spin)
    log.info("backend %s on %s", ort_backend.name, ort_backend.path.name)
    return ort_backend, bundle
