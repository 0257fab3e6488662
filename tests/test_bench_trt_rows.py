"""grad-bench rows of a TensorRT engine, and grad-bench gpu results on the results page.

GLUE tests against a FAKE `tensorrt` and a FAKE cuda-python `cudart` (`tests/fakes/tensorrt.py`): no TensorRT or
GPU is needed. The tiny demo bundle gets a stand-in engine file (stamped for "NVIDIA Orin", compute capability
8.7, TensorRT 10.3.0, batch 1..4) whose fake execution context computes score = mean(image), map = channel 0 / 255.
`grad-bench latency` measures every row in a worker process, so the fakes are also written as importable
`tensorrt` / `cuda.bindings.runtime` shims and put on the workers' PYTHONPATH; in this process they replace the
modules the runtime imports. Torch is made to see no GPU (a Jetson with a CPU-only torch wheel).

Checked: a TensorRT row measures the batch sizes its engine takes and notes the others instead of aborting the
run; a failing row leaves the finished ones in the result files; TensorRT rows name their engine (file, TensorRT
version, GPU, compute capability, precision, profile) and the environment names the GPU cuda-python sees;
`grad-bench report` renders `grad-bench gpu` results and still reproduces the committed results page.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from fakes.tensorrt import ENGINE_BYTES, TRT_VERSION
from gradad.benchmarks.cli import main
from gradad.bundle import Bundle, EngineStamp
from gradad.engine_trust import trust

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENGINE = "model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan"
ENGINE_MAX_BATCH = 4  # the stand-in engine's optimisation profile: batch 1..4
GPU = {"name": "NVIDIA Orin", "compute_capability": "8.7"}

#: The fakes as modules a fresh Python process imports: ``tensorrt`` and ``cuda.bindings.runtime`` share one
#: FakeCudart (the engine reads the "device" memory the backend copies into).
SHIM = '''"""Fake tensorrt + cuda-python for grad-bench worker processes (tests/test_bench_trt_rows.py)."""
import importlib.machinery
import sys
import types

sys.path.insert(0, {tests!r})
from fakes.tensorrt import FakeCudart, FakeDataType, FakeTensorSpec, cudaError_t, make_fake_trt

HW, MAX_BATCH = {hw}, {max_batch}
cudart = FakeCudart()


def cudaGetDeviceProperties(index):  # noqa: N802 - the real name
    return cudaError_t.cudaSuccess, types.SimpleNamespace(name={gpu!r}.encode() + b"\\0", major={major},
                                                          minor={minor})


cudart.cudaGetDeviceProperties = cudaGetDeviceProperties
trt = make_fake_trt(cudart, specs=[
    FakeTensorSpec("image", True, FakeDataType.UINT8, (-1, 3, HW, HW),
                   profile=[(1, 3, HW, HW), (1, 3, HW, HW), (MAX_BATCH, 3, HW, HW)]),
    FakeTensorSpec("score", False, FakeDataType.FLOAT, (-1,)),
    FakeTensorSpec("anomaly_map", False, FakeDataType.FLOAT, (-1, 1, HW, HW)),
])
trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec("tensorrt") reads it
'''


def _write_shims(folder: Path, hw: int) -> Path:
    """``folder`` with ``tensorrt.py`` and ``cuda/bindings/runtime.py`` that hand out the fakes; returns the
    shared module's path."""
    major, minor = GPU["compute_capability"].split(".")
    state = folder / "_bench_fake_trt.py"
    state.write_text(SHIM.format(tests=str(TESTS), hw=hw, max_batch=ENGINE_MAX_BATCH, gpu=GPU["name"],
                                 major=major, minor=minor))
    (folder / "tensorrt.py").write_text("import sys\nimport _bench_fake_trt\n"
                                        "sys.modules['tensorrt'] = _bench_fake_trt.trt\n")
    bindings = folder / "cuda" / "bindings"
    bindings.mkdir(parents=True)
    (folder / "cuda" / "__init__.py").write_text("")
    (bindings / "__init__.py").write_text("")
    (bindings / "runtime.py").write_text("import sys\nimport _bench_fake_trt\n"
                                         "sys.modules[__name__] = _bench_fake_trt.cudart\n")
    return state


@pytest.fixture(scope="module")
def fake_trt(trt_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.ModuleType]:
    """The fake TensorRT here and in worker processes; torch sees no GPU (environment falls back to cuda-python)."""
    import gradad.benchmarks.environment as environment
    import gradad.runtime.tensorrt_backend as tensorrt_backend
    import gradad.runtime.tensorrt_device as tensorrt_device

    shims = tmp_path_factory.mktemp("fake_trt_shims")
    hw = int(Bundle.load(trt_bundle).input.height)  # the engine takes the bundle's input size
    spec = importlib.util.spec_from_file_location("_bench_fake_trt_here", _write_shims(shims, hw))
    assert spec is not None and spec.loader is not None
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", fake.trt)
        mp.setattr(tensorrt_device, "import_cudart", lambda: fake.cudart)
        mp.setattr(tensorrt_backend, "import_cudart", lambda: fake.cudart)
        # a Jetson's CPU-only torch: no GPU from torch (raising=False: the check also runs on code without it)
        mp.setattr(environment, "torch_gpu", lambda: None, raising=False)
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(shims), os.environ.get("PYTHONPATH")) if p))
        yield fake


@pytest.fixture(scope="module")
def trt_bundle(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle with a trusted stand-in FP16 engine of batch 1..4."""
    copy = tmp_path_factory.mktemp("trt_bundle") / "tiny"
    shutil.copytree(bundle, copy)
    (copy / ENGINE).write_bytes(ENGINE_BYTES)
    b = Bundle.load(copy)
    hw = int(b.input.height)
    b.engines.append(EngineStamp(ENGINE, TRT_VERSION, GPU["name"], GPU["compute_capability"], "fp16",
                                 profile={"min": [1, 3, hw, hw], "opt": [1, 3, hw, hw],
                                          "max": [ENGINE_MAX_BATCH, 3, hw, hw]}, profiles=1, build_mode="fp16-flag"))
    b.add_file(ENGINE)
    b.save()
    trust(b.files[ENGINE].sha256, copy / ENGINE, "engine")  # the test session's own trust list (conftest)
    return copy


@pytest.fixture(scope="module")
def latency_trt(fake_trt: types.ModuleType, trt_bundle: Path, tiny_demo_root: Path,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """grad-bench latency with ONNX Runtime and TensorRT rows at batch sizes 1, 2 and 8 (the engine takes 1..4)."""
    out = tmp_path_factory.mktemp("bench_lat_trt")
    result = CliRunner().invoke(main, [
        "latency", "--bundle", str(trt_bundle), "--backend", "onnxruntime-fp32", "--backend", "tensorrt",
        "--no-patchcore", "--images", str(tiny_demo_root / "nut" / "test" / "good"), "--batches", "1,2,8",
        "--iters", "2", "--min-iters", "1", "--warmup", "0", "--threads", "1", "-o", str(out), "--name", "lat"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "lat.json").read_text()), out


def _rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["backend"]: r for r in data["rows"]}


# --- 1. batch sizes above the engine's max batch ----------------------------------------------------------------


def test_tensorrt_row_measures_the_batches_its_engine_takes(latency_trt: tuple[dict[str, Any], Path]) -> None:
    data, out = latency_trt
    rows = _rows(data)
    assert [b["batch"] for b in rows["onnxruntime"]["by_batch"]] == [1, 2, 8]  # ONNX Runtime takes any batch
    trt_row = rows["tensorrt"]
    assert [b["batch"] for b in trt_row["by_batch"]] == [1, 2] and trt_row["batches_skipped"] == [8]
    assert "1..4" in trt_row["batches_note"] and "--max-batch" in trt_row["batches_note"]
    assert data["skipped"] == []  # nothing failed, nothing skipped: the row is there, with its note
    md = (out / "lat.md").read_text()
    assert "batch size(s) 8 not measured" in md


def test_a_row_with_no_batch_the_engine_takes_is_a_skip_not_a_failure(
        fake_trt: types.ModuleType, trt_bundle: Path, tiny_demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker answers {"skipped": reason} (exit 0) instead of failing at the first batch of 8."""
    from gradad.benchmarks import latency_worker
    from gradad.benchmarks.latency_worker import RowSpec

    spec = RowSpec(label="GRAD tiny bundle · TensorRT FP16", method="grad", preset="tiny", backend="tensorrt",
                   precision="fp16", device="cuda", image_size=64,
                   images=[str(p) for p in sorted((tiny_demo_root / "nut" / "test" / "good").iterdir())],
                   batches=[8, 16], threads=1, warmup=0, iters=1, min_iters=1, max_seconds=1.0,
                   bundle=str(trt_bundle))
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(asdict(spec))))
    monkeypatch.setattr(sys, "stdout", stdout)
    latency_worker.main()
    answer = json.loads(stdout.getvalue().strip().splitlines()[-1])
    assert set(answer) == {latency_worker.SKIPPED_KEY}
    assert "8, 16" in answer["skipped"] and "1..4" in answer["skipped"]
    assert fake_trt.cudart.live() == 0  # the engine's buffers were freed before the answer


def _measured(spec: Any) -> dict[str, Any]:
    """A worker's row for ``spec`` without running one (the parent's bookkeeping is under test)."""
    stages = {s: {"p50": 1.0, "p95": 1.0, "p99": 1.0, "min": 1.0}
              for s in ("decode", "preprocess", "inference", "postprocess", "total")}
    b1 = {"batch": 1, "iterations": 1, "images": 1, "fps": 100.0, "latency_ms": stages}
    row = {k: v for k, v in asdict(spec).items() if k not in ("images", "onnx_path", "extra")}
    return {**row, "by_batch": [b1], "batch1": b1, "best_batch": 1, "best_fps": 100.0, "peak_rss_mb": 50.0,
            "load_average_1min": [0.1, 0.1]}


@pytest.mark.parametrize("outcome", ["failed", "skipped"])
def test_a_later_row_that_fails_or_is_skipped_keeps_the_finished_rows(
        outcome: str, fake_trt: types.ModuleType, trt_bundle: Path, tiny_demo_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ONNX Runtime row finished, the TensorRT row after it failed (or had nothing to measure): both files are
    written with the finished row and the reason; only a failure ends the command non-zero."""
    import gradad.benchmarks.latency as latency
    from gradad.errors import GradError

    def worker(spec: Any, threads: int, timeout_s: float) -> dict[str, Any]:
        if spec.backend != "tensorrt":
            return _measured(spec)
        if outcome == "skipped":
            return {"skipped": "no requested batch size (8) fits"}
        raise GradError(f"latency row {spec.label!r} failed (exit 1): BackendError: engine gone")

    monkeypatch.setattr(latency, "run_worker", worker)
    monkeypatch.setattr(latency, "_complexity", lambda preset, cache: {  # counting FLOPs is not under test
        "gflop_total": 1.0, "gflop_extractor": 0.5, "gflop_grad": 0.5, "params_extractor_m": 1.0,
        "params_grad_m": 1.0})
    result = CliRunner().invoke(main, [
        "latency", "--bundle", str(trt_bundle), "--backend", "onnxruntime-fp32", "--backend", "tensorrt",
        "--no-patchcore", "--images", str(tiny_demo_root / "nut" / "test" / "good"), "-o", str(tmp_path),
        "--name", "lat"])
    data = json.loads((tmp_path / "lat.json").read_text())
    assert [r["backend"] for r in data["rows"]] == ["onnxruntime"]
    (entry,) = data["skipped"]
    assert "TensorRT" in entry["label"]
    md = (tmp_path / "lat.md").read_text()
    if outcome == "failed":
        assert result.exit_code == 2, result.output
        assert entry["status"] == "failed" and "engine gone" in entry["reason"]
        assert f"- failed {entry['label']}: " in md
        error = result.output.strip().splitlines()[-1]
        assert error.startswith("error: 1 latency row(s) failed") and str(tmp_path / "lat.json") in error
    else:
        assert result.exit_code == 0, result.output
        assert "status" not in entry and f"- skipped {entry['label']}: no requested batch size" in md


# --- 2. TensorRT rows say what they ran on ----------------------------------------------------------------------


def _check_engine_record(record: dict[str, Any]) -> None:
    assert record["file"] == ENGINE and record["built_with_tensorrt"] == TRT_VERSION == record["tensorrt"]
    assert record["gpu_name"] == GPU["name"] and record["compute_capability"] == GPU["compute_capability"]
    assert record["precision"] == "fp16" and record["profile"]["max"][:2] == [ENGINE_MAX_BATCH, 3]
    assert (record["min_batch"], record["max_batch"]) == (1, ENGINE_MAX_BATCH)
    assert len(record["sha256"]) == 64


def _check_environment(env: dict[str, Any]) -> None:
    """Torch sees no GPU here: the GPU named is the one cuda-python (TensorRT's) sees."""
    assert env["gpu"] == GPU["name"] and env["gpu_compute_capability"] == GPU["compute_capability"]
    assert env["gpu_source"] == "cuda-python" and env["tensorrt"] == TRT_VERSION


def test_tensorrt_latency_row_names_its_engine_and_gpu(latency_trt: tuple[dict[str, Any], Path]) -> None:
    data, out = latency_trt
    _check_engine_record(_rows(data)["tensorrt"]["tensorrt_engine"])
    assert "tensorrt_engine" not in _rows(data)["onnxruntime"]
    _check_environment(data["environment"])
    md = (out / "lat.md").read_text()
    assert f"GPU: {GPU['name']}" in md and f"engine `{ENGINE}`" in md


def test_tensorrt_accuracy_row_names_its_engine_and_gpu(fake_trt: types.ModuleType, trt_bundle: Path,
                                                         tiny_demo_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "accuracy", "--data", str(tiny_demo_root), "--classes", "nut", "--bundle", str(trt_bundle), "--backend",
        "onnxruntime-fp32", "--backend", "tensorrt", "--bootstrap", "0", "--threads", "1", "-o", str(tmp_path),
        "--name", "acc"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "acc.json").read_text())
    rows = _rows(data)
    assert data["skipped"] == [] and rows["tensorrt"]["device"] == "cuda"
    _check_engine_record(rows["tensorrt"]["tensorrt_engine"])
    _check_environment(data["environment"])
    assert f"engine `{ENGINE}`, built with TensorRT {TRT_VERSION} for {GPU['name']}" in (
        tmp_path / "acc.md").read_text()


def test_the_results_page_names_the_engine_and_the_batches_not_measured(
        latency_trt: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, out = latency_trt
    shutil.copy(out / "lat.json", tmp_path / "lat.json")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "README.md").read_text()
    assert f"GPU: {GPU['name']}" in page and f"engine `{ENGINE}`" in page
    assert "batch size(s) 8 not measured" in page


# --- 3. grad-bench gpu results on the results page ----------------------------------------------------------------


def _gpu_result() -> dict[str, Any]:
    """A ``grad-bench gpu`` result as gpu_check writes it: one row measured, one failed, three skipped."""
    from gradad.benchmarks.gpu_check import KIND_GPU, make_row

    rows = [make_row("latency_tiny", "latency · tiny · eager FP32", "ok", summary="b1 p50 1.23 ms (813 img/s)"),
            make_row("latency_tiny", "latency · tiny · CUDA graph FP32", "failed", "RuntimeError: capture failed"),
            make_row("tensorrt", "TensorRT engine · tiny FP16", "skipped", "no tensorrt Python package here"),
            make_row("tensorrt", "TensorRT engine · tiny FP32", "skipped", "no tensorrt Python package here"),
            make_row("f2pad", "F2PAD · tiny · CUDA · batched (up to 2)", "skipped", "time budget spent")]
    return {"kind": KIND_GPU, "schema_version": 1, "name": "gpu_check", "command": "grad-bench gpu --smoke",
            "status": "done", "device": "NVIDIA H200", "cuda": {"torch": "2.5", "torch_cuda": "12.4"},
            "environment": {"gpu": "NVIDIA H200", "gpu_source": "torch"}, "rows": rows,
            "row_counts": {"ok": 1, "skipped": 3, "failed": 1}}


def test_report_renders_gpu_results(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "gpu_check.json").write_text(json.dumps(_gpu_result()))
    (tmp_path / "newer.json").write_text(json.dumps({"kind": "energy", "command": "grad-bench energy"}))
    with caplog.at_level(logging.INFO, logger="gradad.benchmarks.report_page"):
        result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "README.md").read_text()
    section = page.split("## GPU check (`grad-bench gpu`)", 1)[1].split("\n## ", 1)[0]
    assert "### `gpu_check.json`" in section and "Device: NVIDIA H200" in section
    assert "| latency_tiny | latency · tiny · eager FP32 | ok | b1 p50 1.23 ms (813 img/s) |" in section
    assert "| latency · tiny · CUDA graph FP32 | failed | RuntimeError: capture failed |" in section
    # skipped rows: named with their reason, one line per reason
    assert ("- Skipped TensorRT engine · tiny FP16, TensorRT engine · tiny FP32: no tensorrt Python package "
            "here.") in section
    assert "- Skipped F2PAD · tiny · CUDA · batched (up to 2): time budget spent." in section
    other = page.split("## Other results in this folder", 1)[1].split("\n## ", 1)[0]
    assert "`newer.json`" in other and "gpu_check.json" not in other
    messages = [r.getMessage() for r in caplog.records]
    assert not any("gpu_check.json" in m for m in messages)
    assert "newer.json: kind 'energy' not rendered here; listed under other results" in messages


def test_report_refuses_a_malformed_gpu_result_by_name(tmp_path: Path) -> None:
    bad = _gpu_result()
    bad["rows"][0].pop("label")
    (tmp_path / "gpu_check.json").write_text(json.dumps(bad))
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "gpu_check.json is not a readable gpu result" in result.output


def test_report_reproduces_the_committed_results_page(tmp_path: Path) -> None:
    """benchmarks/results/README.md is `grad-bench report`'s output for the JSON beside it, byte for byte (no gpu
    file there, so the page has no GPU section)."""
    committed = REPO / "benchmarks" / "results"
    if not (committed / "README.md").is_file():
        pytest.skip("no committed results page in this checkout")
    for path in committed.iterdir():
        if path.is_file() and path.suffix in (".json", ".md"):
            shutil.copy(path, tmp_path / path.name)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "README.md").read_bytes() == (committed / "README.md").read_bytes()
