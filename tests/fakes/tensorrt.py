"""One fake ``tensorrt`` module (builder and runtime APIs) and a fake cuda-python ``cudart``, for the glue tests.

These are NOT TensorRT: TensorRT and a GPU are not available where the test suite normally runs, so the glue
tests inject these stand-ins. :func:`make_fake_trt` returns one module with

* the **builder** side (``Builder``, ``OnnxParser``, builder config, optimisation profile, timing cache): every
  call our build code makes is recorded in ``trt.rec`` (network flags, parsed bytes, builder flags, per-layer
  precision, pool limits, profiles, timing cache) for ``tests/test_tensorrt_glue.py``;
* the **runtime** side (``Runtime`` deserialising :data:`ENGINE_BYTES` into an engine with the TensorRT 10
  name-based API, or the TensorRT 8.4 bindings-only API gradad refuses): its execution contexts read the input
  from :class:`FakeCudart`'s "device" memory and write deterministic outputs back (score = mean of each image,
  map = channel 0 / 255), for ``tests/test_tensorrt_backend_glue.py``.

:class:`FakeCudart` returns ``(cudaError_t, *values)`` like the real module; "pinned" host memory is a numpy
buffer whose real address is handed out, "device" memory a numpy buffer behind a fake pointer, and copies really
move bytes, so a wrong pointer, size or direction shows up as wrong numbers or an error. :class:`GraphCudart`
adds stream capture and CUDA-graph launch.
"""

from __future__ import annotations

import enum
import types
from typing import Any

import numpy as np

H = W = 16  # runtime engines: input (N, 3, H, W)
MAX_BATCH = 4
CHW = (3, 64, 64)  # builder networks: input (N, *CHW)
TRT_VERSION = "10.3.0"
ENGINE_BYTES = b"fake-serialized-engine"

# ------------------------------------------------------------------------------------------
# cudart
# ------------------------------------------------------------------------------------------


class cudaError_t(enum.IntEnum):  # noqa: N801 - the real name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100


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


# ------------------------------------------------------------------------------------------
# tensorrt: runtime side
# ------------------------------------------------------------------------------------------


class FakeDataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    UINT8 = 5
    INT64 = 8


class FakeIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class FakeLogger:
    WARNING = 2
    INFO = 3

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
    #: the optimisation profile in use: TensorRT (8.x's contract) gives the first context of an engine profile 0
    #: and a further one of a dynamic-shape engine none (-1) until set_optimization_profile_async; it cannot run
    profile = 0

    def set_optimization_profile_async(self, index, stream_handle):
        assert isinstance(stream_handle, int) and stream_handle in self.engine.cudart.streams
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        if any(c is not self and c.profile == index for c in self.engine.contexts):
            return False  # one context per profile: concurrent contexts must not share one
        self.profile = index
        return True

    def _run(self, addresses, stream_handle):
        if self.profile < 0:
            return False
        return super()._run(addresses, stream_handle)

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

    num_optimization_profiles = 2  # what grad-export build makes by default (--profiles)

    def create_execution_context(self):
        ctx = FakeContextV3(self)
        dynamic = any(-1 in s.shape for s in self.specs if s.is_input)
        if self.contexts and dynamic:
            ctx.profile = -1
        self.contexts.append(ctx)
        return ctx


class FakeEngineV2(FakeEngineBase):
    """TensorRT 8.4 engine: bindings only (no num_io_tensors, no execute_async_v3), which gradad refuses."""

    def create_execution_context(self):
        ctx = FakeContextBase(self)
        self.contexts.append(ctx)
        return ctx


# ------------------------------------------------------------------------------------------
# tensorrt: builder side
# ------------------------------------------------------------------------------------------


class FakeLayerType(enum.Enum):
    CONVOLUTION = 1
    ACTIVATION = 2
    GRID_SAMPLE = 42
    SHAPE = 7
    ELEMENTWISE = 8


class FakeTensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: FakeDataType) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype


class FakeLayer:
    def __init__(self, name: str, type_: FakeLayerType, out_dtypes: list[FakeDataType]) -> None:
        self.name = name
        self.type = type_
        self._outputs = [FakeTensor(f"{name}_out{i}", (-1,), d) for i, d in enumerate(out_dtypes)]
        self.precision: Any = None  # None = never set (real TRT: precision_is_set False)
        self.output_types: dict[int, Any] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, i: int) -> FakeTensor:
        return self._outputs[i]

    def set_output_type(self, i: int, dtype: Any) -> None:
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self, flags: int, layers: list[FakeLayer], inputs: list[FakeTensor]) -> None:
        self.flags = flags
        self._layers = layers
        self._inputs = inputs

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self._layers[i]

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    def get_input(self, i: int) -> FakeTensor:
        return self._inputs[i]


class FakeParserError:
    def __init__(self, desc: str, node_name: str = "", node_operator: str = "") -> None:
        self._desc, self._node, self._op = desc, node_name, node_operator

    def desc(self) -> str:
        return self._desc

    def node_name(self) -> str:
        return self._node

    def node_operator(self) -> str:
        return self._op


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data + b"|tuned"


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, Any, Any]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class FakeConfig:
    def __init__(self, rec: types.SimpleNamespace) -> None:
        self.rec = rec
        self.flags: set[Any] = set()
        self.pool_limits: dict[Any, int] = {}
        self.profiles: list[FakeProfile] = []
        self.timing_cache: FakeTimingCache | None = None
        rec.config = self

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool_limits[pool] = size

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        self.rec.timing_cache_inputs.append(bytes(data))
        return FakeTimingCache(data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.rec.set_timing_cache_calls.append(ignore_mismatch)
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


def default_layers() -> list[FakeLayer]:
    return [
        FakeLayer("/backbone/conv0/Conv", FakeLayerType.CONVOLUTION, [FakeDataType.FLOAT]),
        FakeLayer("/coord_local/conv1/Conv", FakeLayerType.CONVOLUTION, [FakeDataType.FLOAT]),
        FakeLayer("/coord_local/Tanh", FakeLayerType.ACTIVATION, [FakeDataType.FLOAT]),
        FakeLayer("/coord_local/Shape", FakeLayerType.SHAPE, [FakeDataType.INT64]),
        FakeLayer("/grid/GridSample", FakeLayerType.GRID_SAMPLE, [FakeDataType.FLOAT]),
        FakeLayer("/grid/GridSample_1", FakeLayerType.GRID_SAMPLE, [FakeDataType.FLOAT]),
        FakeLayer("/head/conv/Conv", FakeLayerType.CONVOLUTION, [FakeDataType.FLOAT]),
    ]


# ------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------


def make_fake_trt(
    cudart: FakeCudart | None = None,
    version: str = TRT_VERSION,
    *,
    specs: list[FakeTensorSpec] | None = None,
    bindings_api: bool = False,
    fp16_flag: bool = True,
    strongly_typed_value: int | None = 1,
    explicit_batch: bool = True,
    parse_ok: bool = True,
    parse_errors: tuple[FakeParserError, ...] = (),
    build_result: Any = b"engine-bytes",
    input_shape: tuple[int, ...] = (-1, *CHW),
    profiles: int | None = None,
) -> types.ModuleType:
    """A stand-in ``tensorrt`` module.

    Runtime: ``Runtime(logger).deserialize_cuda_engine(ENGINE_BYTES)`` gives an engine over ``cudart`` with
    ``specs`` (default :func:`default_specs`) and ``profiles`` optimisation profiles (default 2), the
    bindings-only API with ``bindings_api``; any other bytes give
    None (what TensorRT does with a foreign plan). ``trt.log`` and ``trt.engines`` record what happened.
    Builder: ``trt.rec`` records the calls; the other arguments shape the builder's enums, parser and result.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = FakeLogger
    trt.DataType = FakeDataType
    trt.TensorIOMode = FakeIOMode
    trt.float32, trt.float16, trt.int32, trt.int64 = (FakeDataType.FLOAT, FakeDataType.HALF, FakeDataType.INT32,
                                                      FakeDataType.INT64)
    trt.nptype = lambda dt: NP[dt]
    trt.log, trt.engines = [], []  # runtime: (event, detail) in call order; engines deserialised
    engine_cls = FakeEngineV2 if bindings_api else FakeEngineV3

    class Runtime:
        def __init__(self, logger: Any) -> None:
            assert isinstance(logger, FakeLogger)

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            trt.log.append(("deserialize", len(data)))
            if bytes(data) != ENGINE_BYTES:
                return None  # what real TensorRT does with a foreign/corrupt plan
            engine = engine_cls(specs or default_specs(), cudart, trt.log)
            if profiles is not None:
                engine.num_optimization_profiles = profiles
            trt.engines.append(engine)
            return engine

    trt.Runtime = Runtime
    _add_builder(trt, fp16_flag, strongly_typed_value, explicit_batch, parse_ok, parse_errors, build_result,
                 input_shape)
    return trt


def _add_builder(trt: types.ModuleType, fp16_flag: bool, strongly_typed_value: int | None, explicit_batch: bool,
                 parse_ok: bool, parse_errors: tuple[FakeParserError, ...], build_result: Any,
                 input_shape: tuple[int, ...]) -> None:
    """The builder half of the module; ``trt.rec`` records what our build code asked of it."""
    rec = types.SimpleNamespace(network_flags=[], parsed=[], config=None, timing_cache_inputs=[],
                                set_timing_cache_calls=[], builds=[], network=None)
    builder_flag_members = {"OBEY_PRECISION_CONSTRAINTS": 5, "TF32": 7}
    if fp16_flag:
        builder_flag_members["FP16"] = 0
    creation_members: dict[str, int] = {}
    if explicit_batch:
        creation_members["EXPLICIT_BATCH"] = 0
    if strongly_typed_value is not None:
        creation_members["STRONGLY_TYPED"] = strongly_typed_value
    layers = default_layers()

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> FakeNetwork:
            rec.network_flags.append(flags)
            rec.network = FakeNetwork(flags, layers, [FakeTensor("image", input_shape, FakeDataType.FLOAT)])
            return rec.network

        def create_builder_config(self) -> FakeConfig:
            return FakeConfig(rec)

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> Any:
            rec.builds.append((network, config))
            return build_result

    class OnnxParser:
        def __init__(self, network: FakeNetwork, logger: Any) -> None:
            self.network = network

        def parse(self, data: bytes, path: str | None = None) -> bool:
            rec.parsed.append((bytes(data), path))
            return parse_ok

        @property
        def num_errors(self) -> int:
            return len(parse_errors)

        def get_error(self, i: int) -> FakeParserError:
            return parse_errors[i]

    trt.rec, trt.Builder, trt.OnnxParser = rec, Builder, OnnxParser
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", builder_flag_members)
    trt.NetworkDefinitionCreationFlag = (enum.IntEnum("NetworkDefinitionCreationFlag", creation_members)
                                         if creation_members else types.SimpleNamespace())
    trt.LayerType = FakeLayerType
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE", DLA_MANAGED_SRAM="DLA")
