"""TensorRT backend: runs a bundle's engine (``<engine>.plan``) on the GPU of an RTX PC or a Jetson.

An engine only runs on the TensorRT version and GPU it was built for: :func:`load_tensorrt_backend` checks the
engine stamp in ``bundle.json`` and the file's hash before anything is deserialised, and refuses a stale engine with
the command that rebuilds it. Never imports torch or timm.

One batch: uint8 frames -> pinned host input -> async H2D -> set the input shape, bind the IO tensors -> enqueue on
the slot's CUDA stream (or launch its captured CUDA graph) -> async D2H -> stream sync -> float32 copies.
:meth:`TensorRTBackend.submit` returns before the sync, :meth:`~TensorRTBackend.collect` waits for it. Each of the
``in_flight`` slots has its own execution context, stream and buffers (allocated once, for the largest batch), so
the pipelined loop overlaps batch k+1's copies and kernels with batch k's host work. With ``cuda_graphs`` the first
enqueue of a batch size on a slot runs normally and is then captured into a graph that later batches of that size
launch (a failed capture turns graphs off with a log line). Only the name-based API (``execute_async_v3``,
TensorRT 8.5-10.x) is used; an older TensorRT is refused with one line.

Device memory and streams come from cuda-python, not pycuda: NVIDIA maintains it, ships binary wheels for x86-64
and aarch64 (pycuda compiles against the local CUDA toolkit on a Jetson), every call returns its CUDA error (so a
failure names it and :meth:`TensorRTBackend.close` frees exactly what was allocated), and it uses the runtime API's
primary context, TensorRT's own, so no context is pushed or popped. ``trt`` and ``cudart`` can be injected (the
glue tests pass fakes). A backend is not thread-safe: give each thread its own.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradad.bundle import Bundle, Precision
from gradad.errors import GradError
from gradad.engine_trust import is_trusted, untrusted_message
from gradad.runtime.backend import BackendError, UntrustedEngineError
from gradad.runtime.preprocess import as_input_dtype
from gradad.runtime.tensorrt_device import (TensorRTUnavailable, engine_matches_device, gpu_identity,
                                            import_cudart, import_tensorrt, rebuild_command, tensorrt_too_old)

log = logging.getLogger(__name__)

SCORE_OUTPUT = "score"
MAP_OUTPUT = "anomaly_map"

# numpy dtypes for TensorRT DataType member names (used when trt.nptype is missing or fails).
_DTYPE_BY_NAME = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


# ------------------------------------------------------------------------------------------- cuda-python helpers


def cuda_error_name(cudart: Any, err: Any) -> str:
    """``"cudaErrorMemoryAllocation (out of memory)"`` for a cudaError_t."""
    name = getattr(err, "name", None)
    if not isinstance(name, str):
        try:
            code, raw = cudart.cudaGetErrorName(err)
            name = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
        except Exception:  # noqa: BLE001 - the name is a courtesy; the number still identifies it
            name = f"CUDA error {int(err) if isinstance(err, int) else err}"
    try:
        code, raw = cudart.cudaGetErrorString(err)
        text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
        if text and text != name:
            return f"{name} ({text})"
    except Exception:  # noqa: BLE001
        pass
    return name


def _cuda_ok(cudart: Any, result: Any, what: str) -> Any:
    """Check a cuda-python call's ``(cudaError_t, *values)`` result; return its value(s).

    Raises BackendError naming the call and the CUDA error.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA {what} failed: {cuda_error_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _native_handle(obj: Any) -> int:
    """The integer handle of a cuda-python object (e.g. a cudaStream_t) for TensorRT's ``stream_handle``."""
    if isinstance(obj, int):
        return int(obj)
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # type: ignore[import-not-found]
    except ImportError:  # cuda-python < 12.9, or not installed (fake cudart in the tests)
        return int(obj)
    try:
        return int(get_cuda_native_handle(obj))
    except (TypeError, ValueError):
        return int(obj)


def _pinned_view(ptr: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """A writable 1-D numpy view of ``nbytes`` of page-locked host memory at ``ptr``."""
    raw = (ctypes.c_uint8 * nbytes).from_address(int(ptr))
    return np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize)


#: cuda-python calls CUDA-graph capture needs (all must exist, else graphs stay off).
_GRAPH_CALLS = ("cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphLaunch",
                "cudaGraphExecDestroy", "cudaGraphDestroy")

# ---------------------------------------------------------------------------------------------- TensorRT helpers


def _np_dtype(trt: Any, trt_dtype: Any, tensor: str) -> np.dtype:
    nptype = getattr(trt, "nptype", None)
    if callable(nptype):
        try:
            return np.dtype(nptype(trt_dtype))
        except (TypeError, KeyError, ValueError):
            pass
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1].upper()
    if name in _DTYPE_BY_NAME:
        return np.dtype(_DTYPE_BY_NAME[name])
    raise BackendError(f"tensor {tensor!r} has TensorRT data type {trt_dtype}, which this runtime cannot read")


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


@dataclass(frozen=True)
class _IOTensor:
    """One engine input/output: name, host dtype and the shape of one batch item (the batch axis removed)."""

    name: str
    dtype: np.dtype
    sample_shape: tuple[int, ...]

    def batch_nbytes(self, n: int) -> int:
        return n * math.prod(self.sample_shape) * self.dtype.itemsize


@dataclass
class _Buffer:
    """A slot's pinned host and device memory for one IO tensor, sized for the engine's largest batch."""

    host_ptr: int
    device_ptr: int
    host: np.ndarray | None  # flat view of the pinned host memory (None once freed)


@dataclass
class _Slot:
    """One in-flight batch's resources: execution context, CUDA stream, IO buffers, captured graphs."""

    index: int
    context: Any
    stream: Any
    buffers: dict[str, _Buffer]  # by tensor name
    pending: int | None = None  # batch size submitted and not collected yet
    # One instantiated CUDA graph per batch size (at most max_batch of them): a live run's batches hold whatever
    # frames are queued (1..--batch), and a single cached graph would be re-captured on nearly every batch.
    graphs: dict[int, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- The backend


class TensorRTBackend:
    """images (N, 3, H, W) uint8 RGB (or float32 0..255) -> (scores (N,), maps (N, H, W)) with one TensorRT engine.

    ``trt``/``cudart`` default to the installed modules (TensorRTUnavailable when absent); each of the ``in_flight``
    slots holds one submitted batch; ``cuda_graphs`` captures each batch size's enqueue where possible.
    ``max_batch``/``min_batch`` are the optimisation profile's limits; ``api`` is the one execution API used.
    ``expected_sha256``: the bytes read must hash to this (the value the bundle recorded and the trust list holds).
    ``precision`` (the engine stamp's, given by :func:`load_tensorrt_backend`) makes :attr:`name`
    ``tensorrt:<precision>:<engine file>``, like ONNX Runtime's ``onnxruntime:<provider>:<file>``: grad-calibrate
    records it, and grad-run warns when thresholds calibrated on one engine meet another (INT8 moves scores).
    """

    name = "tensorrt"  # without a precision (an engine file opened directly)
    api = "tensors-v3"

    def __init__(self, engine_path: str | Path, input_name: str = "image", trt: Any = None,
                 cudart: Any = None, in_flight: int = 1, cuda_graphs: bool = True,
                 expected_sha256: str | None = None, precision: str | None = None) -> None:
        # Everything close() looks at exists before anything can fail.
        self._closed = False
        if precision:
            self.name = f"tensorrt:{precision}:{Path(engine_path).name}"
        self._slots: list[_Slot] = []
        self._streams: list[Any] = []
        self._host_ptrs: list[int] = []
        self._device_ptrs: list[int] = []
        self._next_slot = 0
        self.in_flight = max(1, int(in_flight))
        self._expected_sha256 = expected_sha256
        self.cuda_graphs = False  # set in _load: wanted, and possible with this TensorRT/cuda-python
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self.engine_path = Path(engine_path)
        self.input_name = input_name
        self._trt = import_tensorrt() if trt is None else trt
        self._cudart = import_cudart() if cudart is None else cudart
        if not self.engine_path.is_file():
            raise BackendError(f"TensorRT engine not found: {self.engine_path}")
        try:
            self._load(cuda_graphs)
        except BaseException as exc:
            self.close()
            if isinstance(exc, GradError) or not isinstance(exc, Exception):
                raise
            # TensorRT's bindings raise plain RuntimeError/TypeError: keep one clear line.
            raise BackendError(f"TensorRT cannot load {self.engine_path}: {exc}") from exc

    # ---- set-up --------------------------------------------------------------------------

    def _load(self, cuda_graphs: bool) -> None:
        trt, path = self._trt, self.engine_path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BackendError(f"cannot read TensorRT engine {path}: {exc.strerror or exc}") from None
        if self._expected_sha256 and hashlib.sha256(data).hexdigest() != self._expected_sha256:
            # the bytes TensorRT gets are the ones that were checked (and trusted), not a file swapped in since
            raise BackendError(f"TensorRT engine {path} changed while it was being loaded; not loaded")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BackendError(
                f"TensorRT {getattr(trt, '__version__', '?')} could not deserialise {path} (see the TensorRT "
                "messages above): the engine is corrupt or was built by another TensorRT version or for another "
                f"GPU; rebuild it on this device with `{rebuild_command(str(path.parent))}`"
            )
        context = self._context = self._new_context(1)
        if not (hasattr(self._engine, "num_io_tensors") and hasattr(context, "execute_async_v3")):
            raise BackendError(tensorrt_too_old(getattr(trt, "__version__", "?")))
        self._describe_tensors(context)
        self._fit_in_flight_to_profiles()
        self.input_dtype = self._input.dtype
        self.cuda_graphs = cuda_graphs and all(hasattr(self._cudart, f) for f in _GRAPH_CALLS)
        for i in range(self.in_flight):
            self._slots.append(self._new_slot(i, context if i == 0 else self._new_context(i + 1)))
        log.info(
            "TensorRT %s engine %s (%s API): input %s %s (N, 3, %d, %d) batch %d..%d; outputs %s; %d slot(s), "
            "CUDA graphs %s", getattr(trt, "__version__", "?"), path.name, self.api, self.input_name,
            self._input.dtype, *self.input_hw, self.min_batch, self.max_batch,
            ", ".join(f"{t.name} {t.dtype} {t.sample_shape}" for t in self._outputs), self.in_flight,
            "on" if self.cuda_graphs else "off")

    def _fit_in_flight_to_profiles(self) -> None:
        """A dynamic-shape engine runs at most one batch per optimisation profile at once: TensorRT requires every
        context in concurrent use to have its own (engines built before ``--profiles`` hold one)."""
        profiles = int(getattr(self._engine, "num_optimization_profiles", 1) or 1)
        if self._dynamic and self.in_flight > profiles:
            log.warning("TensorRT engine %s has %d optimisation profile(s): %d batch(es) in flight instead of %d "
                        "(rebuild with grad-export build --profiles %d for more)", self.engine_path.name, profiles,
                        profiles, self.in_flight, self.in_flight)
            self.in_flight = profiles

    def _new_context(self, number: int) -> Any:
        context = self._engine.create_execution_context()
        if context is None:
            what = "an execution context" if number == 1 else f"execution context {number}"
            raise BackendError(f"TensorRT could not create {what} for {self.engine_path} (out of GPU memory?)")
        return context

    def _profile(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of an input in optimisation profile 0."""
        engine = self._engine
        if hasattr(engine, "get_tensor_profile_shape"):
            shapes = engine.get_tensor_profile_shape(name, 0)
        else:  # TensorRT 8.5/8.6: (profile_index, tensor name)
            shapes = engine.get_profile_shape(0, name)
        return tuple(_dims(s) for s in shapes)

    def _set_input_shape(self, shape: tuple[int, ...], context: Any) -> None:
        if context.set_input_shape(self._input.name, shape) is False:
            raise BackendError(f"TensorRT rejected input shape {shape} for {self._input.name!r} of "
                               f"{self.engine_path.name} (its optimisation profile allows batch "
                               f"{self.min_batch}..{self.max_batch})")

    def _describe_tensors(self, context: Any) -> None:
        """The one image input (batch range and size from its profile) and the outputs' per-image shapes."""
        trt, engine, path = self._trt, self._engine, self.engine_path
        names = [engine.get_tensor_name(i) for i in range(int(engine.num_io_tensors))]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if self.input_name not in inputs:
            raise BackendError(f"TensorRT engine {path.name} has no input named {self.input_name!r} "
                               f"(its inputs: {', '.join(inputs) or 'none'})")
        if len(inputs) != 1:
            raise BackendError(f"TensorRT engine {path.name} has {len(inputs)} inputs ({', '.join(inputs)}); "
                               "a gradad model has exactly one image input")
        name = inputs[0]
        shape = _dims(engine.get_tensor_shape(name))
        if len(shape) != 4 or shape[1] not in (3, -1):
            raise BackendError(f"input {name!r} of {path.name} has shape {list(shape)}; expected (N, 3, H, W)")
        self._dynamic = -1 in shape
        pmin, _popt, pmax = self._profile(name) if self._dynamic else (shape, shape, shape)
        if -1 in pmax or pmax[1] != 3:
            raise BackendError(f"input {name!r} of {path.name} has no usable optimisation profile "
                               f"(max shape {list(pmax)})")
        self.max_batch = int(pmax[0])
        self.min_batch = max(1, int(pmin[0]))
        self._input_hw = (int(pmax[2]), int(pmax[3]))
        self._input = _IOTensor(name, _np_dtype(trt, engine.get_tensor_dtype(name), name), tuple(pmax[1:]))
        if self._dynamic:  # output shapes follow from the input shape: set the largest one and read them back
            self._set_input_shape(tuple(pmax), context)
        outputs = []
        for out in (n for n in names if n != name):
            full = _dims(context.get_tensor_shape(out))
            if not full or -1 in full or full[0] != self.max_batch:
                raise BackendError(f"output {out!r} of {path.name} has shape {list(full)} for a batch of "
                                   f"{self.max_batch}; expected a fixed shape with the batch first")
            outputs.append(_IOTensor(out, _np_dtype(trt, engine.get_tensor_dtype(out), out), tuple(full[1:])))
        self._outputs = outputs
        self._score, self._map = self._pick_outputs(outputs)

    def _pick_outputs(self, outputs: list[_IOTensor]) -> tuple[_IOTensor, _IOTensor]:
        """The score (one value per image) and anomaly map ((1, h, w) or (h, w) per image) outputs, by the names
        grad-export gives them."""
        by_name = {t.name: t for t in outputs}
        score, amap = by_name.get(SCORE_OUTPUT), by_name.get(MAP_OUTPUT)
        listing = ", ".join(f"{t.name} {list(t.sample_shape)}" for t in outputs) or "none"
        if score is None or amap is None:
            raise BackendError(f"TensorRT engine {self.engine_path.name} has no {SCORE_OUTPUT!r} and {MAP_OUTPUT!r} "
                               f"outputs (outputs per image: {listing}): not a gradad engine, rebuild it with "
                               "grad-export build")
        if math.prod(score.sample_shape) != 1:
            raise BackendError(f"TensorRT engine {self.engine_path.name} has no score output (one value per "
                               f"image; outputs per image: {listing})")
        if not (len(amap.sample_shape) == 2 or (len(amap.sample_shape) == 3 and amap.sample_shape[0] == 1)):
            raise BackendError(f"TensorRT engine {self.engine_path.name} has no anomaly map output "
                               f"((1, h, w) per image; outputs per image: {listing})")
        return score, amap

    def _new_slot(self, index: int, context: Any) -> _Slot:
        """A slot: its own stream and pinned + device buffers for every IO tensor at max_batch (allocated once)."""
        cudart = self._cudart
        stream = _cuda_ok(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._streams.append(stream)
        if self._dynamic and index > 0:  # context 0 uses profile 0; each further one its own
            if context.set_optimization_profile_async(index, _native_handle(stream)) is False:
                raise BackendError(f"TensorRT could not give execution context {index + 1} of "
                                   f"{self.engine_path.name} optimisation profile {index}")
            _cuda_ok(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        buffers = {}
        for t in (self._input, *self._outputs):
            nbytes = t.batch_nbytes(self.max_batch)
            host_ptr = int(_cuda_ok(cudart, cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes}) for {t.name!r}"))
            self._host_ptrs.append(host_ptr)
            device_ptr = int(_cuda_ok(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {t.name!r}"))
            self._device_ptrs.append(device_ptr)
            buffers[t.name] = _Buffer(host_ptr, device_ptr, _pinned_view(host_ptr, nbytes, t.dtype))
        return _Slot(index, context, stream, buffers)

    # ---- Backend protocol ----------------------------------------------------------------

    @property
    def input_hw(self) -> tuple[int, int]:
        return self._input_hw

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one batch of at most ``max_batch`` images (splitting larger batches is the caller's job).

        Returns float32 copies: scores (N,) and maps (N, h, w).
        """
        return self.collect(self.submit(images))

    def submit(self, images: np.ndarray) -> Any:
        """Start one batch on the next free slot and return at once; :meth:`collect` its handle later.

        ``images`` (N, 3, H, W), uint8 frames (float32 0..255 arrays are cast into the pinned input buffer).
        At most ``in_flight`` batches may be pending.
        """
        images = self._check_batch(images)
        n = int(images.shape[0])
        slot = self._slots[self._next_slot]
        if slot.pending is not None:
            raise BackendError(f"{self.in_flight} batch(es) already in flight on {self.engine_path.name}: collect "
                               "one before submitting another")
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        slot.pending = n
        if n == 0:
            return slot
        cudart, inp = self._cudart, slot.buffers[self._input.name]
        kinds = cudart.cudaMemcpyKind
        # Pinned staging buffer in the engine's input type (uint8 for schema-2 bundles: 1 byte per channel).
        # float frames are rounded and clipped like ONNX Runtime's path does (a plain copy truncates and wraps)
        inp.host[: n * math.prod(self._input.sample_shape)].reshape(images.shape)[...] = as_input_dtype(
            images, self._input.dtype)
        _cuda_ok(cudart, cudart.cudaMemcpyAsync(inp.device_ptr, inp.host_ptr, self._input.batch_nbytes(n),
                                                kinds.cudaMemcpyHostToDevice, slot.stream),
                 "cudaMemcpyAsync (input to GPU)")
        if self._dynamic:
            self._set_input_shape((n, *self._input.sample_shape), slot.context)
        self._enqueue(slot, n)
        for t in (self._score, self._map):
            buf = slot.buffers[t.name]
            _cuda_ok(cudart, cudart.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr, t.batch_nbytes(n),
                                                    kinds.cudaMemcpyDeviceToHost, slot.stream),
                     f"cudaMemcpyAsync ({t.name} to host)")
        return slot

    def collect(self, handle: Any) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a submitted batch and return float32 copies of its scores (N,) and maps (N, h, w)."""
        slot: _Slot = handle
        n, slot.pending = slot.pending, None
        map_hw = self._map.sample_shape[-2:]
        if not n:
            return np.zeros((0,), np.float32), np.zeros((0, *map_hw), np.float32)
        _cuda_ok(self._cudart, self._cudart.cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize (inference)")
        score, amap = slot.buffers[self._score.name].host, slot.buffers[self._map.name].host
        scores = score[: n * math.prod(self._score.sample_shape)].astype(np.float32)  # astype copies (FP16 -> FP32)
        maps = amap[: n * math.prod(self._map.sample_shape)].astype(np.float32).reshape(n, *map_hw)
        return scores, maps

    def _check_batch(self, images: np.ndarray) -> np.ndarray:
        if self._closed:
            raise BackendError(f"TensorRT backend for {self.engine_path.name} is closed")
        images = np.asarray(images)
        h, w = self.input_hw
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (h, w):
            raise BackendError(f"{self.engine_path.name} expects images of shape (N, 3, {h}, {w}) with N <= "
                               f"{self.max_batch}, got {tuple(images.shape)}")
        n = int(images.shape[0])
        if n > self.max_batch:
            raise BackendError(f"batch of {n} images exceeds the max batch {self.max_batch} of TensorRT engine "
                               f"{self.engine_path.name} (its optimisation profile); split the batch, or rebuild "
                               "the engine with a larger `grad-export build --max-batch`")
        if 0 < n < self.min_batch:
            raise BackendError(f"batch of {n} images is below the min batch {self.min_batch} of TensorRT engine "
                               f"{self.engine_path.name}")
        return images

    def _enqueue(self, slot: _Slot, n: int) -> None:
        """Run the engine on the slot's stream: its captured graph for this batch size, else a plain enqueue
        (then, with graphs on, capture one for the next batches of this size)."""
        graph_exec = slot.graphs.get(n) if self.cuda_graphs else None
        if graph_exec is not None:
            _cuda_ok(self._cudart, self._cudart.cudaGraphLaunch(graph_exec, slot.stream), "cudaGraphLaunch")
            return
        if not self._execute(slot):
            raise BackendError(f"TensorRT failed to enqueue {self.engine_path.name} for a batch of {n} "
                               "(see the TensorRT messages above)")
        if self.cuda_graphs:
            self._capture_graph(slot, n)

    def _execute(self, slot: _Slot) -> bool:
        for name, buf in slot.buffers.items():
            if slot.context.set_tensor_address(name, buf.device_ptr) is False:
                raise BackendError(f"TensorRT rejected the device address of tensor {name!r}")
        return slot.context.execute_async_v3(_native_handle(slot.stream)) is not False

    def _capture_graph(self, slot: _Slot, n: int) -> None:
        """Capture the slot's enqueue for batch ``n`` into a CUDA graph kept beside the slot's graphs for other
        sizes; on any failure, turn graphs off and destroy every slot's graphs (none will be launched again)."""
        cudart = self._cudart
        mode_enum = getattr(cudart, "cudaStreamCaptureMode", None)
        mode = getattr(mode_enum, "cudaStreamCaptureModeThreadLocal", 2)
        try:
            _cuda_ok(cudart, cudart.cudaStreamBeginCapture(slot.stream, mode), "cudaStreamBeginCapture")
            try:
                ok = self._execute(slot)
            finally:
                graph = _cuda_ok(cudart, cudart.cudaStreamEndCapture(slot.stream), "cudaStreamEndCapture")
            if not ok:
                raise BackendError("execute_async_v3 refused to run under stream capture")
            try:
                # stored before the template graph is destroyed: should that fail, _drop_graphs still frees it
                slot.graphs[n] = _cuda_ok(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            finally:
                _cuda_ok(cudart, cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            log.debug("captured a CUDA graph for batch %d on slot %d", n, slot.index)
        except (BackendError, TypeError) as exc:  # TypeError: a cuda-python whose graph calls take other arguments
            log.warning("CUDA graph capture unavailable (%s): plain enqueues from now on", exc)
            self.cuda_graphs = False
            self._drop_graphs()

    def _drop_graphs(self) -> None:
        """Destroy every slot's instantiated graphs (errors logged: this also runs from close())."""
        for slot in self._slots:
            while slot.graphs:
                _, graph_exec = slot.graphs.popitem()
                try:
                    _cuda_ok(self._cudart, self._cudart.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
                except Exception as exc:  # noqa: BLE001 - keep destroying the rest
                    log.warning("%s", exc)

    # ---- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the stream, every pinned and device buffer, the context and the engine (idempotent).

        CUDA errors here are logged, not raised: close() also runs from ``__del__``.
        """
        if not hasattr(self, "_host_ptrs"):  # __init__ never ran
            return
        self._closed = True
        cudart = getattr(self, "_cudart", None)

        def release(call: Any, arg: Any, what: str) -> None:
            try:
                _cuda_ok(cudart, call(arg), what)
            except Exception as exc:  # noqa: BLE001 - keep freeing the rest
                log.warning("%s", exc)

        for stream in self._streams:
            # An interrupted infer() may have copies in flight on the buffers about to be freed.
            release(cudart.cudaStreamSynchronize, stream, "cudaStreamSynchronize (close)")
        self._drop_graphs()  # before the streams they were captured on are destroyed
        for slot in self._slots:
            for buf in slot.buffers.values():
                buf.host = None  # no view may outlive the pinned memory
            slot.context = None
        while self._device_ptrs:
            release(cudart.cudaFree, self._device_ptrs.pop(), "cudaFree")
        while self._host_ptrs:
            release(cudart.cudaFreeHost, self._host_ptrs.pop(), "cudaFreeHost")
        while self._streams:
            release(cudart.cudaStreamDestroy, self._streams.pop(), "cudaStreamDestroy")
        self._slots = []
        # Context before engine before runtime (TensorRT's destruction order).
        self._context = None
        self._engine = None
        self._runtime = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.api}, batch {self.min_batch}..{self.max_batch}"
        return f"TensorRTBackend({self.engine_path.name}, {state})"


# ------------------------------------------------------------------------------------------------ Bundle loading


def _check_can_build(bundle_dir: Path, precision: str, trt: Any, gpu: dict[str, str] | None) -> None:
    """A bundle without an engine: raise TensorRTUnavailable when this machine could not build one either
    (grad-export build needs TensorRT, cuda-python and the GPU here), so the error does not suggest a build that
    then fails for the same reason."""
    try:
        if trt is None:
            import_tensorrt()
        if gpu is None:
            gpu_identity()  # building=True: where an engine must be built is the point here
    except TensorRTUnavailable as exc:
        raise TensorRTUnavailable(
            f"bundle {bundle_dir} has no {precision} TensorRT engine, and none can be built here: {exc}. Run its "
            f"ONNX model with --backend onnxruntime, or build the engine on the device that will run it (TensorRT "
            f"installed) with `{rebuild_command(str(bundle_dir), precision)}`") from None


def load_tensorrt_backend(
    bundle: Bundle,
    precision: str = "fp16",
    trt: Any = None,
    cudart: Any = None,
    gpu: dict[str, str] | None = None,
    in_flight: int = 1,
) -> TensorRTBackend:
    """The TensorRT backend for a bundle's engine of ``precision``, after checking that it fits this device.

    Refuses (BackendError) a bundle without such an engine and an engine stamped for another TensorRT
    version or GPU, both with the command that builds one; a modified engine file fails the hash check
    (BundleError); an engine not in this user's trust list is never deserialised (UntrustedEngineError). Without
    TensorRT, cuda-python or a GPU: TensorRTUnavailable. All are GradErrors.
    """
    bundle_dir = bundle.directory
    if precision not in list(Precision):
        raise BackendError(f"precision {precision!r}: choose one of {', '.join(p.value for p in Precision)}")
    stamps = bundle.engines_for(precision)
    if not stamps:
        _check_can_build(bundle_dir, precision, trt, gpu)
        raise BackendError(f"bundle {bundle_dir} has no {precision} TensorRT engine: build one on this device "
                           f"with {rebuild_command(str(bundle_dir), precision)}")
    trt = import_tensorrt() if trt is None else trt
    gpu = gpu_identity(building=False) if gpu is None else gpu
    trt_version = str(trt.__version__)
    stamp = None
    reasons = []
    for candidate in reversed(stamps):  # the newest build first
        reason = engine_matches_device(candidate, trt_version, gpu, bundle=str(bundle_dir))
        stale = candidate.stale_sources(bundle.files)
        if reason is None and stale:
            reason = (f"engine {candidate.file} was built from another version of {', '.join(stale)} (changed "
                      f"since the build); rebuild it with `{rebuild_command(str(bundle_dir), precision)}`")
        if reason is None:
            stamp = candidate
            break
        reasons.append(reason)
    if stamp is None:
        others = f" (and {len(reasons) - 1} other {precision} engine(s) for other devices)" if len(reasons) > 1 else ""
        raise BackendError(f"bundle {bundle_dir}: {reasons[0]}{others}")
    bundle.verify([stamp.file])
    if not is_trusted(bundle.files[stamp.file].sha256):
        rebuild = rebuild_command(str(bundle_dir), precision)
        raise UntrustedEngineError(untrusted_message(stamp.file, bundle_dir, rebuild))
    backend = TensorRTBackend(bundle.file(stamp.file), bundle.input.name, trt=trt, cudart=cudart,
                              in_flight=in_flight, expected_sha256=bundle.files[stamp.file].sha256,
                              precision=stamp.precision)
    want = bundle.input.hw
    if tuple(backend.input_hw) != want:
        backend.close()
        raise BackendError(f"engine {stamp.file} takes {backend.input_hw[0]}x{backend.input_hw[1]} images but "
                           f"bundle {bundle_dir} says {want[0]}x{want[1]}; rebuild it on this device with "
                           f"`{rebuild_command(str(bundle_dir), precision)}`")
    return backend
