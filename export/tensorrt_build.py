"""Build a TensorRT engine from the bundle's ONNX model (DESIGN.md sections 5 and 6).

This module is the only place that talks to the TensorRT *builder*. It never imports torch.

Two FP16 routes, picked by what the installed TensorRT offers:

* ``"fp16-flag"`` (TensorRT 8.5 - 10.x): parse the FP32 ONNX, set ``BuilderFlag.FP16`` and
  ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``, and pin GridSample (and any layer whose name matches
  a configured pattern, e.g. the coordinate branch) to FP32: ``layer.precision`` and every output
  type. The FP16 flag is deprecated from TensorRT 10.12 but still present there.
* ``"strongly-typed-fp16-onnx"`` (TensorRT 11+, where ``BuilderFlag.FP16`` was removed): parse the
  FP16 ONNX (``model.fp16.onnx``, GridSample and coordinates already FP32 in the graph) into a
  network created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. Per-layer precision calls
  are not allowed on such a network, so none are made.

With ``fp16=False`` the FP32 ONNX is built as is (``"fp32"``).

INT8 (``int8=True``) is explicit quantisation only: the engine is built from the bundle's QDQ ONNX
(``model.int8.onnx``, ``grad-export quantize``), whose Q/DQ scales come from ONNX Runtime calibration; no
implicit calibrator is ever set. ``"int8-qdq-flags"`` (TensorRT 8.5 - 10.x): ``BuilderFlag.INT8`` (and FP16
where present, for the layers left unquantised) with the same FP32 pins as the FP16 route;
``"int8-qdq-strongly-typed"`` (TensorRT 11+, no INT8 flag): a strongly typed network, the QDQ nodes decide.

TensorRT versions: 8.5 to 10.x are supported and tested. :func:`check_tensorrt_version` refuses anything older
before any build work, in the words the runtime uses when it meets such a TensorRT: the runtime only drives
engines through the name-based tensor API (``execute_async_v3``) that TensorRT 8.5 introduced, so an engine built
on 8.4 could never be loaded, and 8.2 lacks builder calls used here (``set_memory_pool_limit``). A major version
above 10 (the TensorRT 11+ routes above) is built with a warning, not refused: the parity gate against ONNX
Runtime still decides whether its engine is kept.

An engine only runs on the TensorRT version and GPU it was built with: the file name and the stamp
returned by :func:`build_engine` record both, and :func:`engine_matches_device` is what the runtime
uses to refuse a stale engine. The ``trt`` and ``gpu`` arguments of :func:`build_engine` exist so
the glue can be tested with a fake ``tensorrt`` module on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gradad.bundle import Precision
from gradad.errors import ConfigError, GradError
from gradad.engine_trust import is_trusted, trust
from gradad.files import atomic_write_bytes
from gradad.runtime.tensorrt_device import (  # noqa: F401 - re-exported: the device side lives in the runtime
    TensorRTUnavailable,
    engine_matches_device,
    gpu_identity,
    MIN_TENSORRT_VERSION,
    import_tensorrt,
    rebuild_command,
    tensorrt_too_old,
)

log = logging.getLogger(__name__)

BUILD_MODE_FP16_FLAG = "fp16-flag"
BUILD_MODE_STRONGLY_TYPED = "strongly-typed-fp16-onnx"
BUILD_MODE_FP32 = "fp32"
BUILD_MODE_INT8_FLAGS = "int8-qdq-flags"
BUILD_MODE_INT8_STRONGLY_TYPED = "int8-qdq-strongly-typed"

#: Newest TensorRT major version gradad is tested on; a newer one builds with a warning (README "Supported TensorRT").
NEWEST_TESTED_TENSORRT_MAJOR = 10


@dataclass(frozen=True)
class EngineBuildConfig:
    """Settings for one TensorRT engine build.

    Attributes:
        fp16: build a mixed-precision FP16 engine (GridSample and coordinates stay FP32).
        min_batch, opt_batch, max_batch: the optimisation profile's batch sizes
            (``min_batch <= opt_batch <= max_batch``); TensorRT tunes kernels for ``opt_batch``.
        profiles: how many identical profiles the engine holds: the most batches the runtime keeps in flight.
        workspace_mib: builder workspace memory pool limit, in MiB.
        timing_cache: path of a TensorRT timing cache; read when present, written back after a
            successful build. ``None`` disables the persistent cache.
        fp32_layer_types: ``trt.LayerType`` member names forced to FP32 under the FP16 flag.
        fp32_layer_name_patterns: substrings of TensorRT layer names also forced to FP32 under the
            FP16 flag (e.g. the ONNX node-name prefix of the coordinate branch).
        fp32_layer_name_rule: optional predicate on a TensorRT layer name, also forced to FP32 under the FP16
            flag (``gradad.export.precision.keeps_fp32_name``: the rule the FP16 and INT8 ONNX use).
    """

    fp16: bool = True
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mib: int = 2048
    timing_cache: str | None = None
    fp32_layer_types: tuple[str, ...] = ("GRID_SAMPLE",)
    fp32_layer_name_patterns: tuple[str, ...] = ()
    fp32_layer_name_rule: Callable[[str], bool] | None = None
    int8: bool = False  # explicit-quantisation INT8 engine from the QDQ ONNX (overrides fp16)
    # identical optimisation profiles, one per execution context the runtime runs at once (grad-run --in-flight):
    # TensorRT requires every concurrently used context of a dynamic-shape engine to have its own
    profiles: int = 2

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    def validate(self) -> None:
        """Raise ConfigError for an impossible setting."""
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                "engine batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
                f"min_batch={self.min_batch}, opt_batch={self.opt_batch}, max_batch={self.max_batch}"
            )
        if self.profiles < 1:
            raise ConfigError(f"profiles must be >= 1 (one per batch in flight at run time), got {self.profiles}")
        if self.workspace_mib <= 0:
            raise ConfigError(f"workspace_mib must be positive, got {self.workspace_mib}")


# --------------------------------------------------------------------------------------------
# Names, versions, capabilities
# --------------------------------------------------------------------------------------------


def _sanitise(text: str) -> str:
    """Keep [A-Za-z0-9._-]; runs of anything else become one '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).strip()).strip("-") or "unknown"


def is_engine_filename(name: str) -> bool:
    """Whether ``name`` is one :func:`engine_filename` writes (only those are ever deleted from a bundle)."""
    return bool(re.fullmatch(r"model\.trt[\w.+-]*\.(?:fp16|fp32|int8)\.sm\d*\.[\w.+-]+\.plan", name))


def engine_filename(trt_version: str, gpu_name: str, compute_capability: str, precision: str) -> str:
    """Engine file name, e.g. ``model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan``."""
    if precision not in tuple(Precision):
        raise ValueError(f"precision must be 'fp16', 'fp32' or 'int8', got {precision!r}")
    sm = "sm" + re.sub(r"[^0-9]", "", str(compute_capability))
    return f"model.trt{_sanitise(trt_version)}.{precision}.{sm}.{_sanitise(gpu_name)}.plan"


def trt_version_tuple(trt: Any) -> tuple[int, int]:
    """(major, minor) of a tensorrt module (``trt.__version__`` like ``"10.3.0"``; a missing minor reads as 0).

    Raises:
        TensorRTUnavailable: the version cannot be read.
    """
    match = re.match(r"\s*(\d+)(?:\.(\d+))?", str(getattr(trt, "__version__", "")))
    if not match:
        raise TensorRTUnavailable(
            f"cannot read the TensorRT version (tensorrt.__version__={getattr(trt, '__version__', None)!r})"
        )
    return int(match.group(1)), int(match.group(2) or 0)


def trt_major_version(trt: Any) -> int:
    """Major version of a tensorrt module (``trt.__version__`` like ``"10.3.0"``)."""
    return trt_version_tuple(trt)[0]


def check_tensorrt_version(trt: Any) -> str:
    """Refuse a TensorRT gradad cannot build a usable engine with; warn once about one newer than tested.

    Called right after TensorRT is imported and before any build work: on TensorRT 8.4 the build would otherwise
    take minutes on a Jetson and write a timing cache before the engine is refused at load time, and on 8.2 it
    stops with an AttributeError (no ``set_memory_pool_limit``). The refusal reads as the runtime's own
    (``TensorRTBackend`` checks the engine's API, which is only known once an engine exists).

    Returns:
        ``trt.__version__`` as a string.

    Raises:
        TensorRTUnavailable: older than :data:`MIN_TENSORRT_VERSION`, or no readable version.
    """
    version = str(getattr(trt, "__version__", "?"))
    major, minor = trt_version_tuple(trt)
    if (major, minor) < MIN_TENSORRT_VERSION:
        raise TensorRTUnavailable(tensorrt_too_old(version))
    if major > NEWEST_TESTED_TENSORRT_MAJOR:
        _warn_untested_tensorrt(version)
    return version


@functools.lru_cache(maxsize=None)
def _warn_untested_tensorrt(version: str) -> None:
    """Once per version and process: build_bundle_engine and build_engine both check, benchmarks build several."""
    log.warning("TensorRT %s is newer than the tested range (%s to %d.x): building anyway (grad-export build keeps "
                "the engine only if it matches ONNX Runtime on the parity images)", version,
                ".".join(map(str, MIN_TENSORRT_VERSION)), NEWEST_TESTED_TENSORRT_MAJOR)


def supports_fp16_flag(trt: Any) -> bool:
    """True when ``trt.BuilderFlag.FP16`` exists (TensorRT <= 10.x; removed in 11)."""
    return _has_flag(trt, "FP16")


def _has_flag(trt: Any, name: str) -> bool:
    flags = getattr(trt, "BuilderFlag", None)
    return flags is not None and getattr(flags, name, None) is not None


def select_build_mode(trt: Any, cfg: EngineBuildConfig, onnx_path: Path, fp16_onnx_path: Path | None,
                      int8_onnx_path: Path | None) -> tuple[str, Path, bool]:
    """(build mode, ONNX file to parse, strongly typed) for this TensorRT and precision."""
    if cfg.int8:
        if int8_onnx_path is None:
            raise GradError("an INT8 engine is built from the bundle's QDQ model (explicit quantisation), and the "
                            "bundle has none: run `grad-export quantize <bundle> --calib GOOD_DIR` first")
        if _has_flag(trt, "INT8"):
            return BUILD_MODE_INT8_FLAGS, Path(int8_onnx_path), False
        return BUILD_MODE_INT8_STRONGLY_TYPED, Path(int8_onnx_path), True
    if not cfg.fp16:
        return BUILD_MODE_FP32, onnx_path, False
    if supports_fp16_flag(trt):
        return BUILD_MODE_FP16_FLAG, onnx_path, False
    if fp16_onnx_path is None:
        raise GradError(
            f"TensorRT {trt.__version__} has no FP16 builder flag: an FP16 engine must be built from "
            "the FP16 ONNX (model.fp16.onnx), and none was given; re-export the bundle with its FP16 ONNX: "
            "`grad-export onnx CHECKPOINT -o <bundle> --overwrite`"
        )
    return BUILD_MODE_STRONGLY_TYPED, Path(fp16_onnx_path), True


def _set_precision_flags(trt: Any, config: Any, network: Any, mode: str, cfg: EngineBuildConfig,
                         source: Path) -> list[str]:
    """Builder flags and FP32 pins of the FP16-flag and INT8-flag routes; returns the pinned layers."""
    if mode not in (BUILD_MODE_FP16_FLAG, BUILD_MODE_INT8_FLAGS):
        return []
    if mode == BUILD_MODE_INT8_FLAGS:
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ scales from the ONNX; no int8_calibrator is set
    if supports_fp16_flag(trt):
        config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    forced = _force_fp32_layers(trt, network, cfg)
    log.info("Pinned %d layer(s) to FP32: %s", len(forced), ", ".join(forced) or "none")
    if "GRID_SAMPLE" in cfg.fp32_layer_types and not any(
        network.get_layer(i).type == trt.LayerType.GRID_SAMPLE for i in range(network.num_layers)
    ):
        log.warning("No GridSample layer found in %s; is this the GRAD model?", source)
    return forced


def _network_flags(trt: Any, strongly_typed: bool) -> int:
    """Bit mask for ``builder.create_network``: EXPLICIT_BATCH only on TRT < 10."""
    flags = 0
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if trt_major_version(trt) < 10:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed:
        member = getattr(creation, "STRONGLY_TYPED", None) if creation is not None else None
        if member is not None:
            flags |= 1 << int(member)
        elif trt_major_version(trt) < 11:
            raise TensorRTUnavailable(
                f"TensorRT {trt.__version__} has neither the FP16 builder flag nor strongly typed "
                "networks; install TensorRT 8.5-10.x or 11+"
            )
        # TensorRT 11+: every network is strongly typed; nothing to set.
    return flags


# --------------------------------------------------------------------------------------------
# Build steps
# --------------------------------------------------------------------------------------------


def _parse_onnx(parser: Any, onnx_path: Path) -> None:
    """Parse the ONNX file; one GradError line naming the file and listing every parser error."""
    try:
        data = onnx_path.read_bytes()
    except OSError as exc:
        raise GradError(f"cannot read ONNX model {onnx_path}: {exc.strerror or exc}") from None
    ok = parser.parse(data, path=str(onnx_path))
    n_errors = int(getattr(parser, "num_errors", 0) or 0)
    if ok and n_errors == 0:
        return
    messages = [_parser_error_text(parser.get_error(i)) for i in range(n_errors)]
    detail = "; ".join(m for m in messages if m) or "no error details reported"
    raise GradError(f"TensorRT could not parse ONNX model {onnx_path}: {detail}")


def _parser_error_text(err: Any) -> str:
    """One readable string for a TensorRT ParserError (``desc()`` plus node name/operator)."""
    desc = err.desc() if callable(getattr(err, "desc", None)) else str(err)
    where = []
    for attr in ("node_name", "node_operator"):
        fn = getattr(err, attr, None)  # TensorRT >= 10 only
        if callable(fn):
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - extra detail only
                value = ""
            if value:
                where.append(str(value))
    desc = " ".join(str(desc).split())
    return f"[{' '.join(where)}] {desc}" if where else desc


def _find_input(network: Any, input_name: str) -> Any:
    names = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name == input_name:
            return tensor
        names.append(tensor.name)
    raise GradError(f"the ONNX model has no input named {input_name!r} (its inputs: {', '.join(names) or 'none'})")


def _check_input_shape(tensor: Any, input_chw: tuple[int, int, int], cfg: EngineBuildConfig) -> None:
    """Refuse a profile that cannot fit the network's input (fixed batch, other C/H/W)."""
    try:
        shape = tuple(int(d) for d in tensor.shape)
    except TypeError:
        return
    if len(shape) != 4:
        raise GradError(f"input {tensor.name!r} has shape {list(shape)}; expected (N, C, H, W)")
    for got, want, axis in zip(shape[1:], input_chw, "CHW"):
        if got >= 0 and got != want:
            raise GradError(
                f"input {tensor.name!r} has {axis}={got} but the bundle says {axis}={want} "
                f"(input shape {list(shape)})"
            )
    batch = shape[0]
    if batch >= 0 and not cfg.min_batch == cfg.max_batch == batch:
        raise GradError(
            f"input {tensor.name!r} has a fixed batch of {batch}; re-export the ONNX with a dynamic "
            f"batch axis or build with min_batch=opt_batch=max_batch={batch}"
        )


def _float_types(trt: Any) -> set[Any]:
    return {t for t in (getattr(trt, n, None) for n in ("float32", "float16", "bfloat16")) if t is not None}


def _force_fp32_layers(trt: Any, network: Any, cfg: EngineBuildConfig) -> list[str]:
    """Pin matching layers to FP32 (precision and every output type); return their names."""
    wanted_types = []
    for type_name in cfg.fp32_layer_types:
        member = getattr(trt.LayerType, type_name, None)
        if member is None:
            raise ConfigError(
                f"fp32_layer_types: {type_name!r} is not a TensorRT LayerType in TensorRT {trt.__version__}"
            )
        wanted_types.append(member)
    floats = _float_types(trt)
    forced: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        by_type = layer.type in wanted_types
        by_name = any(p in (layer.name or "") for p in cfg.fp32_layer_name_patterns) or (
            cfg.fp32_layer_name_rule is not None and cfg.fp32_layer_name_rule(layer.name or ""))
        if not (by_type or by_name):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not by_type and any(out.dtype not in floats for out in outputs):
            # Shape/index arithmetic (INT32/INT64/BOOL) in the coordinate branch: leave it alone.
            log.debug("not forcing non-float layer %r to FP32", layer.name)
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        forced.append(layer.name)
    return forced


def _setup_timing_cache(config: Any, path: Path | None) -> Any:
    """Create the config's timing cache from ``path`` (when it exists) and attach it."""
    if path is None:
        return None
    data = b""
    if path.is_file():
        data = path.read_bytes()
        if is_trusted(hashlib.sha256(data).hexdigest()):
            log.info("Reusing TensorRT timing cache %s (%d bytes)", path, len(data))
        else:  # the builder deserialises it: a cache from elsewhere (a bundle someone sent) is not read
            log.warning("Ignoring TensorRT timing cache %s: not written on this machine (replaced after the build)",
                        path)
            data = b""
    try:
        cache = config.create_timing_cache(data)
        ok = config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception as exc:  # noqa: BLE001 - a bad cache must not stop the build
        log.debug("timing cache %s rejected: %s", path, exc)
        ok = False
    if ok is False:
        log.warning("Timing cache %s does not match this TensorRT/GPU; starting a fresh one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _add_profiles(builder: Any, config: Any, input_name: str, chw: tuple[int, int, int],
                  cfg: EngineBuildConfig) -> dict[str, list[int]]:
    """Add ``cfg.profiles`` identical optimisation profiles over the batch axis; returns their min/opt/max shapes."""
    shapes = {key: [batch, *chw] for key, batch in
              (("min", cfg.min_batch), ("opt", cfg.opt_batch), ("max", cfg.max_batch))}
    for _ in range(cfg.profiles):
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
        config.add_optimization_profile(profile)
    return shapes


def _save_timing_cache(config: Any, cache_path: Path) -> None:
    """Write the builder's timing cache (atomically) and add its hash to the trust list: the next build reads it
    only if it is the file this build wrote."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes(memoryview(cache.serialize()))
    atomic_write_bytes(cache_path, data, fsync=True)
    trust(hashlib.sha256(data).hexdigest(), cache_path, "timing cache")
    log.info("Saved TensorRT timing cache %s", cache_path)


def build_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    input_name: str,
    input_chw: tuple[int, int, int],
    cfg: EngineBuildConfig,
    fp16_onnx_path: str | os.PathLike[str] | None = None,
    trt: Any = None,
    gpu: dict[str, str] | None = None,
    int8_onnx_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build a TensorRT engine and write it to ``out_dir/engine_filename(...)``.

    Args:
        onnx_path: the FP32 ONNX model (``model.onnx``).
        out_dir: folder the engine goes to (the bundle).
        input_name: name of the image input (``"image"``).
        input_chw: (C, H, W) of that input; the batch axis gets the cfg's optimisation profile.
        cfg: build settings.
        fp16_onnx_path: the FP16 ONNX (``model.fp16.onnx``); needed for FP16 where TensorRT has no
            FP16 builder flag (11+).
        int8_onnx_path: the INT8 QDQ ONNX (``model.int8.onnx``); needed when ``cfg.int8``.
        trt: the tensorrt module (default: :func:`import_tensorrt`); a fake in the glue tests.
        gpu: ``{"name", "compute_capability"}`` (default: :func:`gpu_identity`).

    Returns:
        The stamp for bundle.json: file, tensorrt_version, gpu_name, compute_capability, precision,
        profile (min/opt/max shapes), build_mode, workspace_mib, build_seconds, timing_cache and
        fp32_layers (layers pinned to FP32 under the FP16 flag).

    Raises:
        TensorRTUnavailable: no TensorRT, a TensorRT older than 8.5, or no GPU.
        GradError: unreadable/unparsable ONNX, missing FP16 ONNX, wrong input, failed build.
        ConfigError: invalid cfg.
    """
    cfg.validate()
    trt = import_tensorrt() if trt is None else trt
    trt_version = check_tensorrt_version(trt)  # before any builder call: 8.2 lacks some, 8.4 engines never load
    gpu = gpu_identity() if gpu is None else gpu
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    c, h, w = (int(v) for v in input_chw)

    mode, source, strongly_typed = select_build_mode(
        trt, cfg, onnx_path, Path(fp16_onnx_path) if fp16_onnx_path else None,
        Path(int8_onnx_path) if int8_onnx_path else None)
    precision = cfg.precision
    log.info(
        "Building TensorRT %s %s engine (%s) from %s for %s (sm%s)",
        trt_version, precision, mode, source, gpu["name"], gpu["compute_capability"].replace(".", ""),
    )

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, trt_logger)
    _parse_onnx(parser, source)

    tensor = _find_input(network, input_name)
    _check_input_shape(tensor, (c, h, w), cfg)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_mib) * 2**20)

    forced = _set_precision_flags(trt, config, network, mode, cfg, source)

    shapes = _add_profiles(builder, config, input_name, (c, h, w), cfg)
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
    _setup_timing_cache(config, cache_path)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    if serialized is None or memoryview(serialized).nbytes == 0:
        raise GradError(
            f"TensorRT {trt_version} failed to build an engine from {source} "
            "(see the TensorRT messages above); no engine was written"
        )

    name = engine_filename(trt_version, gpu["name"], gpu["compute_capability"], precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / name, serialized, fsync=True)
    log.info("Wrote %s (%.1f s build)", out_dir / name, build_seconds)

    if cache_path is not None:
        _save_timing_cache(config, cache_path)

    return {
        "file": name,
        "tensorrt_version": trt_version,
        "gpu_name": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "precision": precision,
        "profile": shapes,
        "profiles": int(cfg.profiles),
        "build_mode": mode,
        "workspace_mib": int(cfg.workspace_mib),
        "build_seconds": round(build_seconds, 3),
        "timing_cache": str(cache_path) if cache_path is not None else None,
        "fp32_layers": forced,
    }
