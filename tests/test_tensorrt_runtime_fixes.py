"""GLUE tests for four TensorRT runtime fixes, run against the FAKE `tensorrt` and `cudart` of tests/fakes/.

1. A TensorRT backend is named ``tensorrt:<precision>:<engine file>`` (like ONNX Runtime's
   ``onnxruntime:<provider>:<file>``), so grad-run warns when thresholds calibrated on one engine meet another;
   an older calibration's plain ``tensorrt`` is judged by the precisions the bundle holds.
2. CUDA graphs are kept per slot and batch size: a live run's varying batch sizes replay graphs instead of
   re-capturing them, warm-up captures the sizes a run uses on every slot, and every graph is destroyed.
3. cudaErrorInsufficientDriver is not "no CUDA GPU found" and names the cuda-python to install; the "engines must
   be built on the target GPU" tail is only for builds.
4. ``--backend auto`` with an engine for the precision that cannot run here warns (INFO without an engine);
   ``--backend tensorrt`` without an engine and without TensorRT does not suggest a build that cannot run.

Not TensorRT tests: no GPU is touched.
"""

from __future__ import annotations

import enum
import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fakes.bundles import minimal_bundle
from fakes.tensorrt import (ENGINE_BYTES, TRT_VERSION, FakeCudart, FakeDataType, GraphCudart, H, W, default_specs,
                            make_fake_trt)
from gradad.bundle import Bundle, Calibration, EngineStamp, FileEntry
from gradad.engine_trust import trust
from gradad.runtime import loader, tensorrt_backend
from gradad.runtime import tensorrt_device as td
from gradad.runtime.backend import BackendError
from gradad.runtime.pipeline import RunOptions, warm_up
from gradad.runtime.tensorrt_backend import TensorRTBackend, load_tensorrt_backend
from gradad.runtime.tensorrt_device import TensorRTUnavailable

GPU = {"name": "NVIDIA Orin", "compute_capability": "8.7"}


def stamp(precision: str = "fp16", trt_version: str = TRT_VERSION) -> dict[str, Any]:
    return {"file": f"model.trt{trt_version}.{precision}.sm87.NVIDIA-Orin.plan", "tensorrt_version": trt_version,
            "gpu_name": GPU["name"], "compute_capability": GPU["compute_capability"], "precision": precision}


def make_bundle(root: Path, stamps: list[dict[str, Any]]) -> tuple[Path, Bundle]:
    """A saved bundle of trusted fake engines (and a placeholder model.onnx the manifest requires)."""
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"fp32")
    files = {"model.onnx": FileEntry.of(bundle / "model.onnx")}
    for s in stamps:
        (bundle / s["file"]).write_bytes(ENGINE_BYTES)
        files[s["file"]] = FileEntry.of(bundle / s["file"])
        trust(files[s["file"]].sha256, bundle / s["file"], "engine")
    manifest = minimal_bundle(bundle, H, W, files, [EngineStamp.from_json(s) for s in stamps])
    manifest.save()
    return bundle, manifest


def uint8_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, H, W), dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# 1. thresholds calibrated on one TensorRT engine, used on another
# ------------------------------------------------------------------------------------------


def test_a_loaded_engine_is_named_by_precision_and_file(tmp_path: Path) -> None:
    _, manifest = make_bundle(tmp_path, [stamp("fp16"), stamp("int8")])
    cudart = FakeCudart()
    for precision in ("fp16", "int8"):
        backend = load_tensorrt_backend(manifest, precision, trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)
        assert backend.name == f"tensorrt:{precision}:{stamp(precision)['file']}"
        backend.close()


def _run_settings(bundle: Path, precision: str) -> SimpleNamespace:
    """What runtime.cli.load_engine reads of grad-run's settings."""
    from gradad.runtime.cli import BackendOptions

    return SimpleNamespace(bundle_dir=bundle, threshold=None, class_name=None, loop=SimpleNamespace(serial=True),
                           backend=BackendOptions(backend="tensorrt", precision=precision))


def _load_engine_with_fakes(monkeypatch, manifest: Bundle, precision: str) -> Any:
    """runtime.cli.load_engine, its load_backend giving the bundle's engine of ``precision`` on the fakes."""
    from gradad.runtime.cli import load_engine

    def fake_load_backend(bundle_dir, backend, precision_, *args, **kwargs):
        cudart = FakeCudart()
        return load_tensorrt_backend(manifest, precision_, trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU), \
            manifest

    monkeypatch.setattr(loader, "load_backend", fake_load_backend)
    engine, _, _ = load_engine(_run_settings(manifest.directory, precision))
    engine.close()
    return engine


def test_thresholds_calibrated_on_the_fp16_engine_warn_on_the_int8_engine(tmp_path: Path, monkeypatch,
                                                                            caplog) -> None:
    """grad-calibrate --backend tensorrt records the backend's name; grad-run on the INT8 engine must warn (the
    old plain 'tensorrt' matched every engine, while ONNX Runtime's precisions were told apart)."""
    from fakes.calibration import grey_images
    from gradad.calibration.calibrate import calibrate as run_calibrate

    _, manifest = make_bundle(tmp_path, [stamp("fp16"), stamp("int8")])
    cudart = FakeCudart()
    fp16 = load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)
    good = grey_images(tmp_path / "good", [100 + i for i in range(30)])
    manifest.calibration = run_calibrate(fp16, good[0].parent)
    fp16.close()
    with caplog.at_level(logging.WARNING, logger="gradad.run"):
        _load_engine_with_fakes(monkeypatch, manifest, "fp16")
    assert "calibrated on" not in caplog.text  # the engine it was calibrated on: no warning
    with caplog.at_level(logging.WARNING, logger="gradad.run"):
        _load_engine_with_fakes(monkeypatch, manifest, "int8")
    assert (f"thresholds were calibrated on tensorrt:fp16:{stamp('fp16')['file']} but this run uses "
            f"tensorrt:int8:{stamp('int8')['file']}") in caplog.text


@pytest.mark.parametrize(("engines", "warned"), [(["fp16"], False), (["fp16", "int8"], True)])
def test_an_older_plain_tensorrt_calibration_warns_only_when_the_precision_is_unknown(
        tmp_path: Path, monkeypatch, caplog, engines: list[str], warned: bool) -> None:
    """A bundle calibrated before the engine was named: with engines of one precision only, that is the one it was
    calibrated on (no warning); with several, the run says the precision was not recorded."""
    _, manifest = make_bundle(tmp_path, [stamp(p) for p in engines])
    manifest.calibration = Calibration(image_threshold=100.0, pixel_threshold=0.5, backend="tensorrt")
    with caplog.at_level(logging.WARNING, logger="gradad.run"):
        _load_engine_with_fakes(monkeypatch, manifest, engines[-1])
    assert ("unrecorded precision" in caplog.text) is warned
    if warned:
        assert f"this run uses tensorrt:int8:{stamp('int8')['file']}" in caplog.text
        assert "re-run grad-calibrate" in caplog.text


def test_calibration_backend_warning_rules(tmp_path: Path) -> None:
    _, manifest = make_bundle(tmp_path, [stamp("fp16"), stamp("int8")])
    fp16, int8 = (f"tensorrt:{p}:{stamp(p)['file']}" for p in ("fp16", "int8"))
    ort = "onnxruntime:CPUExecutionProvider:model.onnx"
    warning = loader.calibration_backend_warning
    assert warning(fp16, fp16, manifest) is None
    assert "calibrated on " + fp16 in warning(fp16, int8, manifest)
    assert "this run uses " + ort in warning("tensorrt", ort, manifest)  # an old TRT calibration on ORT
    assert "unrecorded precision" in warning("tensorrt", fp16, manifest)


# ------------------------------------------------------------------------------------------
# 2. CUDA graphs per slot and batch size
# ------------------------------------------------------------------------------------------


def graph_backend(engine: Path, cudart: GraphCudart, in_flight: int = 2, **kw) -> tuple[TensorRTBackend, Any]:
    trt = make_fake_trt(cudart, specs=default_specs(in_dtype=FakeDataType.UINT8), profiles=max(2, in_flight), **kw)
    return TensorRTBackend(engine, "image", trt=trt, cudart=cudart, in_flight=in_flight), trt


@pytest.fixture
def engine_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan"
    path.write_bytes(ENGINE_BYTES)
    return path


def plain_enqueues(trt: Any, cudart: GraphCudart) -> int:
    """Engine runs that were not graph replays (the fake logs an 'execute' for both)."""
    return sum(1 for e in trt.log if e[0] == "execute") - cudart.count("cudaGraphLaunch")


def run_sizes(backend: TensorRTBackend, sizes: list[int]) -> None:
    """Batches of ``sizes`` with two in flight (the pipelined loop), each result checked against its input."""
    pending: list[tuple[Any, np.ndarray]] = []
    for i, n in enumerate(sizes):
        x = uint8_images(n, i)
        pending.append((backend.submit(x), x))
        if len(pending) == backend.in_flight:
            handle, want = pending.pop(0)
            np.testing.assert_allclose(backend.collect(handle)[0], want.mean(axis=(1, 2, 3)), rtol=1e-5)
    for handle, want in pending:
        np.testing.assert_allclose(backend.collect(handle)[0], want.mean(axis=(1, 2, 3)), rtol=1e-5)


def test_varying_batch_sizes_replay_one_graph_per_slot_and_size(engine_file: Path) -> None:
    """A live 4-camera --batch 4 run hands the backend batches of 1..4: each (slot, size) is captured once, then
    replayed (one graph per slot re-captured 154 of 200 batches)."""
    cudart = GraphCudart()
    backend, trt = graph_backend(engine_file, cudart)
    rng = random.Random(0)
    sizes = [rng.choice([1, 2, 3, 4]) for _ in range(200)]
    run_sizes(backend, sizes)
    captures = cudart.count("cudaGraphInstantiate")
    assert captures <= 2 * 4 and plain_enqueues(trt, cudart) == captures
    assert cudart.count("cudaGraphLaunch") == len(sizes) - captures
    assert cudart.count("cudaGraphExecDestroy") == 0  # no graph was thrown away to make room for another
    assert all(set(slot.graphs) <= {1, 2, 3, 4} for slot in backend._slots)
    backend.close()
    assert cudart.count("cudaGraphExecDestroy") == captures and cudart.execs == {}


def test_warm_up_captures_batch_1_and_the_batch_size_on_every_slot(engine_file: Path) -> None:
    cudart = GraphCudart()
    backend, trt = graph_backend(engine_file, cudart, in_flight=3)
    warm_up(backend, 4)
    assert cudart.count("cudaGraphInstantiate") == 3 * 2
    before = (cudart.count("cudaGraphInstantiate"), plain_enqueues(trt, cudart))
    run_sizes(backend, [1, 4] * 6)  # every slot sees both sizes
    assert (cudart.count("cudaGraphInstantiate"), plain_enqueues(trt, cudart)) == before  # replays only
    backend.close()
    assert cudart.execs == {}


def test_live_warm_up_captures_every_size_up_to_the_batch(engine_file: Path) -> None:
    cudart = GraphCudart()
    backend, trt = graph_backend(engine_file, cudart)
    warm_up(backend, 4, every_size=True)
    assert cudart.count("cudaGraphInstantiate") == 2 * 4
    before = plain_enqueues(trt, cudart)
    run_sizes(backend, [3, 2, 1, 4, 2, 3, 1, 1, 4, 3])
    assert cudart.count("cudaGraphInstantiate") == 2 * 4 and plain_enqueues(trt, cudart) == before
    backend.close()


def test_a_live_pipelined_run_warms_up_every_size(monkeypatch) -> None:
    """run_pipeline asks warm_up for every size on a live pipelined run, batch 1 and the batch size otherwise."""
    from gradad.runtime import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "warm_up", lambda backend, size, every_size=False: calls.append(every_size))
    backend = SimpleNamespace(max_batch=8, input_hw=(H, W))
    for live in (True, False):
        pipeline.run_pipeline([], backend, pipeline.Thresholds(1.0), [],
                              RunOptions(batch_size=4, live=live, stats_every_s=0))
    assert calls == [True, False]


def test_a_failed_capture_destroys_every_slots_graphs(engine_file: Path, caplog) -> None:
    """Graphs turned off mid-run: the graphs already captured on every slot are destroyed at once, not left on
    the GPU until close()."""

    class FailThirdCapture(GraphCudart):
        def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802 - the real name
            self.fail_capture = self.count("cudaStreamBeginCapture") == 2
            return super().cudaStreamBeginCapture(stream, mode)

    cudart = FailThirdCapture()
    backend, _ = graph_backend(engine_file, cudart)
    with caplog.at_level(logging.WARNING):
        run_sizes(backend, [1, 1, 2, 2, 3, 1, 1])
    assert not backend.cuda_graphs and "CUDA graph capture unavailable" in caplog.text
    assert cudart.count("cudaGraphInstantiate") == 2 and cudart.execs == {}
    assert all(not slot.graphs for slot in backend._slots)
    backend.close()
    assert cudart.count("cudaGraphExecDestroy") == 2


# ------------------------------------------------------------------------------------------
# 3. a driver too old for cuda-python is not "no CUDA GPU found"
# ------------------------------------------------------------------------------------------


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class _DeviceCudart:
    """cuda-python's runtime as gpu_identity sees it, failing cudaGetDeviceProperties with ``err``."""

    cudaError_t = _Err

    def __init__(self, err: _Err) -> None:
        self.err = err

    def cudaGetDeviceProperties(self, device):  # noqa: N802 - the real name
        return (self.err, None)


@pytest.fixture
def cuda_bindings_13(monkeypatch) -> None:
    """pip's view: cuda-bindings 13.5.0 installed without the cuda-python meta package."""
    from importlib import metadata

    def version(dist: str) -> str:
        if dist == "cuda-bindings":
            return "13.5.0"
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "version", version)


def test_insufficient_driver_names_the_cuda_python_to_install(monkeypatch, cuda_bindings_13) -> None:
    monkeypatch.setattr(td, "import_cudart", lambda: _DeviceCudart(_Err.cudaErrorInsufficientDriver))
    for building in (True, False):
        with pytest.raises(TensorRTUnavailable) as info:
            td.gpu_identity(building=building)
        msg = str(info.value)
        assert "no CUDA GPU found" not in msg and "must be built" not in msg
        assert "cudaErrorInsufficientDriver" in msg and "cuda-bindings 13.5.0" in msg
        assert "JetPack 5: pip install 'cuda-python==11.8.*'" in msg and "JetPack 6: pip install 'cuda-python==12.*'" \
            in msg


def test_no_device_says_engines_are_built_on_the_target_gpu_only_when_building(monkeypatch) -> None:
    monkeypatch.setattr(td, "import_cudart", lambda: _DeviceCudart(_Err.cudaErrorNoDevice))
    with pytest.raises(TensorRTUnavailable, match=r"^no CUDA GPU found \(cudaGetDeviceProperties: "
                                                   r"cudaErrorNoDevice\); TensorRT engines must be built on the "
                                                   r"target GPU$"):
        td.gpu_identity()  # what grad-export build calls
    with pytest.raises(TensorRTUnavailable) as info:
        td.gpu_identity(building=False)
    assert str(info.value) == "no CUDA GPU found (cudaGetDeviceProperties: cudaErrorNoDevice)"


def test_grad_run_on_a_box_without_a_gpu_does_not_talk_about_building(tmp_path: Path, monkeypatch) -> None:
    _, manifest = make_bundle(tmp_path, [stamp()])
    monkeypatch.setattr(td, "import_cudart", lambda: _DeviceCudart(_Err.cudaErrorNoDevice))
    with pytest.raises(TensorRTUnavailable) as info:
        load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(FakeCudart()), cudart=FakeCudart())
    assert "no CUDA GPU found" in str(info.value) and "must be built" not in str(info.value)


# ------------------------------------------------------------------------------------------
# 4. --backend auto with an engine that cannot run; --backend tensorrt without TensorRT
# ------------------------------------------------------------------------------------------


@pytest.fixture
def ort_stub(monkeypatch) -> list[str]:
    """load_backend's ONNX Runtime fallback replaced by a stub (the fake bundle's model.onnx is a placeholder)."""
    used: list[str] = []

    def onnx_backend(bundle, precision, *args, **kwargs):
        used.append(precision)
        return SimpleNamespace(name="onnxruntime:CPUExecutionProvider:model.onnx", path=Path("model.onnx"))

    monkeypatch.setattr(loader, "_onnx_backend", onnx_backend)
    return used


def _fake_tensorrt_here(monkeypatch, version: str = TRT_VERSION) -> None:
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: make_fake_trt(FakeCudart(), version=version))
    monkeypatch.setattr(tensorrt_backend, "gpu_identity", lambda **_: GPU)


def _loader_records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gradad.runtime.loader" and r.levelno == level]


def test_auto_with_a_stale_engine_warns_and_names_the_rebuild(tmp_path: Path, monkeypatch, caplog,
                                                             ort_stub) -> None:
    """After a JetPack update (TensorRT 10.3 -> 10.4) the engine cannot run: the line falls back to ONNX Runtime
    with a WARNING saying why and how to rebuild, not an INFO line."""
    bundle, _ = make_bundle(tmp_path, [stamp()])
    _fake_tensorrt_here(monkeypatch, version="10.4.0")
    with caplog.at_level(logging.INFO):
        backend, _ = loader.load_backend(bundle, "auto")
    assert backend.name.startswith("onnxruntime") and ort_stub == ["fp32"]
    (warning,) = _loader_records(caplog, logging.WARNING)
    assert "fp16 engine cannot run here" in warning and "this device has TensorRT 10.4.0" in warning
    assert f"grad-export build --fp16 {bundle}" in warning and "running on ONNX Runtime instead" in warning


def test_auto_with_an_engine_but_no_tensorrt_warns_with_the_fix(tmp_path: Path, monkeypatch, caplog,
                                                                ort_stub) -> None:
    bundle, _ = make_bundle(tmp_path, [stamp()])

    def no_tensorrt() -> Any:
        raise TensorRTUnavailable("TensorRT not installed (the Python package `tensorrt`)")

    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", no_tensorrt)
    with caplog.at_level(logging.INFO):
        loader.load_backend(bundle, "auto")
    (warning,) = _loader_records(caplog, logging.WARNING)
    assert "TensorRT not installed" in warning and "running on ONNX Runtime instead" in warning
    assert f"rebuild it on this device with `grad-export build --fp16 {bundle}" in warning


def test_auto_without_any_engine_says_only_what_runs(tmp_path: Path, monkeypatch, caplog, ort_stub) -> None:
    """A CPU box's bundle (no engine at all) running on ONNX Runtime is normal: no warning, and at INFO only the
    backend that runs (the reason TensorRT was not used is there at DEBUG, for -v)."""
    bundle, _ = make_bundle(tmp_path, [])
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt",
                        lambda: (_ for _ in ()).throw(TensorRTUnavailable("TensorRT not installed")))
    with caplog.at_level(logging.DEBUG):
        loader.load_backend(bundle, "auto")
    assert _loader_records(caplog, logging.WARNING) == []
    assert not any("TensorRT" in m for m in _loader_records(caplog, logging.INFO))
    assert any(m.startswith("backend ") for m in _loader_records(caplog, logging.INFO))
    assert any("TensorRT backend not used" in m for m in _loader_records(caplog, logging.DEBUG))


def test_backend_tensorrt_without_engine_or_tensorrt_does_not_suggest_a_build_that_fails(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    bundle, _ = make_bundle(tmp_path, [])
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt",
                        lambda: (_ for _ in ()).throw(TensorRTUnavailable("TensorRT not installed")))
    with pytest.raises(TensorRTUnavailable) as info:
        loader.load_backend(bundle, "tensorrt")
    msg = str(info.value)
    assert msg.startswith(f"bundle {bundle} has no fp16 TensorRT engine, and none can be built here: TensorRT not "
                          "installed")
    assert "--backend onnxruntime" in msg


def test_backend_tensorrt_without_engine_on_a_tensorrt_box_still_suggests_the_build(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    bundle, _ = make_bundle(tmp_path, [])
    _fake_tensorrt_here(monkeypatch)
    with pytest.raises(BackendError, match=f"has no fp16 TensorRT engine: build one on this device with "
                                           f"grad-export build --fp16 {bundle}") as info:
        loader.load_backend(bundle, "tensorrt")
    assert not isinstance(info.value, TensorRTUnavailable)
