"""GLUE tests for gradad.runtime.tensorrt_backend, run against a FAKE `tensorrt` and a FAKE `cudart`.

These are NOT TensorRT tests, and they do not touch a GPU. TensorRT and CUDA are not available where
the test suite normally runs, so the backend is given two hand-written stand-ins:

* `FakeCudart` - the cuda-python runtime calls the backend makes (`cudaStreamCreate`,
  `cudaMallocHost`, `cudaMalloc`, `cudaMemcpyAsync`, `cudaStreamSynchronize`, `cudaFree`,
  `cudaFreeHost`, `cudaStreamDestroy`), each returning `(cudaError_t, *values)` like the real
  module. "Pinned" host memory is a numpy buffer whose real address is handed out; "device"
  memory is a numpy buffer behind a fake integer pointer. Copies really move bytes between them,
  so a wrong pointer, size or direction shows up as wrong numbers or an error.
* `make_fake_trt` - a `tensorrt` module with a Runtime, an engine (TensorRT 10 name-based API, or
  the TensorRT 8.x bindings API with `execute_async_v2`) and an execution context that records
  every call and, on execute, reads the input from the fake device memory and writes
  deterministic outputs back: score = mean of each image, map = channel 0 / 255.

So they check our glue: the data path end to end (shapes, batch sizes, buffer reuse, FP16 -> FP32,
copies in the right order), error messages, that every allocation is freed exactly once, and the
engine-stamp checks of `load_tensorrt_backend` - not that TensorRT or CUDA behave as faked.

Only `test_real_tensorrt_backend` touches the real TensorRT; it is skipped ("TensorRT not
installed" / "cuda-python not installed" / "no CUDA GPU") unless all are present.
"""

from __future__ import annotations

import enum
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes.bundles import minimal_bundle
from gradad.bundle import Bundle, BundleError, EngineStamp, FileEntry
from gradad.errors import GradError
from gradad.runtime.tensorrt_device import TensorRTUnavailable
from gradad.runtime.backend import BackendError
from gradad.runtime.tensorrt_backend import TensorRTBackend, load_tensorrt_backend

H = W = 16
MAX_BATCH = 4
GPU = {"name": "NVIDIA Orin", "compute_capability": "8.7"}
TRT_VERSION = "10.3.0"
ENGINE_BYTES = b"fake-serialized-engine"

# ------------------------------------------------------------------------------------------
# The fake cudart
# ------------------------------------------------------------------------------------------


class cudaError_t(enum.IntEnum):  # noqa: N801 - the real name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class FakeStream:
    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class FakeCudart:
    """Enough of cuda-python's runtime module; every call is logged in ``calls``."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.host: dict[int, np.ndarray] = {}  # real address -> owning uint8 buffer
        self.device: dict[int, np.ndarray] = {}  # fake pointer -> uint8 buffer
        self.streams: dict[int, FakeStream] = {}
        self.calls: list[tuple] = []
        self.freed: list[tuple[str, int]] = []
        self.fail = dict(fail or {})  # call name -> which call (1-based) fails with cudaErrorMemoryAllocation
        self._counts: dict[str, int] = {}
        self._next_device = 0x7F00_0000_0000
        self._next_stream = 0x5000

    def _failing(self, name: str) -> bool:
        self._counts[name] = self._counts.get(name, 0) + 1
        return self.fail.get(name) == self._counts[name]

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)

    # --- streams
    def cudaStreamCreate(self):  # noqa: N802
        self.calls.append(("cudaStreamCreate",))
        stream = FakeStream(self._next_stream)
        self._next_stream += 1
        self.streams[stream.handle] = stream
        return (cudaError_t.cudaSuccess, stream)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamSynchronize", int(stream)))
        ok = int(stream) in self.streams
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidValue,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamDestroy", int(stream)))
        self.freed.append(("stream", int(stream)))
        ok = self.streams.pop(int(stream), None) is not None
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidValue,)

    # --- memory
    def cudaMallocHost(self, size):  # noqa: N802
        self.calls.append(("cudaMallocHost", size))
        if self._failing("cudaMallocHost"):
            return (cudaError_t.cudaErrorMemoryAllocation, None)
        buf = np.zeros(int(size), np.uint8)
        ptr = int(buf.ctypes.data)  # a real address: the backend views it through ctypes
        self.host[ptr] = buf
        return (cudaError_t.cudaSuccess, ptr)

    def cudaMalloc(self, size):  # noqa: N802
        self.calls.append(("cudaMalloc", size))
        if self._failing("cudaMalloc"):
            return (cudaError_t.cudaErrorMemoryAllocation, None)
        ptr = self._next_device
        self._next_device += (int(size) + 0xFFFF) & ~0xFFF
        self.device[ptr] = np.zeros(int(size), np.uint8)
        return (cudaError_t.cudaSuccess, ptr)

    def cudaFree(self, ptr):  # noqa: N802
        self.calls.append(("cudaFree", ptr))
        self.freed.append(("device", int(ptr)))
        ok = self.device.pop(int(ptr), None) is not None
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidValue,)

    def cudaFreeHost(self, ptr):  # noqa: N802
        self.calls.append(("cudaFreeHost", ptr))
        self.freed.append(("host", int(ptr)))
        ok = self.host.pop(int(ptr), None) is not None
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidValue,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        self.calls.append(("cudaMemcpyAsync", int(dst), int(src), int(count), kind, int(stream)))
        if int(stream) not in self.streams:
            return (cudaError_t.cudaErrorInvalidValue,)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            dst_pool, src_pool = self.device, self.host
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            dst_pool, src_pool = self.host, self.device
        else:
            return (cudaError_t.cudaErrorInvalidValue,)
        d, s = dst_pool.get(int(dst)), src_pool.get(int(src))
        if d is None or s is None or count > d.size or count > s.size:
            return (cudaError_t.cudaErrorInvalidValue,)
        d[:count] = s[:count]
        return (cudaError_t.cudaSuccess,)

    def cudaGetErrorString(self, err):  # noqa: N802
        return (cudaError_t.cudaSuccess, {2: b"out of memory"}.get(int(err), b"invalid argument"))

    # --- test helpers
    def live(self) -> int:
        return len(self.host) + len(self.device) + len(self.streams)


# ------------------------------------------------------------------------------------------
# The fake tensorrt module
# ------------------------------------------------------------------------------------------


class FakeDataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    UINT8 = 5


class FakeIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class FakeLogger:
    WARNING = 2

    def __init__(self, level: int = 2) -> None:
        self.level = level


class FakeTensorSpec:
    def __init__(self, name, is_input, dtype, shape, profile=None):
        self.name, self.is_input, self.dtype, self.shape, self.profile = name, is_input, dtype, shape, profile


def default_specs(out_dtype=FakeDataType.FLOAT, max_batch=MAX_BATCH, map_rank=4, in_dtype=FakeDataType.FLOAT):
    map_shape = (-1, 1, H, W) if map_rank == 4 else (-1, H, W)
    return [
        FakeTensorSpec("image", True, in_dtype, (-1, 3, H, W),
                       profile=[(1, 3, H, W), (2, 3, H, W), (max_batch, 3, H, W)]),
        FakeTensorSpec("score", False, out_dtype, (-1,)),
        FakeTensorSpec("anomaly_map", False, out_dtype, map_shape),
    ]


NP = {FakeDataType.FLOAT: np.float32, FakeDataType.HALF: np.float16, FakeDataType.INT32: np.int32,
      FakeDataType.UINT8: np.uint8}


class FakeEngineBase:
    def __init__(self, specs: list[FakeTensorSpec], cudart: FakeCudart, log: list) -> None:
        self.specs, self.cudart, self.log = specs, cudart, log
        self.contexts: list[Any] = []

    def _spec(self, name: str) -> FakeTensorSpec:
        return next(s for s in self.specs if s.name == name)


class FakeContextBase:
    """Shape bookkeeping and the fake 'kernel' shared by both API flavours."""

    def __init__(self, engine: FakeEngineBase) -> None:
        self.engine = engine
        self.input_shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls: list[tuple] = []
        self.executions: list[dict] = []

    def _out_shape(self, spec: FakeTensorSpec) -> tuple:
        inp = next(s for s in self.engine.specs if s.is_input)
        n = self.input_shapes.get(inp.name, inp.shape)[0]
        return (n,) + tuple(spec.shape[1:])

    def _set_shape(self, name: str, shape) -> bool:
        shape = tuple(int(v) for v in shape)
        self.shape_calls.append((name, shape))
        spec = self.engine._spec(name)
        lo, _, hi = spec.profile
        if not all(a <= b <= c for a, b, c in zip(lo, shape, hi)) or len(shape) != len(hi):
            return False
        self.input_shapes[name] = shape
        return True

    def _run(self, addresses: dict[str, int], stream_handle: int) -> bool:
        cudart = self.engine.cudart
        if stream_handle not in cudart.streams:
            return False
        capture = getattr(cudart, "capturing", {}).get(stream_handle)
        if capture is not None:  # stream capture: record the 'kernels', run them at each graph launch
            shape, addresses = self.input_shapes[next(s for s in self.engine.specs if s.is_input).name], dict(addresses)
            capture.append(lambda: self._kernel(addresses, shape, stream_handle))
            self.engine.log.append(("captured", shape))
            return True
        return self._kernel(addresses, self.input_shapes[next(s for s in self.engine.specs if s.is_input).name],
                            stream_handle)

    def _kernel(self, addresses: dict[str, int], shape: tuple, stream_handle: int) -> bool:
        cudart = self.engine.cudart
        inp = next(s for s in self.engine.specs if s.is_input)
        count = int(np.prod(shape))
        dtype = np.dtype(NP[inp.dtype])
        images = cudart.device[addresses[inp.name]][: count * dtype.itemsize].view(dtype).reshape(shape)
        images = images.astype(np.float32)
        results = {"score": images.mean(axis=(1, 2, 3)), "anomaly_map": images[:, 0] / 255.0}
        for spec in self.engine.specs:
            if spec.is_input:
                continue
            out = results[spec.name].astype(NP[spec.dtype]).reshape(self._out_shape(spec))
            raw = out.tobytes()
            cudart.device[addresses[spec.name]][: len(raw)] = np.frombuffer(raw, np.uint8)
        self.executions.append({"shape": shape, "addresses": dict(addresses), "stream": stream_handle})
        self.engine.log.append(("execute", shape))
        return True


class FakeContextV3(FakeContextBase):
    def set_input_shape(self, name, shape):
        return self._set_shape(name, shape)

    def get_tensor_shape(self, name):
        spec = self.engine._spec(name)
        return self.input_shapes.get(name, spec.shape) if spec.is_input else self._out_shape(spec)

    def set_tensor_address(self, name, ptr):
        self.engine._spec(name)
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        if set(self.addresses) != {s.name for s in self.engine.specs}:
            return False  # TensorRT 10 refuses to run with an IO tensor address unset
        return self._run(self.addresses, stream_handle)


class FakeEngineV3(FakeEngineBase):
    """TensorRT 10 name-based engine API."""

    @property
    def num_io_tensors(self):
        return len(self.specs)

    def get_tensor_name(self, i):
        return self.specs[i].name

    def get_tensor_mode(self, name):
        return FakeIOMode.INPUT if self._spec(name).is_input else FakeIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._spec(name).dtype

    def get_tensor_shape(self, name):
        return self._spec(name).shape

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        spec = self._spec(name)
        assert spec.is_input, "TensorRT only has profile shapes for inputs"
        return list(spec.profile)

    def create_execution_context(self):
        ctx = FakeContextV3(self)
        self.contexts.append(ctx)
        return ctx


class FakeEngineV2(FakeEngineBase):
    """TensorRT 8.4 engine: bindings only (no num_io_tensors, no execute_async_v3), which gradad refuses."""

    def create_execution_context(self):
        ctx = FakeContextBase(self)
        self.contexts.append(ctx)
        return ctx


def make_fake_trt(cudart: FakeCudart, version: str = TRT_VERSION, specs=None, bindings_api=False):
    """A fake `tensorrt` module whose Runtime deserialises ENGINE_BYTES into a fake engine."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = FakeLogger
    trt.DataType = FakeDataType
    trt.TensorIOMode = FakeIOMode
    trt.float32, trt.float16, trt.int32 = FakeDataType.FLOAT, FakeDataType.HALF, FakeDataType.INT32
    trt.nptype = lambda dt: NP[dt]
    trt.log = []  # (event, detail) in call order, shared with engines
    trt.engines = []
    engine_cls = FakeEngineV2 if bindings_api else FakeEngineV3

    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, FakeLogger)

        def deserialize_cuda_engine(self, data):
            trt.log.append(("deserialize", len(data)))
            if bytes(data) != ENGINE_BYTES:
                return None  # what real TensorRT does with a foreign/corrupt plan
            engine = engine_cls(specs or default_specs(), cudart, trt.log)
            trt.engines.append(engine)
            return engine

    trt.Runtime = Runtime
    return trt


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


def make_bundle(root: Path, stamps: list[dict[str, Any]]) -> tuple[Path, Bundle]:
    bundle = root / "bundle"
    bundle.mkdir()
    files = {}
    for s in stamps:
        (bundle / s["file"]).write_bytes(ENGINE_BYTES)
        files[s["file"]] = FileEntry.of(bundle / s["file"])
    return bundle, minimal_bundle(bundle, H, W, files, [EngineStamp.from_json(s) for s in stamps])


def test_load_picks_the_matching_engine(tmp_path):
    stale = stamp(trt_version="8.6.1")
    good = stamp()
    bundle, manifest = make_bundle(tmp_path, [good, stale, stamp("fp32")])
    cudart = FakeCudart()
    backend = load_tensorrt_backend(manifest, "fp16", trt=make_fake_trt(cudart), cudart=cudart, gpu=GPU)
    assert backend.engine_path == bundle / good["file"]
    assert backend.name == "tensorrt" and backend.max_batch == MAX_BATCH
    x = images(2)
    np.testing.assert_allclose(backend.infer(x)[0], expected(x)[0], rtol=1e-6)
    backend.close()


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


class FakeGraph:
    def __init__(self, ops: list) -> None:
        self.ops = ops


class GraphCudart(FakeCudart):
    """FakeCudart plus stream capture: an execute during capture is recorded, a graph launch replays it."""

    class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self, fail_capture: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.capturing: dict[int, list] = {}
        self.execs: dict[int, FakeGraph] = {}
        self.fail_capture = fail_capture

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.calls.append(("cudaStreamBeginCapture", int(stream), mode))
        if self.fail_capture:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.capturing[int(stream)] = []
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamEndCapture", int(stream)))
        return (cudaError_t.cudaSuccess, FakeGraph(self.capturing.pop(int(stream))))

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        self.calls.append(("cudaGraphInstantiate",))
        exec_ = FakeGraph(list(graph.ops))
        self.execs[id(exec_)] = exec_
        return (cudaError_t.cudaSuccess, exec_)

    def cudaGraphLaunch(self, exec_, stream):  # noqa: N802
        self.calls.append(("cudaGraphLaunch", int(stream)))
        if id(exec_) not in self.execs:
            return (cudaError_t.cudaErrorInvalidValue,)
        for op in exec_.ops:
            op()
        return (cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        self.calls.append(("cudaGraphDestroy",))
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, exec_):  # noqa: N802
        self.calls.append(("cudaGraphExecDestroy",))
        return (cudaError_t.cudaSuccess if self.execs.pop(id(exec_), None) else cudaError_t.cudaErrorInvalidValue,)


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
    x = uint8_images(3, 9)  # another batch size: re-captured
    np.testing.assert_allclose(backend.infer(x)[0], expected(x.astype(np.float32))[0], rtol=1e-6)
    assert cudart.count("cudaGraphInstantiate") == 2 and cudart.count("cudaGraphExecDestroy") == 1
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


def test_no_cuda_graphs_without_capture_calls(engine_file):
    plain, _, _ = make_backend(engine_file)  # a cuda-python without stream capture
    assert not plain.cuda_graphs
