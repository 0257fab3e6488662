"""GLUE tests for gradad.export.tensorrt_build, run against a FAKE `tensorrt` module.

These are NOT TensorRT tests. TensorRT and a GPU are not available where the test suite normally
runs, so almost every test below injects the stand-in `tensorrt` package of `tests/fakes/tensorrt.py`
(`make_fake_trt`, shared with the runtime glue tests), whose builder only records which builder calls our code makes: network creation flags,
ONNX parsing, builder flags, per-layer precision, memory pool limit, optimisation profile, timing
cache and `build_serialized_network`. They check our glue logic (which FP16 route is chosen for
which TensorRT version, which layers get pinned to FP32, what is written where, and the error
messages) - not that TensorRT accepts the calls or builds a correct engine.

Only `test_real_tensorrt_build` touches the real TensorRT; it is skipped ("TensorRT not
installed" / "no CUDA GPU") unless both are present.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fakes.tensorrt import CHW, FakeLayer, FakeParserError, cudaError_t, make_fake_trt
from gradad.engine_trust import is_trusted, trust
from gradad.errors import ConfigError, GradError
from gradad.bundle import EngineStamp
from gradad.export import tensorrt_build as tb
from gradad.export.tensorrt_build import EngineBuildConfig, build_engine, engine_filename, supports_fp16_flag
from gradad.runtime import tensorrt_device as td
from gradad.runtime.tensorrt_device import TensorRTUnavailable, engine_matches_device

GPU = {"name": "NVIDIA Orin", "compute_capability": "8.7"}


@pytest.fixture()
def onnx_files(tmp_path: Path) -> tuple[Path, Path]:
    """Placeholder ONNX files: the fake parser only records the bytes it is given."""
    fp32 = tmp_path / "bundle" / "model.onnx"
    fp16 = tmp_path / "bundle" / "model.fp16.onnx"
    fp32.parent.mkdir()
    fp32.write_bytes(b"fp32-onnx")
    fp16.write_bytes(b"fp16-onnx")
    return fp32, fp16


def _build(trt: Any, onnx_files: tuple[Path, Path], out_dir: Path, cfg: EngineBuildConfig | None = None,
           with_fp16_onnx: bool = True) -> dict[str, Any]:
    fp32, fp16 = onnx_files
    return build_engine(
        fp32, out_dir, "image", CHW, cfg or EngineBuildConfig(),
        fp16_onnx_path=fp16 if with_fp16_onnx else None, trt=trt, gpu=GPU,
    )


def _layer(trt: Any, name: str) -> FakeLayer:
    net = trt.rec.network
    return next(net.get_layer(i) for i in range(net.num_layers) if net.get_layer(i).name == name)


# ------------------------------------------------------------------------------------------
# FP16 flag route (TensorRT 8.5 - 10.x)
# ------------------------------------------------------------------------------------------


def test_fp16_flag_path_sets_flags_and_pins_gridsample_and_pattern_layers(onnx_files, tmp_path):
    trt = make_fake_trt()
    cfg = EngineBuildConfig(fp32_layer_name_patterns=("coord_local",))
    stamp = _build(trt, onnx_files, tmp_path / "out", cfg)

    assert trt.rec.parsed == [(b"fp32-onnx", str(onnx_files[0]))]  # the FP32 ONNX, with its path
    flags = trt.rec.config.flags
    assert trt.BuilderFlag.FP16 in flags and trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS in flags
    for name in ("/grid/GridSample", "/grid/GridSample_1", "/coord_local/conv1/Conv", "/coord_local/Tanh"):
        layer = _layer(trt, name)
        assert layer.precision is trt.float32, name
        assert layer.output_types == {0: trt.float32}, name
    for name in ("/backbone/conv0/Conv", "/head/conv/Conv"):
        layer = _layer(trt, name)
        assert layer.precision is None and layer.output_types == {}, name
    # An integer shape layer inside the coordinate branch is left alone.
    shape_layer = _layer(trt, "/coord_local/Shape")
    assert shape_layer.precision is None and shape_layer.output_types == {}
    assert stamp["build_mode"] == "fp16-flag"
    assert stamp["precision"] == "fp16"
    assert set(stamp["fp32_layers"]) == {
        "/grid/GridSample", "/grid/GridSample_1", "/coord_local/conv1/Conv", "/coord_local/Tanh"
    }


def test_default_config_pins_only_gridsample(onnx_files, tmp_path):
    trt = make_fake_trt()
    _build(trt, onnx_files, tmp_path / "out")
    assert _layer(trt, "/grid/GridSample").precision is trt.float32
    assert _layer(trt, "/coord_local/Tanh").precision is None


def test_unknown_fp32_layer_type_is_a_config_error(onnx_files, tmp_path):
    trt = make_fake_trt()
    with pytest.raises(ConfigError, match="GRIDSAMPLE"):
        _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(fp32_layer_types=("GRIDSAMPLE",)))
    assert not (tmp_path / "out").exists()


def test_profile_shapes_and_workspace_bytes(onnx_files, tmp_path):
    trt = make_fake_trt()
    cfg = EngineBuildConfig(opt_batch=4, max_batch=16, workspace_mib=512)
    stamp = _build(trt, onnx_files, tmp_path / "out", cfg)
    config = trt.rec.config
    assert len(config.profiles) == 2 and stamp["profiles"] == 2  # one per batch in flight at run time
    for profile in config.profiles:
        assert profile.shapes == {"image": ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64))}
    assert config.pool_limits == {"WORKSPACE": 512 * 2**20}
    assert stamp["profile"] == {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [16, 3, 64, 64]}
    assert stamp["workspace_mib"] == 512


@pytest.mark.parametrize(
    "kwargs", [dict(min_batch=0), dict(opt_batch=9, max_batch=8), dict(min_batch=2, opt_batch=1),
               dict(workspace_mib=0), dict(profiles=0)]
)
def test_invalid_build_config_is_refused_before_touching_tensorrt(kwargs, onnx_files, tmp_path):
    trt = make_fake_trt()
    with pytest.raises(ConfigError):
        _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(**kwargs))
    assert trt.rec.network_flags == []


def test_timing_cache_read_when_present_and_written_after_build(onnx_files, tmp_path):
    cache = tmp_path / "cache" / "trt.timing"
    cache.parent.mkdir()
    cache.write_bytes(b"old-cache")
    trust(hashlib.sha256(b"old-cache").hexdigest(), cache, "timing cache")  # as an earlier build here does
    trt = make_fake_trt()
    stamp = _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(timing_cache=str(cache)))
    assert trt.rec.timing_cache_inputs == [b"old-cache"]
    assert trt.rec.set_timing_cache_calls == [False]  # ignore_mismatch=False
    assert cache.read_bytes() == b"old-cache|tuned"
    assert stamp["timing_cache"] == str(cache)
    assert [p.name for p in cache.parent.iterdir()] == ["trt.timing"]  # no temp file left


def test_a_timing_cache_from_elsewhere_is_never_deserialised(onnx_files, tmp_path, caplog):
    """The builder deserialises the cache (native TensorRT data): one that came with a bundle is ignored, replaced
    by the build's own, and that one is trusted for the next build."""
    cache = tmp_path / "trt.timing"
    cache.write_bytes(b"planted-cache")
    trt = make_fake_trt()
    with caplog.at_level(logging.WARNING):
        _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(timing_cache=str(cache)))
    assert trt.rec.timing_cache_inputs == [b""]
    assert "not written on this machine" in caplog.text
    assert cache.read_bytes() == b"|tuned" and is_trusted(hashlib.sha256(b"|tuned").hexdigest())


def test_timing_cache_created_when_absent(onnx_files, tmp_path):
    cache = tmp_path / "trt.timing"
    trt = make_fake_trt()
    _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(timing_cache=str(cache)))
    assert trt.rec.timing_cache_inputs == [b""]
    assert cache.read_bytes() == b"|tuned"


def test_no_timing_cache_by_default(onnx_files, tmp_path):
    trt = make_fake_trt()
    stamp = _build(trt, onnx_files, tmp_path / "out")
    assert trt.rec.timing_cache_inputs == []
    assert stamp["timing_cache"] is None


# ------------------------------------------------------------------------------------------
# Strongly typed route (TensorRT >= 11: no FP16 builder flag)
# ------------------------------------------------------------------------------------------


def test_without_fp16_flag_the_fp16_onnx_is_built_strongly_typed(onnx_files, tmp_path):
    trt = make_fake_trt(version="10.13.0", fp16_flag=False, strongly_typed_value=1)
    assert not supports_fp16_flag(trt)
    stamp = _build(trt, onnx_files, tmp_path / "out")
    assert trt.rec.parsed == [(b"fp16-onnx", str(onnx_files[1]))]
    assert trt.rec.network_flags == [1 << 1]  # STRONGLY_TYPED, no EXPLICIT_BATCH on TRT 10+
    assert "FP16" not in {f.name for f in trt.rec.config.flags}
    assert trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS not in trt.rec.config.flags
    net = trt.rec.network
    # Per-layer precision is not allowed on a strongly typed network: none is set.
    assert all(net.get_layer(i).precision is None for i in range(net.num_layers))
    assert stamp["build_mode"] == "strongly-typed-fp16-onnx"
    assert stamp["precision"] == "fp16"
    assert stamp["fp32_layers"] == []


def test_trt11_strongly_typed_flag_value_is_read_from_the_enum(onnx_files, tmp_path):
    # In TensorRT 11 EXPLICIT_BATCH is gone and STRONGLY_TYPED is member 0.
    trt = make_fake_trt(version="11.4.0", fp16_flag=False, strongly_typed_value=0, explicit_batch=False)
    _build(trt, onnx_files, tmp_path / "out")
    assert trt.rec.network_flags == [1 << 0]


def test_strongly_typed_route_needs_the_fp16_onnx(onnx_files, tmp_path):
    trt = make_fake_trt(version="11.4.0", fp16_flag=False, strongly_typed_value=0, explicit_batch=False)
    with pytest.raises(GradError, match=r"no FP16 builder flag.*model\.fp16\.onnx"):
        _build(trt, onnx_files, tmp_path / "out", with_fp16_onnx=False)
    assert trt.rec.builds == []
    assert not (tmp_path / "out").exists()


def test_fp32_build_uses_the_fp32_onnx_without_precision_flags(onnx_files, tmp_path):
    trt = make_fake_trt(fp16_flag=False)  # even without the FP16 flag, FP32 builds are fine
    stamp = _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(fp16=False))
    assert trt.rec.parsed[0][0] == b"fp32-onnx"
    assert trt.rec.config.flags == set()
    assert trt.rec.network_flags == [0]
    assert stamp["build_mode"] == "fp32" and stamp["precision"] == "fp32"
    assert stamp["file"].endswith(".fp32.sm87.NVIDIA-Orin.plan")


# ------------------------------------------------------------------------------------------
# TensorRT version differences
# ------------------------------------------------------------------------------------------


def test_explicit_batch_flag_only_before_trt10(onnx_files, tmp_path):
    trt8 = make_fake_trt(version="8.6.1", strongly_typed_value=None)
    _build(trt8, onnx_files, tmp_path / "out8")
    assert trt8.rec.network_flags == [1 << 0]

    trt10 = make_fake_trt(version="10.3.0")
    _build(trt10, onnx_files, tmp_path / "out10")
    assert trt10.rec.network_flags == [0]


# ------------------------------------------------------------------------------------------
# Failures: clear messages, nothing written
# ------------------------------------------------------------------------------------------


def test_parser_failure_names_the_file_and_lists_every_error(onnx_files, tmp_path):
    errors = (
        FakeParserError("Unsupported interpolation mode linear", "/grid/GridSample", "GridSample"),
        FakeParserError("Invalid tensor shape\n  for input grid"),
    )
    trt = make_fake_trt(parse_ok=False, parse_errors=errors)
    with pytest.raises(GradError) as info:
        _build(trt, onnx_files, tmp_path / "out")
    msg = str(info.value)
    assert str(onnx_files[0]) in msg
    assert "Unsupported interpolation mode linear" in msg and "/grid/GridSample GridSample" in msg
    assert "Invalid tensor shape for input grid" in msg
    assert "\n" not in msg  # one line
    assert trt.rec.builds == []
    assert not (tmp_path / "out").exists()


def test_missing_onnx_file_is_a_grad_error(tmp_path):
    trt = make_fake_trt()
    with pytest.raises(GradError, match="cannot read ONNX model .*nope.onnx"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "out", "image", CHW, EngineBuildConfig(),
                     trt=trt, gpu=GPU)


def test_build_returning_none_writes_no_file(onnx_files, tmp_path):
    cache = tmp_path / "trt.timing"
    trt = make_fake_trt(build_result=None)
    with pytest.raises(GradError, match="failed to build an engine from .*model.onnx"):
        _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(timing_cache=str(cache)))
    assert not (tmp_path / "out").exists()
    assert not cache.exists()


def test_unknown_input_name_lists_the_inputs(onnx_files, tmp_path):
    trt = make_fake_trt()
    with pytest.raises(GradError, match="no input named 'input'.*image"):
        build_engine(onnx_files[0], tmp_path / "out", "input", CHW, EngineBuildConfig(), trt=trt, gpu=GPU)


def test_fixed_batch_onnx_is_refused_for_a_dynamic_profile(onnx_files, tmp_path):
    trt = make_fake_trt(input_shape=(1, *CHW))
    with pytest.raises(GradError, match="fixed batch of 1"):
        _build(trt, onnx_files, tmp_path / "out")
    trt = make_fake_trt(input_shape=(1, *CHW))
    _build(trt, onnx_files, tmp_path / "out", EngineBuildConfig(max_batch=1))  # fits: fine


def test_input_size_mismatch_is_refused(onnx_files, tmp_path):
    trt = make_fake_trt(input_shape=(-1, 3, 128, 128))
    with pytest.raises(GradError, match="H=128 but the bundle says H=64"):
        _build(trt, onnx_files, tmp_path / "out")


# ------------------------------------------------------------------------------------------
# Engine file and stamp
# ------------------------------------------------------------------------------------------


def test_engine_filename():
    assert engine_filename("10.3.0", "NVIDIA Orin", "8.7", "fp16") == "model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan"
    assert (
        engine_filename("8.6.1.post1", "NVIDIA GeForce RTX 4090 (D)/x", "8.9", "fp32")
        == "model.trt8.6.1.post1.fp32.sm89.NVIDIA-GeForce-RTX-4090-D-x.plan"
    )
    with pytest.raises(ValueError):
        engine_filename("10.3.0", "NVIDIA Orin", "8.7", "bf16")


def test_engine_written_atomically_with_stamp(onnx_files, tmp_path):
    trt = make_fake_trt()
    out = tmp_path / "out"
    stamp = _build(trt, onnx_files, out)
    assert stamp["file"] == "model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan"
    assert (out / stamp["file"]).read_bytes() == b"engine-bytes"
    assert [p.name for p in out.iterdir()] == [stamp["file"]]  # no temp file left behind
    assert stamp["tensorrt_version"] == "10.3.0"
    assert stamp["gpu_name"] == "NVIDIA Orin"
    assert stamp["compute_capability"] == "8.7"
    assert isinstance(stamp["build_seconds"], float) and stamp["build_seconds"] >= 0
    expected = {"file", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profile",
                "build_mode", "workspace_mib", "build_seconds", "timing_cache"}
    assert expected <= set(stamp)


def test_engine_matches_device():
    stamp = EngineStamp("model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan", "10.3.0", "NVIDIA Orin", "8.7", "fp16")
    assert engine_matches_device(stamp, "10.3.0", GPU) is None

    msg = engine_matches_device(stamp, "10.7.0", GPU)
    assert msg and "TensorRT 10.3.0" in msg and "10.7.0" in msg
    assert "grad-export build --fp16 <bundle>" in msg and stamp.file in msg

    other = {"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}
    msg = engine_matches_device(stamp, "10.3.0", other, bundle="models/screws")
    assert msg and "8.7" in msg and "8.6" in msg and "RTX 3090" in msg
    assert "grad-export build --fp16 models/screws" in msg
    assert "\n" not in msg

    fp32_stamp = dataclasses.replace(stamp, precision="fp32")
    msg = engine_matches_device(fp32_stamp, "10.3.0", other)
    assert msg and "grad-export build --fp32 <bundle>" in msg


# ------------------------------------------------------------------------------------------
# Environment probing
# ------------------------------------------------------------------------------------------


def test_import_tensorrt_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTUnavailable) as info:
        td.import_tensorrt()
    assert str(info.value) == (
        "TensorRT not installed (the Python package `tensorrt`; on Jetson it comes with JetPack)"
    )
    assert isinstance(info.value, GradError)


class _DeviceCudart:
    """cuda-python's runtime as gpu_identity sees it: cudaGetDeviceProperties(0) -> (err, prop)."""
    cudaError_t = cudaError_t

    def __init__(self, err=cudaError_t.cudaSuccess) -> None:
        self.err = err

    def cudaGetDeviceProperties(self, device):  # noqa: N802 - the real name
        prop = SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0", major=9, minor=0)
        return (self.err, prop)


def test_gpu_identity_through_cuda_python(monkeypatch):
    monkeypatch.setattr(td, "import_cudart", lambda: _DeviceCudart())
    assert td.gpu_identity() == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_gpu_identity_without_any_gpu(monkeypatch):
    monkeypatch.setattr(td, "import_cudart", lambda: _DeviceCudart(cudaError_t.cudaErrorNoDevice))
    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU found"):
        td.gpu_identity()


def test_gpu_identity_without_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)  # makes both cuda-python imports raise ImportError
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(TensorRTUnavailable, match=r"cuda-python not installed .*pip install"):
        td.gpu_identity()


def test_supports_fp16_flag():
    assert supports_fp16_flag(make_fake_trt())
    assert not supports_fp16_flag(make_fake_trt(fp16_flag=False))


# ------------------------------------------------------------------------------------------
# A real build (skipped without TensorRT and a GPU)
# ------------------------------------------------------------------------------------------


def tiny_gridsample_onnx(path: Path, fp16_tail: bool = False) -> Path:
    """Opset-17 model: image (N,2,4,4) -> grid = tanh(transpose(image)) -> GridSample -> map.

    The grid is computed from the input (a stand-in for the coordinate branch, node names start
    with "coord"), so the batch axis stays dynamic with a single input. With ``fp16_tail`` a
    Cast->FP16 / Relu / Cast->FP32 tail is added: a small strongly typed FP16 graph whose
    GridSample and coordinates stay FP32, like model.fp16.onnx.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Transpose", ["image"], ["coord_t"], perm=[0, 2, 3, 1], name="coord_transpose"),
        helper.make_node("Tanh", ["coord_t"], ["grid"], name="coord_tanh"),
        helper.make_node("GridSample", ["image", "grid"], ["sampled"], name="grid_sample",
                         mode="bilinear", padding_mode="zeros", align_corners=0),
    ]
    if fp16_tail:
        nodes += [
            helper.make_node("Cast", ["sampled"], ["s16"], to=TensorProto.FLOAT16, name="to_fp16"),
            helper.make_node("Relu", ["s16"], ["r16"], name="relu_fp16"),
            helper.make_node("Cast", ["r16"], ["anomaly_map"], to=TensorProto.FLOAT, name="to_fp32"),
        ]
    else:
        nodes.append(helper.make_node("Relu", ["sampled"], ["anomaly_map"], name="relu"))
    graph = helper.make_graph(
        nodes, "tiny_gridsample",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 2, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("fp16_tail", [False, True])
def test_tiny_gridsample_onnx_is_valid(tmp_path, fp16_tail):
    """The model used by the real build test runs in ONNX Runtime with a dynamic batch."""
    ort = pytest.importorskip("onnxruntime")
    path = tiny_gridsample_onnx(tmp_path / "tiny.onnx", fp16_tail=fp16_tail)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 2, 4, 4)).astype(np.float32)
        (y,) = sess.run(None, {"image": x})
        assert y.shape == (n, 2, 4, 4) and np.isfinite(y).all()


@pytest.mark.gpu
def test_real_tensorrt_build(tmp_path):
    try:
        import tensorrt as trt  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (OSError)
        pytest.skip("TensorRT not installed")
    try:
        gpu = td.gpu_identity()
    except TensorRTUnavailable:
        pytest.skip("no CUDA GPU")

    fp32 = tiny_gridsample_onnx(tmp_path / "model.onnx")
    fp16 = tiny_gridsample_onnx(tmp_path / "model.fp16.onnx", fp16_tail=True)
    cache = tmp_path / "trt.timing"
    cfg = EngineBuildConfig(max_batch=4, opt_batch=2, workspace_mib=256, timing_cache=str(cache),
                            fp32_layer_name_patterns=("coord",))
    stamp = build_engine(fp32, tmp_path / "out", "image", (2, 4, 4), cfg, fp16_onnx_path=fp16,
                         trt=trt, gpu=gpu)

    engine_path = tmp_path / "out" / stamp["file"]
    assert engine_path.is_file() and cache.is_file()
    assert stamp["build_mode"] == ("fp16-flag" if supports_fp16_flag(trt) else "strongly-typed-fp16-onnx")
    assert engine_matches_device(EngineStamp.from_json(stamp), trt.__version__, gpu) is None
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    assert engine is not None


# ------------------------------------------------------------------------------------------
# INT8: explicit quantisation from the QDQ ONNX (issue 13)
# ------------------------------------------------------------------------------------------


def _int8_fake(fp16_flag: bool = True, int8_flag: bool = True, **kw: Any) -> Any:
    trt = make_fake_trt(fp16_flag=fp16_flag, **kw)
    members = {m.name: m.value for m in trt.BuilderFlag}
    if int8_flag:
        members["INT8"] = 3
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", members)
    return trt


def test_int8_engine_is_built_from_the_qdq_onnx_with_int8_flag_and_no_calibrator(onnx_files, tmp_path):
    trt = _int8_fake()
    int8 = onnx_files[0].parent / "model.int8.onnx"
    int8.write_bytes(b"int8-qdq-onnx")
    stamp = build_engine(onnx_files[0], tmp_path / "out", "image", CHW,
                         EngineBuildConfig(int8=True, fp32_layer_name_patterns=("coord_local",)),
                         fp16_onnx_path=onnx_files[1], trt=trt, gpu=GPU, int8_onnx_path=int8)
    assert stamp["precision"] == "int8" and stamp["build_mode"] == tb.BUILD_MODE_INT8_FLAGS
    assert ".int8." in stamp["file"] and (tmp_path / "out" / stamp["file"]).is_file()
    assert trt.rec.parsed[0][0] == b"int8-qdq-onnx"  # the QDQ model, not the FP32 one
    flags = trt.rec.config.flags
    assert trt.BuilderFlag.INT8 in flags and trt.BuilderFlag.FP16 in flags
    assert not hasattr(trt.rec.config, "int8_calibrator")  # explicit quantisation: no implicit calibrator
    assert "/grid/GridSample" in stamp["fp32_layers"] and "/coord_local/Tanh" in stamp["fp32_layers"]
    assert trt.rec.network_flags[0] & (1 << 1) == 0  # not strongly typed on the flag route


def test_int8_without_builder_flags_is_strongly_typed(onnx_files, tmp_path):
    trt = _int8_fake(fp16_flag=False, int8_flag=False, version="11.0.0")
    int8 = onnx_files[0].parent / "model.int8.onnx"
    int8.write_bytes(b"int8-qdq-onnx")
    stamp = build_engine(onnx_files[0], tmp_path / "out", "image", CHW, EngineBuildConfig(int8=True),
                         trt=trt, gpu=GPU, int8_onnx_path=int8)
    assert stamp["build_mode"] == tb.BUILD_MODE_INT8_STRONGLY_TYPED and stamp["fp32_layers"] == []
    assert trt.rec.network_flags[0] & (1 << 1) and not trt.rec.config.flags


def test_int8_without_a_qdq_model_says_how_to_make_one(onnx_files, tmp_path):
    with pytest.raises(GradError, match="grad-export quantize"):
        build_engine(onnx_files[0], tmp_path / "out", "image", CHW, EngineBuildConfig(int8=True),
                     trt=_int8_fake(), gpu=GPU)
    assert td.rebuild_command("models/x", "int8") == "grad-export build --int8 models/x --parity-images DIR"
