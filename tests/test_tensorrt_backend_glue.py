"""GLUE tests for gradad.runtime.tensorrt_backend, run against a FAKE `tensorrt` and a FAKE `cudart`.

These are NOT TensorRT tests, and they do not touch a GPU: the backend is given the stand-ins of
`tests/fakes/tensorrt.py` (`make_fake_trt`, the one fake `tensorrt` module, and `FakeCudart`), whose execution
context reads the input from fake device memory and writes deterministic outputs back (score = mean of each
image, map = channel 0 / 255) and whose copies really move bytes.

So they check our glue: the data path end to end (shapes, batch sizes, buffer reuse, FP16 -> FP32,
copies in the right order), error messages, that every allocation is freed exactly once, and the
engine-stamp checks of `load_tensorrt_backend` - not that TensorRT or CUDA behave as faked.

Only `test_real_tensorrt_backend` touches the real TensorRT; it is skipped ("TensorRT not
installed" / "cuda-python not installed" / "no CUDA GPU") unless all are present.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes.bundles import minimal_bundle
from fakes.tensorrt import (ENGINE_BYTES, MAX_BATCH, TRT_VERSION, FakeCudart, FakeDataType, FakeEngineV3,
                            GraphCudart, H, W, cudaMemcpyKind, default_specs, make_fake_trt)
from gradad.bundle import Bundle, BundleError, EngineStamp, FileEntry
from gradad.engine_trust import trust
from gradad.errors import GradError
from gradad.runtime.tensorrt_device import TensorRTUnavailable
from gradad.runtime.backend import BackendError
from gradad.runtime.tensorrt_backend import TensorRTBackend, load_tensorrt_backend

GPU = {"name": "NVIDIA Orin", "compute_capability": "8.7"}

@pytest.fixture
def engine_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan"
    path.write_bytes(ENGINE_BYTES)
    return path


def make_backend(engine_file: Path, **kw) -> tuple[TensorRTBackend, Any, FakeCudart]:
    cudart = kw.pop("cudart", None) or FakeCudart()
    trt = make_fake_trt(cudart, **kw)
    return TensorRTBackend(engine_file, "image", trt=trt, cudart=cudart), trt, cudart


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, H, W)).astype(np.float32)


def expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=(1, 2, 3)), x[:, 0] / 255.0


# ------------------------------------------------------------------------------------------
# Data path
# ------------------------------------------------------------------------------------------


def test_infer_moves_data_end_to_end_v3(engine_file):
    backend, trt, cudart = make_backend(engine_file)
    assert backend.name == "tensorrt" and backend.api == "tensors-v3"
    assert backend.max_batch == MAX_BATCH and backend.input_hw == (H, W)

    x = images(3)
    scores, maps = backend.infer(x)
    want_s, want_m = expected(x)
    assert scores.shape == (3,) and maps.shape == (3, H, W)
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)
    np.testing.assert_allclose(maps, want_m, rtol=1e-6)

    ctx = trt.engines[0].contexts[0]
    # set_input_shape with the max batch once to size the outputs, then with the actual batch
    assert ctx.shape_calls == [("image", (MAX_BATCH, 3, H, W)), ("image", (3, 3, H, W))]
    # every IO tensor bound to the device buffer allocated for it
    assert set(ctx.addresses) == {"image", "score", "anomaly_map"}
    assert set(ctx.addresses.values()) == set(cudart.device)
    # H2D -> execute -> D2H x2 -> sync, all on the backend's one stream
    memcpys = [c for c in cudart.calls if c[0] == "cudaMemcpyAsync"]
    kinds = [c[4] for c in memcpys]
    assert kinds == [cudaMemcpyKind.cudaMemcpyHostToDevice] + [cudaMemcpyKind.cudaMemcpyDeviceToHost] * 2
    assert memcpys[0][3] == 3 * 3 * H * W * 4  # only the 3 images, not the max batch
    assert {c[5] for c in memcpys} == {ctx.executions[0]["stream"]}
    assert cudart.calls[-1][0] == "cudaStreamSynchronize"


def test_results_are_copies_not_views_of_pinned_memory(engine_file):
    backend, _, _ = make_backend(engine_file)
    s1, m1 = backend.infer(images(2, seed=1))
    s1_before, m1_before = s1.copy(), m1.copy()
    backend.infer(images(2, seed=2))
    np.testing.assert_array_equal(s1, s1_before)
    np.testing.assert_array_equal(m1, m1_before)
    backend.close()
    assert float(s1.sum()) == float(s1_before.sum())  # still readable after the memory is freed


def test_buffers_allocated_once_across_calls(engine_file):
    backend, trt, cudart = make_backend(engine_file)
    for n, seed in ((1, 0), (4, 1), (2, 2), (4, 3)):
        x = images(n, seed)
        scores, maps = backend.infer(x)
        np.testing.assert_allclose(scores, expected(x)[0], rtol=1e-6)
        assert maps.shape == (n, H, W)
    assert cudart.count("cudaStreamCreate") == 1
    assert cudart.count("cudaMalloc") == 3 and cudart.count("cudaMallocHost") == 3
    # sized for the max batch
    assert sorted(c[1] for c in cudart.calls if c[0] == "cudaMalloc") == sorted(
        [MAX_BATCH * 4, MAX_BATCH * H * W * 4, MAX_BATCH * 3 * H * W * 4])
    ctx = trt.engines[0].contexts[0]
    assert [e["shape"][0] for e in ctx.executions] == [1, 4, 2, 4]
    assert len({tuple(sorted(e["addresses"].items())) for e in ctx.executions}) == 1


def test_fp16_outputs_are_converted_to_float32(engine_file):
    backend, _, cudart = make_backend(engine_file, specs=default_specs(out_dtype=FakeDataType.HALF))
    x = images(2)
    scores, maps = backend.infer(x)
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    want_s, want_m = expected(x)
    np.testing.assert_allclose(scores, want_s, rtol=1e-3)
    np.testing.assert_allclose(maps, want_m, atol=1e-3)
    # half-size output buffers
    assert MAX_BATCH * 2 in [c[1] for c in cudart.calls if c[0] == "cudaMalloc"]


def test_map_output_without_channel_axis(engine_file):
    backend, _, _ = make_backend(engine_file, specs=default_specs(map_rank=3))
    x = images(2)
    _, maps = backend.infer(x)
    np.testing.assert_allclose(maps, expected(x)[1], rtol=1e-6)


def test_outputs_are_found_by_name_only(engine_file):
    specs = default_specs()
    specs[1].name = "output_0"  # a score-shaped output under another name is not guessed
    with pytest.raises(BackendError, match=r"engine model\.trt.*\.plan has no 'score' and 'anomaly_map' outputs "
                                           r"\(outputs per image: output_0 \[\], anomaly_map .*rebuild it with "
                                           r"grad-export build"):
        make_backend(engine_file, specs=specs)


def test_tensorrt_older_than_8_5_is_refused(engine_file):
    cudart = FakeCudart()
    with pytest.raises(BackendError, match=r"TensorRT 8.4.1 has no name-based tensor API \(execute_async_v3\): "
                                           r"gradad needs TensorRT 8.5 or newer \(JetPack 5.1\+\)"):
        TensorRTBackend(engine_file, "image", trt=make_fake_trt(cudart, version="8.4.1", bindings_api=True),
                        cudart=cudart)
    assert cudart.live() == 0


def test_empty_batch(engine_file):
    backend, trt, _ = make_backend(engine_file)
    scores, maps = backend.infer(np.zeros((0, 3, H, W), np.float32))
    assert scores.shape == (0,) and maps.shape == (0, H, W)
    assert trt.engines[0].contexts[0].executions == []


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, H + 1, W), (2, 1, H, W), (3, H, W), (2, 3, W, H * 2)])
def test_wrong_input_size_names_expected_shape(engine_file, shape):
    backend, trt, _ = make_backend(engine_file)
    with pytest.raises(BackendError, match=rf"expects images of shape \(N, 3, {H}, {W}\).*got"):
        backend.infer(np.zeros(shape, np.float32))
    assert trt.engines[0].contexts[0].executions == []


def test_batch_over_max_is_refused(engine_file):
    backend, trt, _ = make_backend(engine_file)
    with pytest.raises(BackendError, match=rf"batch of {MAX_BATCH + 1} images exceeds the max batch {MAX_BATCH}"):
        backend.infer(images(MAX_BATCH + 1))
    assert trt.engines[0].contexts[0].executions == []


def test_cuda_error_is_raised_with_its_name_and_partial_allocations_freed(engine_file):
    cudart = FakeCudart(fail={"cudaMalloc": 2})  # the second device buffer cannot be allocated
    with pytest.raises(BackendError, match="cudaMalloc.*cudaErrorMemoryAllocation \\(out of memory\\)"):
        make_backend(engine_file, cudart=cudart)
    assert cudart.live() == 0
    kinds = sorted(k for k, _ in cudart.freed)
    assert kinds == ["device", "host", "host", "stream"]


def test_engine_that_does_not_deserialise(tmp_path):
    path = tmp_path / "other.plan"
    path.write_bytes(b"built by another TensorRT")
    cudart = FakeCudart()
    with pytest.raises(BackendError, match="could not deserialise.*rebuild it on this device"):
        TensorRTBackend(path, trt=make_fake_trt(cudart), cudart=cudart)
    assert cudart.calls == []  # nothing allocated before the engine loads


def test_missing_engine_file(tmp_path):
    cudart = FakeCudart()
    with pytest.raises(BackendError, match="TensorRT engine not found"):
        TensorRTBackend(tmp_path / "nope.plan", trt=make_fake_trt(cudart), cudart=cudart)


def test_wrong_input_name(engine_file):
    cudart = FakeCudart()
    with pytest.raises(BackendError, match="no input named 'pixels' \\(its inputs: image\\)"):
        TensorRTBackend(engine_file, "pixels", trt=make_fake_trt(cudart), cudart=cudart)


def test_trt_exceptions_become_backend_errors(engine_file, monkeypatch):
    cudart = FakeCudart()
    trt = make_fake_trt(cudart)

    def boom(self, name, profile_index):
        raise RuntimeError("pybind11: bad profile")

    monkeypatch.setattr(FakeEngineV3, "get_tensor_profile_shape", boom)  # TensorRT's bindings raise plain errors
    with pytest.raises(BackendError, match="TensorRT cannot load .*bad profile"):
        TensorRTBackend(engine_file, trt=trt, cudart=cudart)


# ------------------------------------------------------------------------------------------
# Teardown
# ------------------------------------------------------------------------------------------


def test_close_frees_every_allocation_exactly_once(engine_file):
    backend, trt, cudart = make_backend(engine_file)
    backend.infer(images(2))
    host, device = set(cudart.host), set(cudart.device)
    stream = next(iter(cudart.streams))
    backend.close()
    backend.close()
    backend.__del__()
    assert cudart.live() == 0
    assert sorted(p for k, p in cudart.freed if k == "host") == sorted(host)
    assert sorted(p for k, p in cudart.freed if k == "device") == sorted(device)
    assert [p for k, p in cudart.freed if k == "stream"] == [stream]
    assert len(cudart.freed) == 7  # 3 pinned + 3 device + 1 stream, none twice
    with pytest.raises(BackendError, match="closed"):
        backend.infer(images(1))


def test_del_frees_defensively(engine_file):
    backend, _, cudart = make_backend(engine_file)
    backend.infer(images(1))
    del backend
    import gc

    gc.collect()
    assert cudart.live() == 0 and len(cudart.freed) == 7


def test_context_manager(engine_file):
    cudart = FakeCudart()
    with TensorRTBackend(engine_file, trt=make_fake_trt(cudart), cudart=cudart) as backend:
        backend.infer(images(1))
    assert cudart.live() == 0


# ------------------------------------------------------------------------------------------
# load_tensorrt_backend: engine stamps
# ------------------------------------------------------------------------------------------


def stamp(precision: str = "fp16", trt_version: str = TRT_VERSION, gpu: dict[str, str] = GPU,
          file: str | None = None) -> dict[str, Any]:
    name = file or f"model.trt{trt_version}.{precision}.sm{gpu['compute_capability'].replace('.', '')}.plan"
    return {"file": name, "tensorrt_version": trt_version, "gpu_name": gpu["name"],
            "compute_capability": gpu["compute_capability"], "precision": precision}


def make_bundle(root: Path, stamps: list[dict[str, Any]], engine_bytes: bytes = ENGINE_BYTES,
                trusted: bool = True) -> tuple[Path, Bundle]:
    """A bundle of fake engines; ``trusted``: as if built on this machine (in the tests' trust list)."""
    bundle = root / "bundle"
    bundle.mkdir()
    files = {}
    for s in stamps:
        (bundle / s["file"]).write_bytes(engine_bytes)
        files[s["file"]] = FileEntry.of(bundle / s["file"])
        if trusted:
            trust(files[s["file"]].sha256, bundle / s["file"], "engine")
    return bundle, minimal_bundle(bundle, H, W, files, [EngineStamp.from_json(s) for s in stamps])


def test_load_picks_the_matching_engine(tmp_path):
    stale = stamp(trt_version="8.6.1")
    good = stamp()
    bundle, manifest = make_bundle(tmp_path, [good, stale, stamp("fp32")])
    cudart = FakeCudart()
    backend = load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)
    assert backend.engine_path == bundle / good["file"]
    assert backend.name == f"tensorrt:fp16:{good['file']}" and backend.max_batch == MAX_BATCH
    x = images(2)
    np.testing.assert_allclose(backend.infer(x)[0], expected(x)[0], rtol=1e-6)
    backend.close()


def test_an_engine_from_elsewhere_is_never_deserialised_until_trusted(tmp_path, caplog):
    """An engine is native code and a bundle's hash is its author's word: one this machine did not build is refused
    before TensorRT sees it (auto falls back to ONNX Runtime with a warning); grad-export trust lets it in."""
    from click.testing import CliRunner

    from gradad.export.cli import main as export_main
    from gradad.runtime.backend import UntrustedEngineError

    foreign = ENGINE_BYTES + b"\0built elsewhere"
    bundle, manifest = make_bundle(tmp_path, [stamp()], engine_bytes=foreign, trusted=False)
    (bundle / "model.onnx").write_bytes(b"fp32")  # bundle.json must name one for grad-export trust to load it
    manifest.add_file("model.onnx")
    manifest.save()
    cudart = FakeCudart()
    trt = make_fake_trt(cudart)
    with pytest.raises(UntrustedEngineError, match=r"not in this user's trust list.*grad-export build --fp16 .*"
                                                   r"grad-export trust"):
        load_tensorrt_backend(manifest, "fp16", trt=trt, cudart=cudart, gpu=GPU)
    assert cudart.calls == [] and trt.log == []  # TensorRT never saw the file
    result = CliRunner().invoke(export_main, ["trust", str(bundle)])
    assert result.exit_code == 0, result.output
    assert f"trusted {stamp()['file']}" in result.output
    with pytest.raises(BackendError) as info:  # trusted now: TensorRT reads it (and the fake refuses its bytes)
        load_tensorrt_backend(manifest, "fp16", trt=trt, cudart=cudart, gpu=GPU)
    assert not isinstance(info.value, UntrustedEngineError) and ("deserialize", len(foreign)) in trt.log


def test_load_refuses_engine_from_another_tensorrt(tmp_path):
    bundle, manifest = make_bundle(tmp_path, [stamp(trt_version="10.0.1")])
    cudart = FakeCudart()
    with pytest.raises(BackendError) as info:
        load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)
    msg = str(info.value)
    assert "TensorRT 10.0.1 (this device has TensorRT 10.3.0)" in msg
    assert f"grad-export build --fp16 {bundle}" in msg
    assert cudart.calls == []


def test_load_refuses_engine_for_another_gpu(tmp_path):
    rtx = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    bundle, manifest = make_bundle(tmp_path, [stamp(gpu=rtx), stamp(gpu={"name": "Tesla T4",
                                                                          "compute_capability": "7.5"})])
    cudart = FakeCudart()
    with pytest.raises(BackendError, match=r"GPU Tesla T4 .*this device has NVIDIA Orin.*rebuild it on this device"
                                           r".*\(and 1 other fp16 engine"):
        load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)


def test_load_refuses_bundle_without_engine(tmp_path):
    bundle, manifest = make_bundle(tmp_path, [])
    with pytest.raises(BackendError) as info:
        load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(FakeCudart()), cudart=FakeCudart(),
                              gpu=GPU)
    assert str(info.value) == (f"bundle {bundle} has no fp16 TensorRT engine: build one on this device with "
                               f"grad-export build --fp16 {bundle} --parity-images DIR")


def test_load_refuses_missing_precision(tmp_path):
    bundle, manifest = make_bundle(tmp_path, [stamp("fp16")])
    with pytest.raises(BackendError, match=f"has no fp32 TensorRT engine.*grad-export build --fp32"):
        load_tensorrt_backend(manifest, "fp32", trt=make_fake_trt(FakeCudart()), cudart=FakeCudart(),
                              gpu=GPU)


def test_load_refuses_modified_engine_file(tmp_path):
    good = stamp()
    bundle, manifest = make_bundle(tmp_path, [good])
    (bundle / good["file"]).write_bytes(ENGINE_BYTES + b"!")
    cudart = FakeCudart()
    with pytest.raises(BundleError, match="does not match the hash"):
        load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)
    assert cudart.calls == []


def test_load_refuses_engine_with_other_input_size(tmp_path):
    bundle, manifest = make_bundle(tmp_path, [stamp()])
    manifest.input.height = 2 * H
    cudart = FakeCudart()
    with pytest.raises(BackendError, match=f"takes {H}x{W} images but bundle .* says {2 * H}x{W}"):
        load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)
    assert cudart.live() == 0


def test_load_errors_are_grad_errors(tmp_path):
    """The loader falls back to ONNX Runtime on any GradError; all refusals must be one."""
    assert issubclass(BackendError, GradError) and issubclass(TensorRTUnavailable, GradError)
    assert issubclass(BundleError, GradError)


def test_runtime_module_does_not_import_torch():
    code = ("import sys; import gradad.runtime.tensorrt_backend; "
            "bad = [m for m in ('torch', 'timm', 'tensorrt') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------
# The real thing (skipped without TensorRT, cuda-python and a GPU)
# ------------------------------------------------------------------------------------------


def _real_engine(trt: Any, path: Path, max_batch: int) -> None:
    """A tiny engine with the fakes' arithmetic: score = mean(image), map = mean over channels / 255."""
    from gradad.export.tensorrt_build import _network_flags

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, False))
    image = network.add_input("image", trt.float32, (-1, 3, H, W))
    score = network.add_reduce(image, trt.ReduceOperation.AVG, 0b1110, False).get_output(0)
    score.name = "score"
    chan = network.add_reduce(image, trt.ReduceOperation.AVG, 0b0010, True).get_output(0)
    scale = network.add_constant((1, 1, 1, 1), np.array([1 / 255.0], np.float32)).get_output(0)
    amap = network.add_elementwise(chan, scale, trt.ElementWiseOperation.PROD).get_output(0)
    amap.name = "anomaly_map"
    network.mark_output(score)
    network.mark_output(amap)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, H, W), (2, 3, H, W), (max_batch, 3, H, W))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None
    path.write_bytes(memoryview(serialized))


def test_real_tensorrt_backend(tmp_path):
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (OSError)
        pytest.skip("TensorRT not installed")
    from gradad.runtime.tensorrt_device import gpu_identity
    from gradad.runtime.tensorrt_device import import_cudart

    try:
        import_cudart()
    except TensorRTUnavailable:
        pytest.skip("cuda-python not installed")
    try:
        gpu_identity()
    except TensorRTUnavailable:
        pytest.skip("no CUDA GPU")

    path = tmp_path / "tiny.plan"
    _real_engine(trt, path, max_batch=4)
    with TensorRTBackend(path, "image", trt=trt) as backend:
        assert backend.max_batch == 4 and backend.input_hw == (H, W)
        for n in (1, 4, 3):
            x = images(n, seed=n)
            scores, maps = backend.infer(x)
            np.testing.assert_allclose(scores, x.mean(axis=(1, 2, 3)), rtol=1e-4)
            np.testing.assert_allclose(maps, x.mean(axis=1) / 255.0, rtol=1e-4, atol=1e-6)
        with pytest.raises(BackendError):
            backend.infer(images(5))


# ------------------------------------------------------------------------------------------
# uint8 input, in-flight slots, CUDA-graph capture (issue 13)
# ------------------------------------------------------------------------------------------


def uint8_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, H, W), dtype=np.uint8)


def test_uint8_engine_input_moves_one_byte_per_channel(engine_file):
    backend, _, cudart = make_backend(engine_file, specs=default_specs(in_dtype=FakeDataType.UINT8))
    assert backend.input_dtype == np.uint8
    x = uint8_images(3)
    scores, maps = backend.infer(x)
    want_s, want_m = expected(x.astype(np.float32))
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)
    np.testing.assert_allclose(maps, want_m, rtol=1e-6)
    # pinned + device input buffers are uint8, and only the 3 images' bytes cross to the GPU
    assert MAX_BATCH * 3 * H * W in [c[1] for c in cudart.calls if c[0] == "cudaMallocHost"]
    h2d = [c for c in cudart.calls if c[0] == "cudaMemcpyAsync" and c[4] == cudaMemcpyKind.cudaMemcpyHostToDevice]
    assert h2d[0][3] == 3 * 3 * H * W
    backend.close()
    assert cudart.live() == 0


def test_float_frames_are_rounded_and_clipped_into_a_uint8_engine_like_onnxruntime(engine_file):
    from gradad.runtime.preprocess import as_input_dtype

    backend, _, _ = make_backend(engine_file, specs=default_specs(in_dtype=FakeDataType.UINT8))
    x = np.full((1, 3, H, W), 254.7, np.float32)
    x[0, :, 0, 0], x[0, :, 0, 1] = 256.0, -1.0  # a plain copy would wrap these to 0 and 255
    slot = backend.submit(x)
    staged = backend._slots[0].buffers["image"].host[: 3 * H * W].reshape(1, 3, H, W)
    assert staged[0, 0, 0, :3].tolist() == [255, 0, 255]
    np.testing.assert_array_equal(staged, as_input_dtype(x, np.dtype(np.uint8)))  # what ONNX Runtime is given
    backend.collect(slot)
    backend.close()


def test_in_flight_slots_have_their_own_stream_context_and_buffers(engine_file):
    cudart = FakeCudart()
    trt = make_fake_trt(cudart, specs=default_specs(in_dtype=FakeDataType.UINT8))
    backend = TensorRTBackend(engine_file, "image", trt=trt, cudart=cudart, in_flight=2, cuda_graphs=False)
    assert len(trt.engines[0].contexts) == 2 and cudart.count("cudaStreamCreate") == 2
    assert cudart.count("cudaMalloc") == 6 and cudart.count("cudaMallocHost") == 6
    a, b = uint8_images(2, 1), uint8_images(3, 2)
    ha, hb = backend.submit(a), backend.submit(b)  # two batches in flight before any result is read
    with pytest.raises(BackendError, match="in flight"):
        backend.submit(a)
    streams = {c[5] for c in cudart.calls if c[0] == "cudaMemcpyAsync"}
    assert len(streams) == 2  # each batch's copies and kernels on its own stream
    sa, ma = backend.collect(ha)
    sb, _ = backend.collect(hb)
    np.testing.assert_allclose(sa, expected(a.astype(np.float32))[0], rtol=1e-6)
    np.testing.assert_allclose(sb, expected(b.astype(np.float32))[0], rtol=1e-6)
    assert ma.shape == (2, H, W)
    backend.infer(a)  # slots are reused round-robin
    backend.close()
    assert cudart.live() == 0


def test_cuda_graph_captured_once_per_batch_size_and_replayed(engine_file):
    cudart = GraphCudart()
    trt = make_fake_trt(cudart, specs=default_specs(in_dtype=FakeDataType.UINT8))
    backend = TensorRTBackend(engine_file, "image", trt=trt, cudart=cudart)
    assert backend.cuda_graphs
    for seed in range(4):  # new data each call: the replayed graph must read the fresh input
        x = uint8_images(2, seed)
        scores, maps = backend.infer(x)
        np.testing.assert_allclose(scores, expected(x.astype(np.float32))[0], rtol=1e-6)
        np.testing.assert_allclose(maps, expected(x.astype(np.float32))[1], rtol=1e-6)
    events = [e[0] for e in trt.log if e[0] in ("execute", "captured")]
    # first call: a plain enqueue, then the capture; the next three: graph launches only
    assert events == ["execute", "captured", "execute", "execute", "execute"]
    assert cudart.count("cudaGraphLaunch") == 3 and cudart.count("cudaGraphInstantiate") == 1
    x = uint8_images(3, 9)  # another batch size: captured beside the first graph, which is kept
    np.testing.assert_allclose(backend.infer(x)[0], expected(x.astype(np.float32))[0], rtol=1e-6)
    assert cudart.count("cudaGraphInstantiate") == 2 and cudart.count("cudaGraphExecDestroy") == 0
    x = uint8_images(2, 10)  # back to the first size: replayed, not re-captured
    np.testing.assert_allclose(backend.infer(x)[0], expected(x.astype(np.float32))[0], rtol=1e-6)
    assert cudart.count("cudaGraphInstantiate") == 2 and cudart.count("cudaGraphLaunch") == 4
    backend.close()
    assert not cudart.execs and cudart.live() == 0


def test_cuda_graph_capture_failure_falls_back_to_plain_enqueues(engine_file, caplog):
    cudart = GraphCudart(fail_capture=True)
    trt = make_fake_trt(cudart)
    backend = TensorRTBackend(engine_file, "image", trt=trt, cudart=cudart)
    for seed in range(3):
        x = images(2, seed)
        np.testing.assert_allclose(backend.infer(x)[0], expected(x)[0], rtol=1e-6)
    assert not backend.cuda_graphs and "CUDA graph capture unavailable" in caplog.text
    assert cudart.count("cudaStreamBeginCapture") == 1 and cudart.count("cudaGraphLaunch") == 0
    backend.close()


def test_a_cuda_python_with_another_graph_signature_falls_back_to_plain_enqueues(engine_file, caplog):
    """cuda-python 11 (JetPack 5) spells cudaGraphInstantiate with a log buffer, not flags: a TypeError there must
    turn graphs off, not end the run."""

    class OldGraphCudart(GraphCudart):
        def cudaGraphInstantiate(self, graph, log_buffer, buffer_size):  # noqa: N802
            return super().cudaGraphInstantiate(graph, 0)

    cudart = OldGraphCudart()
    backend = TensorRTBackend(engine_file, "image", trt=make_fake_trt(cudart), cudart=cudart)
    for seed in range(2):
        x = images(2, seed)
        np.testing.assert_allclose(backend.infer(x)[0], expected(x)[0], rtol=1e-6)
    assert not backend.cuda_graphs and "CUDA graph capture unavailable" in caplog.text
    backend.close()
    assert cudart.live() == 0


def test_no_cuda_graphs_without_capture_calls(engine_file):
    plain, _, _ = make_backend(engine_file)  # a cuda-python without stream capture
    assert not plain.cuda_graphs


def _int8_bundle(tmp_path: Path, built_from: bool) -> tuple[Path, str]:
    import onnx

    from gradad.bundle import FP32_ONNX, INT8_ONNX

    d = tmp_path / "bundle"
    d.mkdir()
    (d / FP32_ONNX).write_bytes(b"fp32")
    (d / INT8_ONNX).write_bytes(onnx.ModelProto(producer_name="old qdq").SerializeToString())
    engine = "model.trt10.3.0.int8.sm87.NVIDIA-Orin.plan"
    (d / engine).write_bytes(ENGINE_BYTES)
    files = {n: FileEntry.of(d / n) for n in (FP32_ONNX, INT8_ONNX, engine)}
    trust(files[engine].sha256, d / engine, "engine")
    sources = {n: files[n].sha256 for n in (FP32_ONNX, INT8_ONNX)} if built_from else None
    bundle = minimal_bundle(d, H, W, files, [EngineStamp(engine, "10.3.0", GPU["name"], "8.7", "int8",
                                                         built_from=sources)])
    bundle.data_root = "x"
    bundle.save()
    return d, engine


def test_an_engine_built_from_an_onnx_file_since_replaced_is_refused(tmp_path: Path) -> None:
    from gradad.bundle import INT8_ONNX

    d, engine = _int8_bundle(tmp_path, built_from=True)
    cudart = FakeCudart()
    load_tensorrt_backend(Bundle.load(d), "int8", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU).close()
    bundle = Bundle.load(d)  # the QDQ model replaced (as a re-quantisation does), the engine left behind
    (d / INT8_ONNX).write_bytes(b"new qdq")
    bundle.add_file(INT8_ONNX)
    bundle.save()
    with pytest.raises(BackendError, match=f"{engine} was built from another version of {INT8_ONNX}.*grad-export build"):
        load_tensorrt_backend(Bundle.load(d), "int8", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)


def test_requantising_removes_the_int8_engines_of_the_old_model(tmp_path: Path, monkeypatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """grad-export quantize's bookkeeping (the ONNX Runtime steps stood in for): an older bundle's INT8 engine,
    stamped without ``built_from``, goes with the QDQ model it was built from."""
    import onnx

    import gradad.export.int8 as int8
    from gradad.bundle import INT8_ONNX

    d, engine = _int8_bundle(tmp_path, built_from=False)

    def quantize(src, dst, *args, **kwargs):
        Path(dst).write_bytes(onnx.ModelProto(producer_name="new qdq").SerializeToString())
        return []

    monkeypatch.setattr(int8, "calibration_batches", lambda *a, **k: [])
    monkeypatch.setattr(int8, "labelled_parity_set", lambda *a, **k: ([], np.array([0, 1]), "stand-in"))
    monkeypatch.setattr(int8, "to_model_input", lambda *a, **k: None)
    monkeypatch.setattr(int8, "lint_or_raise", lambda *a, **k: 1)
    monkeypatch.setattr(int8, "quantize_model", quantize)
    monkeypatch.setattr(int8, "int8_parity", lambda *a, **k: {"map_rel_l2": 0.01, "score_rel_l2": 0.01,
                                                              "auroc_change": 0.0, "auroc_fp32": 1.0,
                                                              "auroc_int8": 1.0})
    int8.quantize_bundle(d, int8.QuantizeOptions(calib=["x"]))
    bundle = Bundle.load(d)
    assert bundle.engines_for("int8") == [] and engine not in bundle.files and not (d / engine).exists()
    assert f"removed INT8 engine {engine}" in caplog.text
    assert onnx.load(d / INT8_ONNX).producer_name == "new qdq"


def test_each_slot_context_gets_its_own_optimisation_profile(engine_file, caplog: pytest.LogCaptureFixture):
    """TensorRT: every context of a dynamic-shape engine in concurrent use needs its own profile (a second
    context without one cannot run on TensorRT 8.x); an engine with fewer profiles than --in-flight gets fewer
    batches in flight, said once."""
    cudart = FakeCudart()
    trt = make_fake_trt(cudart, profiles=3)
    backend = TensorRTBackend(engine_file, "image", trt=trt, cudart=cudart, in_flight=3, cuda_graphs=False)
    assert [c.profile for c in trt.engines[0].contexts] == [0, 1, 2]
    handles = [backend.submit(uint8_images(2, seed)) for seed in range(3)]
    assert all(len(backend.collect(h)[0]) == 2 for h in handles)
    backend.close()
    old = make_fake_trt(cudart, profiles=1)  # built before --profiles
    backend = TensorRTBackend(engine_file, "image", trt=old, cudart=cudart, in_flight=2, cuda_graphs=False)
    assert backend.in_flight == 1 and len(old.engines[0].contexts) == 1
    assert "1 optimisation profile(s): 1 batch(es) in flight instead of 2" in caplog.text
    backend.infer(uint8_images(2))
    backend.close()
    assert cudart.live() == 0


def test_an_engine_swapped_after_the_check_is_not_loaded(tmp_path: Path) -> None:
    """The backend hashes the bytes it hands TensorRT: a file replaced between the bundle check and the read (a
    shared drop folder) is refused."""
    bundle, manifest = make_bundle(tmp_path, [stamp()])
    cudart = FakeCudart()
    trt = make_fake_trt(cudart)
    with pytest.raises(BackendError, match="changed while it was being loaded"):
        TensorRTBackend(bundle / stamp()["file"], trt=trt, cudart=cudart, expected_sha256="0" * 64)
    assert trt.log == []


def test_auto_runs_a_bundle_with_a_foreign_engine_on_onnx_runtime_and_says_why(bundle: Path, tmp_path: Path,
                                                                               monkeypatch, caplog) -> None:
    """A real exported bundle plus an engine from elsewhere, on a 'GPU' (fake TensorRT): auto warns, naming the
    trust list and grad-export trust, and runs the ONNX graph; TensorRT never reads the engine."""
    import logging
    import shutil

    from gradad.runtime import tensorrt_backend
    from gradad.runtime.loader import load_backend

    d = tmp_path / "bundle"
    shutil.copytree(bundle, d)
    engine = stamp()
    (d / engine["file"]).write_bytes(ENGINE_BYTES + b"\0foreign")
    manifest = Bundle.load(d)
    manifest.engines.append(EngineStamp.from_json(engine))
    manifest.add_file(engine["file"])
    manifest.save()
    cudart = FakeCudart()
    trt = make_fake_trt(cudart)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_backend, "gpu_identity", lambda **_: GPU)
    with caplog.at_level(logging.WARNING):
        backend, _ = load_backend(d, "auto", threads=1)
    assert backend.name.startswith("onnxruntime") and trt.log == []
    assert "not in this user's trust list" in caplog.text and f"grad-export trust {d}" in caplog.text
    backend.close()


def test_trust_list_problems_are_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    from gradad.engine_trust import TRUST_FILE_ENV, TrustListError, is_trusted, trust

    listing = tmp_path / "trusted.json"
    monkeypatch.setenv(TRUST_FILE_ENV, str(listing))
    trust("a" * 64, tmp_path / "x.plan", "engine")
    trust("b" * 64, tmp_path / "y.plan", "engine")
    assert is_trusted("a" * 64) and is_trusted("b" * 64) and not is_trusted("c" * 64)
    assert listing.stat().st_mode & 0o777 == 0o600
    listing.write_text("{not json")
    with pytest.raises(TrustListError, match=f"trust list {listing} is unreadable.*delete it"):
        is_trusted("a" * 64)
    monkeypatch.delenv(TRUST_FILE_ENV)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    with pytest.raises(TrustListError, match=f"set {TRUST_FILE_ENV}"):
        is_trusted("a" * 64)
