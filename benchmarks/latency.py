"""``grad-bench latency``: per-stage latency, FPS, peak memory and model size of every backend available here.

Rows: for each preset (random weights; latency does not depend on their values) PyTorch eager on CPU (and on CUDA
in FP32 and FP16 autocast where a GPU is visible), ONNX Runtime FP32 and FP16 of the graph ``grad-export onnx``
writes; for a bundle its ONNX Runtime FP32/FP16/INT8 files and its TensorRT engine where TensorRT is importable,
with ``--today`` also today's float path (the same graph taking float32 frames, preprocessed in float32) and, with
``--grad-run N``, ``grad-run --benchmark`` rows: today's serial loop on a schema-1 (float32 input) copy of the bundle
against the pipelined loop per precision, each with the ratios new/today in ``comparisons``; plus
a PatchCore row (same extractor, nearest-neighbour search over a memory bank of ``bank_size`` random features,
GRAD's map head). Every row runs in its own process (fresh peak RSS) with the same threads and iteration budget.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradad.benchmarks.accuracy import (BACKEND_ORT_FP16, BACKEND_ORT_FP32, BACKEND_ORT_INT8, BACKEND_PYTORCH,
                                        BACKEND_TENSORRT, BACKENDS, BUNDLE_BACKENDS)
from gradad.benchmarks.environment import engine_note, environment
from gradad.benchmarks.latency_worker import SKIPPED_KEY, RowSpec
from gradad.errors import GradError

log = logging.getLogger(__name__)

#: PatchCore memory bank: the size the 1% coreset gives on MTD (760 train images x 32x32 patches x 1%).
MTD_CORESET_BANK = 7782
WORKER_MODULE = "gradad.benchmarks.latency_worker"
SYNTHETIC_IMAGES = 8
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
#: ``status`` of a ``skipped`` entry whose row was attempted and failed (a plain skip line has none)
STATUS_FAILED = "failed"


@dataclass
class LatencyConfig:
    """What ``grad-bench latency`` measures, and how long."""

    presets: list[str] = field(default_factory=list)  # random-weight presets
    bundle: str | None = None
    backends: tuple[str, ...] = BACKENDS
    patchcore: bool = True
    bank_size: int = MTD_CORESET_BANK
    images: str | None = None  # folder decoded by the decode stage (default: synthetic PNGs)
    batches: tuple[int, ...] = (1, 2, 4, 8)
    threads: int = 2
    warmup: int = 5
    iters: int = 100
    min_iters: int = 5
    max_seconds: float = 20.0
    timeout_s: float = 1800.0  # per row (worker process)
    today: bool = False  # bundle: add today's float path (float32 input graph + float32 preprocessing)
    grad_run_frames: int = 0  # bundle: grad-run --benchmark rows (today serial vs pipelined) of this many frames
    pace_fps: float = 0.0  # grad-run rows: batch-1 end-to-end latency with frames at this rate (0: half its FPS)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def validate(self) -> None:
        """Refuse settings that cannot give a measurement, naming the option at fault."""
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise GradError(f"--backend {unknown[0]!r}: choose from {', '.join(BACKENDS)}")
        if not self.presets and not self.bundle:
            raise GradError("nothing to measure: give --preset NAME (repeatable) and/or --bundle DIR")
        if (self.today or self.grad_run_frames) and not self.bundle:
            raise GradError("--today and --grad-run compare a bundle's paths: give --bundle DIR")
        for name, value in (("--threads", self.threads), ("--iters", self.iters), ("--min-iters", self.min_iters)):
            if value < 1:
                raise GradError(f"{name} {value}: must be at least 1")
        if self.warmup < 0:
            raise GradError(f"--warmup {self.warmup}: must be >= 0")
        if not self.batches or min(self.batches) < 1:
            raise GradError(f"--batches {','.join(map(str, self.batches))}: give positive batch sizes")
        if self.patchcore and self.bank_size < 1:
            raise GradError(f"--patchcore-bank {self.bank_size}: must be at least 1")


def decode_images(cfg: LatencyConfig, work: Path, size: int) -> tuple[list[str], str]:
    """Files for the decode stage and a description: the --images folder, or synthetic PNGs of the input size."""
    import cv2

    if cfg.images:
        from gradad.data.datasets import list_image_files

        files = [str(p) for p in list_image_files(cfg.images)]
        return files, f"{len(files)} image files from {cfg.images}"
    rng = np.random.default_rng(0)
    files = []
    folder = work / f"decode_{size}"  # a folder of its own: grad-run rows read it as --source
    folder.mkdir(exist_ok=True)
    for i in range(SYNTHETIC_IMAGES):  # smooth texture + noise: PNG decode cost of a real-looking image
        img = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (0, 0), 3)
        img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"synthetic_{size}_{i}.png"
        cv2.imwrite(str(path), img)
        files.append(str(path))
    return files, f"{SYNTHETIC_IMAGES} synthetic {size}x{size} PNG files"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _spec(cfg: LatencyConfig, images: list[str], **kw: Any) -> RowSpec:
    return RowSpec(images=images, batches=list(cfg.batches), threads=cfg.threads, warmup=cfg.warmup,
                   iters=cfg.iters, min_iters=cfg.min_iters, max_seconds=cfg.max_seconds, **kw)


def preset_specs(cfg: LatencyConfig, preset: str, work: Path, images: list[str]) -> list[RowSpec]:
    """PyTorch eager (CPU, CUDA FP32/FP16) and ONNX Runtime FP32/FP16 rows of one random-weight preset."""
    from gradad.benchmarks.models import export_preset_onnx
    from gradad.training.config import preset_config

    size = preset_config(preset).data.image_size
    specs = []
    common = {"method": "grad", "preset": preset, "image_size": size}
    log.info("GRAD %s preset rows: random weights (latency does not depend on their values)", preset)
    if BACKEND_PYTORCH in cfg.backends:
        specs.append(_spec(cfg, images, label=f"GRAD {preset} · PyTorch eager CPU FP32", backend="pytorch",
                           precision="fp32", device="cpu", **common))
        if _cuda_available():
            for precision, what in (("fp32", "FP32"), ("fp16", "FP16 autocast")):
                specs.append(_spec(cfg, images, label=f"GRAD {preset} · PyTorch eager CUDA {what}",
                                   backend="pytorch", precision=precision, device="cuda", **common))
    wanted = [b for b in (BACKEND_ORT_FP32, BACKEND_ORT_FP16) if b in cfg.backends]
    if wanted:
        log.info("exporting %s to ONNX", preset)
        paths = export_preset_onnx(preset, work, fp16=BACKEND_ORT_FP16 in wanted)
        for name in wanted:
            precision = BUNDLE_BACKENDS[name][1]
            specs.append(_spec(cfg, images, label=f"GRAD {preset} · ONNX Runtime CPU {precision.upper()}",
                               backend="onnxruntime", precision=precision, device="cpu",
                               onnx_path=str(paths[precision]), **common))
    if BACKEND_TENSORRT in cfg.backends:
        _skip(cfg, f"GRAD {preset} · TensorRT", "TensorRT rows need a bundle with an engine built on this device "
              "(grad-export build, then --bundle)")
    return specs


def patchcore_specs(cfg: LatencyConfig, work: Path, images: list[str]) -> list[RowSpec]:
    """PatchCore on the edge extractor: PyTorch eager always, and ONNX Runtime FP32 when GRAD gets an ONNX Runtime
    FP32 row, so the two methods are compared on one engine."""
    from gradad.benchmarks.models import export_patchcore_onnx
    from gradad.training.config import preset_config

    size = preset_config("edge").data.image_size
    common = {"method": "patchcore", "preset": "edge", "precision": "fp32", "device": "cpu", "image_size": size,
              "bank_size": cfg.bank_size}
    specs = [_spec(cfg, images, label="PatchCore · PyTorch eager CPU FP32 (same extractor)", backend="pytorch",
                   **common)]
    if BACKEND_ORT_FP32 in cfg.backends:
        log.info("exporting PatchCore (random weights and bank) to ONNX")
        specs.append(_spec(cfg, images, label="PatchCore · ONNX Runtime CPU FP32 (same extractor)",
                           backend="onnxruntime", onnx_path=str(export_patchcore_onnx(cfg.bank_size, size, work)),
                           **common))
    return specs


def bundle_specs(cfg: LatencyConfig, images: list[str], work: Path) -> list[RowSpec]:
    """ONNX Runtime FP32/FP16 and TensorRT rows of a bundle; what cannot run here becomes a skip line."""
    from gradad.bundle import Bundle

    bundle = Bundle.load(cfg.bundle)
    preset = bundle.preset
    size = int(bundle.input.height)
    specs = []
    for name in (b for b in cfg.backends if b in BUNDLE_BACKENDS):
        backend, precision = BUNDLE_BACKENDS[name]
        label = f"GRAD {preset} bundle {bundle.name} · {name}"
        if backend == "tensorrt":
            if importlib.util.find_spec("tensorrt") is None:
                _skip(cfg, label, "TensorRT is not importable here (no tensorrt Python package)")
                continue
            device = "cuda"
        else:
            device = "cpu"
            if ONNX_FILES[precision] not in bundle.files:
                how = "grad-export quantize" if precision == "int8" else "grad-export onnx without --no-fp16"
                _skip(cfg, label, f"bundle {cfg.bundle} has no {ONNX_FILES[precision]} ({how})")
                continue
        engine = "TensorRT" if backend == "tensorrt" else "ONNX Runtime CPU"
        specs.append(_spec(cfg, images, label=f"GRAD {preset} bundle · {engine} {precision.upper()}", method="grad",
                           preset=preset, backend=backend, precision=precision, device=device, image_size=size,
                           bundle=str(cfg.bundle)))
    if BACKEND_PYTORCH in cfg.backends and not cfg.presets:
        _skip(cfg, f"GRAD {preset} · PyTorch eager", f"add --preset {preset} for the PyTorch eager row")
    if cfg.today:
        specs.insert(0, _spec(cfg, images, label=f"GRAD {preset} bundle · today: float32 input, ONNX Runtime CPU FP32",
                              method="grad", preset=preset, backend="onnxruntime", precision="fp32", device="cpu",
                              image_size=size, onnx_path=str(_float_variant(cfg.bundle, work)),
                              input_dtype="float32", extra={"path": "today"}))
    return specs


def _float_variant(bundle: str, work: Path) -> Path:
    """Today's float path: the bundle's FP32 graph taking float32 frames (no bundle needed around it)."""
    import onnx

    from gradad.export.variants import float_input_variant

    path = work / "today_float_input.onnx"
    if not path.exists():
        onnx.save(float_input_variant(onnx.load(Path(bundle) / "model.onnx")), path)
    return path


def _skip(cfg: LatencyConfig, label: str, reason: str) -> None:
    log.warning("skipped %s: %s", label, reason)
    cfg.skipped.append({"label": label, "reason": reason})


def _fail(cfg: LatencyConfig, label: str, error: str) -> None:
    """Record a row whose measurement failed: beside the skip lines (every reader of ``skipped`` shows it), marked
    ``status: failed`` so the command can end non-zero once the rows that did finish are written."""
    log.error("latency row %s failed: %s", label, error)
    cfg.skipped.append({"label": label, "reason": error, "status": STATUS_FAILED})


def failed_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """The ``skipped`` entries of a latency result that are failures, not rows that cannot run here."""
    return [s for s in result.get("skipped", []) if s.get("status") == STATUS_FAILED]


def run_worker(spec: RowSpec, threads: int, timeout_s: float) -> dict[str, Any]:
    """Measure one row in a fresh Python process with the thread count fixed in its environment."""
    env = {**os.environ, **{k: str(threads) for k in THREAD_ENV}}
    try:
        proc = subprocess.run([sys.executable, "-m", WORKER_MODULE], input=json.dumps(asdict(spec)), text=True,
                              capture_output=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise GradError(f"latency row {spec.label!r} ran past {timeout_s:.0f} s; lower --iters/--max-seconds") from exc
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GradError(f"latency row {spec.label!r} failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _complexity(preset: str, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """GFLOP and parameters of ``preset``, counted on a random-weight copy: the count does not depend on the
    weights, so the backbone's "random weights" warning would be false for the row it is counted for (a bundle
    carries its trained weights; a preset row says so where it is built)."""
    from gradad.benchmarks.complexity import preset_complexity
    from gradad.training.config import preset_config

    if preset not in cache:
        backbone_log = logging.getLogger("gradad.training.backbone")
        level = backbone_log.level
        backbone_log.setLevel(logging.ERROR)
        try:
            cache[preset] = preset_complexity(preset_config(preset))
        finally:
            backbone_log.setLevel(level)
    return cache[preset]


def patchcore_complexity(extractor: dict[str, Any], bank_size: int) -> dict[str, Any]:
    """PatchCore cost: extractor + 2·bank·C multiply-adds per feature position (the nearest-neighbour search)."""
    c, h, w = extractor["feature_shape"]
    search = 2 * bank_size * c * h * w
    return {"gflop_total": round(extractor["gflop_extractor"] + search / 1e9, 3),
            "gflop_extractor": extractor["gflop_extractor"], "gflop_search": round(search / 1e9, 3),
            "params_m": round(extractor["params_extractor_m"], 3),
            "memory_bank_m": round(bank_size * c / 1e6, 3), "memory_bank_shape": [bank_size, c]}


def run_latency(cfg: LatencyConfig) -> dict[str, Any]:
    """Measure every row; returns the result dict (without header fields)."""
    cfg.validate()
    rows: list[dict[str, Any]] = []
    sizes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="grad-bench-") as tmp:
        work = Path(tmp)
        specs: list[RowSpec] = []
        image_sets: dict[int, tuple[list[str], str]] = {}

        def images_for(size: int) -> list[str]:
            if size not in image_sets:
                image_sets[size] = decode_images(cfg, work, size)
            return image_sets[size][0]

        from gradad.training.config import preset_config

        for preset in cfg.presets:
            specs += preset_specs(cfg, preset, work, images_for(preset_config(preset).data.image_size))
        if cfg.bundle:
            from gradad.bundle import Bundle

            specs += bundle_specs(cfg, images_for(int(Bundle.load(cfg.bundle).input.height)), work)
        if cfg.patchcore:
            specs += patchcore_specs(cfg, work, images_for(preset_config("edge").data.image_size))
        from tqdm import tqdm

        for spec in tqdm(specs, desc="latency rows", unit="row"):
            log.info("measuring %s", spec.label)
            try:
                row = run_worker(spec, cfg.threads, cfg.timeout_s)
            except GradError as exc:  # the rows measured so far (and the ones after) still reach the files
                _fail(cfg, spec.label, str(exc))
                continue
            if SKIPPED_KEY in row:  # the worker found nothing it could measure (no batch size fits the engine)
                _skip(cfg, spec.label, row[SKIPPED_KEY])
                continue
            if row.get("batches_note"):
                log.warning("%s: %s", spec.label, row["batches_note"])
            model = _complexity(spec.preset, sizes)
            if spec.method == "patchcore":
                row["complexity"] = patchcore_complexity(model, spec.bank_size)
            else:
                row["complexity"] = {"gflop_total": model["gflop_total"], "gflop_extractor": model["gflop_extractor"],
                                     "gflop_grad": model["gflop_grad"],
                                     "params_m": round(model["params_extractor_m"] + model["params_grad_m"], 3),
                                     # a bundle row's model may differ from today's preset defaults
                                     "source": f"the {spec.preset} preset's defaults in this code version"}
            rows.append(row)
        if cfg.grad_run_frames:
            from gradad.benchmarks.latency_runtime import grad_run_rows

            size = int(Bundle.load(cfg.bundle).input.height)
            try:
                run_rows = grad_run_rows(cfg, str(Path(images_for(size)[0]).parent), work)
            except GradError as exc:
                _fail(cfg, f"GRAD {Bundle.load(cfg.bundle).preset} · grad-run rows", str(exc))
                run_rows = []
            for row in run_rows:
                row["complexity"] = rows[-1]["complexity"] if rows else {}
                rows.append(row)
        decode = {size: desc for size, (_, desc) in image_sets.items()}
    return {"environment": environment(), "device": "cuda" if any(r["device"] == "cuda" for r in rows) else "cpu",
            "threads": cfg.threads, "settings": {k: v for k, v in asdict(cfg).items() if k != "skipped"},
            "decode_images": decode, "patchcore_bank": {"rows": cfg.bank_size, "note":
                                                        "random features; rows = the 1% coreset size on MTD "
                                                        "(760 x 32 x 32 x 1%) unless --patchcore-bank says otherwise"},
            "rows": rows, "skipped": list(cfg.skipped), "comparisons": comparisons(rows)}


def _e2e_b1(row: dict[str, Any]) -> float | None:
    """End-to-end p50 at batch 1: a paced pipelined run's measured capture -> record time, else the sum of the
    stages (a serial loop at batch 1, or a worker row: stages one after another)."""
    paced = row.get("batch1_paced")
    if paced:
        return paced["latency_ms"]["end_to_end"]["p50"]
    b1 = row.get("batch1")
    return b1["latency_ms"]["total"]["p50"] if b1 else None


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New path / today's path, measured in the same run: batch-1 end-to-end p50 and best-batch FPS.

    Pairs: worker rows against the ``today`` worker row; pipelined grad-run rows against the serial one."""
    out = []
    for kind in ("worker", "grad-run"):
        group = [r for r in rows if (r.get("backend") == "grad-run") == (kind == "grad-run")
                 and r.get("method") == "grad" and (r.get("bundle") or r.get("path") == "today")
                 and r.get("device") == "cpu"]
        today = next((r for r in group if r.get("path") == "today"), None)
        if today is None:
            continue
        for row in (r for r in group if r is not today):
            e_new, e_old = _e2e_b1(row), _e2e_b1(today)
            out.append({"kind": kind, "today": today["label"], "new": row["label"],
                        "e2e_p50_b1_ms": [e_old, e_new], "e2e_speedup": round(e_old / e_new, 2) if e_new else None,
                        "best_fps": [today["best_fps"], row["best_fps"]], "best_batch": [today["best_batch"],
                                                                                         row["best_batch"]],
                        "fps_ratio": round(row["best_fps"] / today["best_fps"], 2) if today["best_fps"] else None,
                        "load_average_1min": row.get("load_average_1min")})
    return out


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: today's path vs the new one, ratios measured in the same run (empty without a today row)."""
    comps = comparisons(rows)
    if not comps:
        return ""
    lines = ["| today | new | e2e p50 b1 ms (today → new) | speed-up | best FPS (batch) today → new | FPS ratio "
             "| load avg |", "|---|---|---:|---:|---:|---:|---:|"]
    for c in comps:
        (e0, e1), (f0, f1), (b0, b1) = c["e2e_p50_b1_ms"], c["best_fps"], c["best_batch"]
        lines.append(f"| {c['today']} | {c['new']} | {e0:.2f} → {e1:.2f} | {c['e2e_speedup']}× | {f0:.1f} ({b0}) → "
                     f"{f1:.1f} ({b1}) | {c['fps_ratio']}× | {c['load_average_1min']} |")
    return "\n".join(["", "Today's path vs the new one (same run; e2e p50 b1: capture -> record at batch 1, a paced run "
                      "for the pipelined loop, the sum of the stages otherwise):", "", *lines]) + "\n"


def _ms(stats: dict[str, Any] | None, stage: str, key: str = "p50") -> str:
    if not stats or key not in stats["latency_ms"].get(stage, {}):
        return "–"
    return f"{stats['latency_ms'][stage][key]:.2f}"


def latency_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per row, batch-1 stage p50s, total p50/p95/p99, FPS at batch 1 and best, RSS, GFLOP."""
    header = ["row", "decode", "preprocess", "inference", "postprocess", "total p50", "p95", "p99", "min",
              "FPS b1", "best FPS (batch)", "peak RSS MiB", "GFLOP", "params M"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        b1 = r.get("batch1")
        cx = r.get("complexity", {})
        cells = [r["label"], *(_ms(b1, s) for s in ("decode", "preprocess", "inference", "postprocess", "total")),
                 _ms(b1, "total", "p95"), _ms(b1, "total", "p99"), _ms(b1, "total", "min"),
                 f"{b1['fps']:.1f}" if b1 else "–",
                 f"{r['best_fps']:.1f} ({r['best_batch']})", f"{r['peak_rss_mb']:.0f}",
                 f"{cx.get('gflop_total', float('nan')):.2f}", f"{cx.get('params_m', float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + comparison_table(rows)


def latency_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one latency result."""
    env = result["environment"]
    parts = [f"# {result.get('name', 'latency')}", "", f"`{result.get('command', '')}`", "",
             f"{env['cpu_model']} ({env['cpu_count']} cores), GPU: {env['gpu'] or 'none'}; {result['threads']} "
             f"threads; torch {env['torch']}, onnxruntime {env['onnxruntime']}. Stages in ms per image (p50, batch 1).",
             "", latency_table(result["rows"])]
    parts += [f"- {note}." for note in row_notes(result["rows"])]
    parts += [f"- {s.get('status', 'skipped')} {s['label']}: {s['reason']}" for s in result.get("skipped", [])]
    return "\n".join(parts)


def row_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What a row's table line does not say: the TensorRT engine it ran, the batch sizes it could not run."""
    notes = []
    for row in rows:
        note = engine_note(row)
        if note:
            notes.append(note)
        if row.get("batches_note"):
            notes.append(f"{row['label']}: {row['batches_note']}")
    return notes
