"""One latency row, measured in a fresh process so its peak RSS is its own.

``grad-bench latency`` starts ``python -m gradad.benchmarks.latency_worker`` once per row, writes the row's
:class:`RowSpec` as JSON on its stdin and reads the measured row as the last line of its stdout.

Stages per image, as ``grad-run --serial`` counts them: ``decode`` (read + decode an image file), ``preprocess``
(resize to the model input and layout, in uint8 for schema-2 graphs; float32 for the ``input_dtype="float32"``
rows of today's float path; normalisation where the engine does not do it), ``inference`` (the engine call, GPU
synchronised), ``postprocess`` (outputs to host numpy + OK/NG decision); batch stages are divided by the batch
size. FPS = images / wall time of the measured iterations (stages run one after the other, as in ``grad-run``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from gradad.benchmarks.environment import peak_rss_mb
from gradad.data.images import read_image_rgb
from gradad.runtime.preprocess import to_model_input
from gradad.runtime.stats import LatencyStats

log = logging.getLogger(__name__)

#: Decision threshold of the postprocess stage (its value does not change the timing).
DUMMY_THRESHOLD = 1.0
#: The key of a worker's answer for a row it could not measure at any batch size (its value: the reason).
SKIPPED_KEY = "skipped"


@dataclass
class RowSpec:
    """Everything one worker needs to build and time one engine."""

    label: str
    method: str  # grad | patchcore
    preset: str
    backend: str  # pytorch | onnxruntime | tensorrt
    precision: str  # fp32 | fp16 (PyTorch fp16 = autocast on CUDA)
    device: str  # cpu | cuda
    image_size: int
    images: list[str]  # files decoded by the decode stage, cycled
    batches: list[int]
    threads: int
    warmup: int
    iters: int
    min_iters: int
    max_seconds: float  # per batch size: stop after this long once min_iters are done
    onnx_path: str | None = None  # onnxruntime rows of a preset
    bundle: str | None = None  # onnxruntime / tensorrt rows of a bundle
    bank_size: int = 0  # patchcore: memory-bank rows
    input_dtype: str = "uint8"  # frames the engine takes: uint8 (bundle schema 2) or float32 (today's float path)
    extra: dict[str, Any] = field(default_factory=dict)


Engine = tuple[Callable[[np.ndarray], Any], Callable[[Any], Any], Callable[[Any], tuple[np.ndarray, np.ndarray]]]


def _torch_engine(spec: RowSpec) -> Engine:
    """(preprocess, inference, postprocess) of a PyTorch eager row (GRAD or PatchCore), random weights."""
    import torch

    from gradad.benchmarks.models import random_detector
    from gradad.training.config import preset_config

    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    cfg = preset_config(spec.preset)
    if spec.method == "patchcore":  # extractor + memory bank + PatchCore's map head (as its accuracy rows use)
        from gradad.benchmarks.patchcore import PATCHCORE_HEAD, PatchCore, PatchCoreConfig
        from gradad.training.backbone import FeatureExtractor
        from gradad.training.model import AnomalyHead

        cfg.backbone.weights = "none"
        extractor = FeatureExtractor(cfg.backbone).to(device)
        patchcore = PatchCore(PatchCoreConfig(), AnomalyHead(PATCHCORE_HEAD, (spec.image_size, spec.image_size)))
        gen = torch.Generator().manual_seed(0)
        patchcore.bank = torch.randn(spec.bank_size, extractor.channels, generator=gen).to(device)
        forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = (
            lambda x: patchcore.predict(extractor(x)))
    else:
        detector = random_detector(cfg).to(device)
        extractor, forward = detector.extractor, detector
    mean = torch.tensor(extractor.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(extractor.std, device=device).view(1, 3, 1, 1) * 255.0
    autocast = spec.precision == "fp16" and device.type == "cuda"

    def preprocess(batch: np.ndarray) -> torch.Tensor:
        x = (torch.from_numpy(batch).to(device) - mean) / std
        if device.type == "cuda":  # its kernels finish here, or their time would count as inference
            torch.cuda.synchronize()
        return x

    @torch.inference_mode()
    def inference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            out = forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def postprocess(out: tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        return out[0].float().cpu().numpy(), out[1][:, 0].float().cpu().numpy()

    return preprocess, inference, postprocess


class NoBatchFits(Exception):
    """None of a row's batch sizes fits its engine: the row is a skip line (with this reason), not a failure."""


def fit_batches(spec: RowSpec, min_batch: int, max_batch: int, engine: str) -> None:
    """Keep the batch sizes of ``spec`` that the engine's optimisation profile accepts (``min_batch..max_batch``)
    and note the others in the row (``batches_skipped``, ``batches_note``): a TensorRT engine refuses any other
    batch, and one batch size it cannot take must not cost the row (or the whole run) its other numbers.

    Raises NoBatchFits when no batch size is left."""
    fits = [b for b in spec.batches if min_batch <= b <= max_batch]
    dropped = [b for b in spec.batches if b not in fits]
    if not dropped:
        return
    note = (f"batch size(s) {', '.join(map(str, dropped))} not measured: outside the batch range {min_batch}.."
            f"{max_batch} of {engine} (its optimisation profile); rebuild it with a larger `grad-export build "
            f"--max-batch` to measure them")
    if not fits:
        raise NoBatchFits(f"no requested batch size ({', '.join(map(str, spec.batches))}) fits: {note}")
    log.warning("%s: %s", spec.label, note)
    spec.batches = fits
    spec.extra.update(batches_skipped=dropped, batches_note=note)


def _runtime_engine(spec: RowSpec) -> Engine:
    """(preprocess, inference, postprocess) of an ONNX Runtime / TensorRT row: the lean runtime, no torch."""
    from gradad.benchmarks.environment import tensorrt_engine_record

    providers = None if spec.backend == "tensorrt" else ["cuda" if spec.device == "cuda" else "cpu"]
    if spec.bundle:
        from gradad.runtime.loader import load_backend

        # max_batch sizes ONNX Runtime's buffers; a TensorRT engine's batch range is fixed when it is built
        backend, bundle = load_backend(spec.bundle, spec.backend, spec.precision, providers, spec.threads,
                                       max(spec.batches))
        record = tensorrt_engine_record(backend, bundle)
        if record is not None:  # the engine file, TensorRT version and GPU it was built for: the row says so
            spec.extra["tensorrt_engine"] = record
            try:
                fit_batches(spec, record["min_batch"], record["max_batch"], f"TensorRT engine {record['file']}")
            except NoBatchFits:
                backend.close()
                raise
    else:
        from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(spec.onnx_path, providers, spec.threads, max(spec.batches))
    spec.extra["engine"] = backend.name
    return (lambda batch: batch), backend.infer, (lambda out: out)


def _decode_batch(paths: list[str], start: int, n: int) -> tuple[list[np.ndarray], list[float]]:
    images, times = [], []
    for i in range(start, start + n):
        t0 = time.perf_counter()
        images.append(read_image_rgb(paths[i % len(paths)]))
        times.append((time.perf_counter() - t0) * 1e3)
    return images, times


def time_batches(spec: RowSpec, engine: Engine) -> list[dict[str, Any]]:
    """Per batch size: stage percentiles per image, FPS and iteration count."""
    preprocess, inference, postprocess = engine
    size = spec.image_size
    results = []
    cursor = 0
    for batch in spec.batches:
        stats = None
        started = time.perf_counter()
        for it in range(spec.warmup + spec.iters):
            if it == spec.warmup:
                stats, started = LatencyStats(), time.perf_counter()
            images, decode_ms = _decode_batch(spec.images, cursor, batch)
            cursor += batch
            t0 = time.perf_counter()
            x = preprocess(to_model_input(images, size, size, np.dtype(spec.input_dtype)))
            t1 = time.perf_counter()
            out = inference(x)
            t2 = time.perf_counter()
            scores, _maps = postprocess(out)
            _decisions = scores > DUMMY_THRESHOLD
            t3 = time.perf_counter()
            if stats is not None:
                for ms in decode_ms:
                    stages = {"decode": ms, "preprocess": (t1 - t0) * 1e3 / batch,
                              "inference": (t2 - t1) * 1e3 / batch, "postprocess": (t3 - t2) * 1e3 / batch}
                    stats.add({**stages, "total": sum(stages.values())})
                measured = it - spec.warmup + 1
                if measured >= spec.min_iters and time.perf_counter() - started > spec.max_seconds:
                    break
        assert stats is not None, "iters must be >= 1"
        wall = time.perf_counter() - started
        summary = stats.summary()
        for stage, values in stats.all_samples.items():  # the minimum shrugs off other jobs on a shared CPU
            summary["latency_ms"][stage]["min"] = round(min(values), 3)
        results.append({"batch": batch, "iterations": summary["frames"] // batch, "images": summary["frames"],
                        "fps": round(summary["frames"] / wall, 2), "latency_ms": summary["latency_ms"]})
        log.info("%s batch %d: %.1f FPS, total p50 %.2f ms/img", spec.label, batch, results[-1]["fps"],
                 summary["latency_ms"]["total"]["p50"])
    return results


def measure(spec: RowSpec) -> dict[str, Any]:
    """Build the engine of ``spec``, time it at every batch size and report peak memory."""
    engine = _torch_engine(spec) if spec.backend == "pytorch" else _runtime_engine(spec)
    load_before = os.getloadavg()[0]
    by_batch = time_batches(spec, engine)
    load_after = os.getloadavg()[0]
    best = max(by_batch, key=lambda r: r["fps"])
    row = {k: v for k, v in asdict(spec).items() if k not in ("images", "onnx_path", "extra")}
    row.update(spec.extra)
    row.update({"by_batch": by_batch, "batch1": next((r for r in by_batch if r["batch"] == 1), None),
                "best_batch": best["batch"], "best_fps": best["fps"], "peak_rss_mb": peak_rss_mb(),
                "load_average_1min": [round(load_before, 2), round(load_after, 2)]})
    if spec.device == "cuda" and spec.backend == "pytorch":
        import torch

        row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def main() -> None:
    """Read a RowSpec (JSON) on stdin, print the measured row (JSON) as the last stdout line; a row that cannot be
    measured at any of its batch sizes prints ``{"skipped": reason}`` instead (exit 0: a skip, not a failure)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    spec = RowSpec(**json.loads(sys.stdin.read()))
    try:
        row = measure(spec)
    except NoBatchFits as exc:
        log.warning("%s skipped: %s", spec.label, exc)
        row = {SKIPPED_KEY: str(exc)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
