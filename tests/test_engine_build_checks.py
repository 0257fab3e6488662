"""``grad-export build`` checks everything it can before the engine build (minutes on a Jetson), with the fake
``tensorrt`` module (tests/fakes/tensorrt.py): the TensorRT version (8.5+ required, newer than 10.x warned about),
the parity images (listed and decoded), the build settings, and the one-line error naming only the ONNX files the
bundle still offers to ONNX Runtime."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import fakes.tensorrt as fake_trt
from test_tensorrt_glue import GPU

from gradad.bundle import Bundle, read_manifest
from gradad.errors import ConfigError, DatasetError, GradError
from gradad.export import engine as engine_module
from gradad.export import tensorrt_build
from gradad.export.cli import main as export_main
from gradad.export.engine import build_bundle_engine
from gradad.export.tensorrt_build import EngineBuildConfig, build_engine, check_tensorrt_version
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.runtime.tensorrt_device import TensorRTUnavailable

#: the runtime's refusal of a pre-8.5 TensorRT (runtime/tensorrt_backend.py), which the build must repeat word for word
OLD_TRT_MESSAGE = ("has no name-based tensor API (execute_async_v3): gradad needs TensorRT 8.5 or newer "
                   "(JetPack 5.1+)")


class _OnnxEngine:
    """Stand-in for a TensorRT engine: ONNX Runtime FP32, so the parity gate passes."""

    def __init__(self, bundle_dir: Path) -> None:
        self.inner = OnnxRuntimeBackend(bundle_dir / "model.onnx", ["cpu"])
        self.name, self.max_batch = "fake-engine", 4

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.inner.input_hw

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.infer(images)

    def close(self) -> None:
        pass


def _never_loaded(path: Path) -> Any:
    raise AssertionError(f"an engine was built and loaded ({path.name}); the build should have been refused first")


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    """A writable copy of the session's tiny bundle."""
    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    return target


@pytest.fixture
def good_images(tiny_demo_root: Path) -> Path:
    return tiny_demo_root / "fabric" / "test" / "good"


def _trt_82() -> Any:
    """TensorRT 8.2 (JetPack 4.6): no ``IBuilderConfig.set_memory_pool_limit`` nor ``MemoryPoolType`` (8.4+)."""
    trt = fake_trt.make_fake_trt(version="8.2.1", bindings_api=True, strongly_typed_value=None,
                                 input_shape=(-1, 3, 64, 64))
    del trt.MemoryPoolType
    return trt


def _assert_nothing_built(trt: Any, bundle_dir: Path) -> None:
    assert trt.rec.builds == [] and trt.rec.config is None, "builder work started before the refusal"
    assert not (bundle_dir / "timing.cache").exists(), "a timing cache was written (and trusted)"
    assert not list(bundle_dir.glob("*.plan")) and read_manifest(bundle_dir)["engines"] == []
    assert not (bundle_dir / ".engine-build-tmp").exists()


# ---------------------------------------------------------------------------------------------------------------
# 1. TensorRT version gate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["8.4.1", "8.2.1", "7.1.3"])
def test_check_refuses_tensorrt_older_than_8_5_in_the_runtime_words(version: str) -> None:
    with pytest.raises(TensorRTUnavailable) as info:
        check_tensorrt_version(fake_trt.make_fake_trt(version=version))
    assert str(info.value) == f"TensorRT {version} {OLD_TRT_MESSAGE}"


def test_check_accepts_the_tested_range_silently_and_warns_once_above_it(caplog: pytest.LogCaptureFixture) -> None:
    tensorrt_build._warn_untested_tensorrt.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gradad.export.tensorrt_build"):
        for version in ("8.5.1", "8.6.1.6", "10.3.0", "10.13.0"):
            assert check_tensorrt_version(fake_trt.make_fake_trt(version=version)) == version
        assert caplog.records == []
        for _ in range(2):  # build_bundle_engine and build_engine both check: one warning, not two
            assert check_tensorrt_version(fake_trt.make_fake_trt(version="11.4.0")) == "11.4.0"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "TensorRT 11.4.0 is newer than the tested range (8.5 to 10.x)" in warnings[0]
    with pytest.raises(TensorRTUnavailable, match="cannot read the TensorRT version"):
        check_tensorrt_version(fake_trt.make_fake_trt(version="unknown"))


def test_build_engine_refuses_tensorrt_8_4_before_the_builder(tmp_path: Path) -> None:
    """The direct entry point (benchmarks/gpu_check.py uses it) is gated too."""
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not parsed")
    trt = fake_trt.make_fake_trt(version="8.4.1", bindings_api=True)
    cache = tmp_path / "timing.cache"
    with pytest.raises(TensorRTUnavailable, match="TensorRT 8.4.1 has no name-based tensor API"):
        build_engine(onnx_file, tmp_path / "out", "image", fake_trt.CHW, EngineBuildConfig(timing_cache=str(cache)),
                     trt=trt, gpu=GPU)
    assert trt.rec.parsed == [] and trt.rec.builds == [] and not cache.exists() and not (tmp_path / "out").exists()


def test_build_bundle_engine_refuses_tensorrt_8_4_before_building(copy: Path, good_images: Path) -> None:
    """JetPack 5.0: used to build the whole engine, write and trust the timing cache, then refuse at load time."""
    trt = fake_trt.make_fake_trt(version="8.4.1", bindings_api=True, input_shape=(-1, 3, 64, 64))
    with pytest.raises(TensorRTUnavailable) as info:
        build_bundle_engine(copy, good_images, trt=trt, gpu=GPU, engine_backend=_never_loaded)
    message = str(info.value)
    assert message.startswith(f"TensorRT 8.4.1 {OLD_TRT_MESSAGE}; no engine built")
    assert "model.onnx" in message and "grad-run --backend onnxruntime" in message
    _assert_nothing_built(trt, copy)


def test_cli_on_tensorrt_8_2_is_one_error_line_and_exit_2(copy: Path, good_images: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """JetPack 4.6: used to stop with an AttributeError traceback on set_memory_pool_limit (exit 1)."""
    trt = _trt_82()
    monkeypatch.delattr(fake_trt.FakeConfig, "set_memory_pool_limit")
    monkeypatch.setattr(engine_module, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(engine_module, "gpu_identity", lambda: dict(GPU))
    result = CliRunner().invoke(export_main, ["build", "--fp16", str(copy), "--parity-images", str(good_images)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and not isinstance(result.exception, AttributeError)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: TensorRT 8.2.1 {OLD_TRT_MESSAGE}; no engine built")
    _assert_nothing_built(trt, copy)


def test_newer_major_than_tested_warns_and_still_builds(copy: Path, good_images: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """TensorRT 11+ (no FP16 builder flag): warned about, not refused; the parity gate decides."""
    tensorrt_build._warn_untested_tensorrt.cache_clear()
    trt = fake_trt.make_fake_trt(version="11.4.0", fp16_flag=False, strongly_typed_value=0, explicit_batch=False,
                                 input_shape=(-1, 3, 64, 64))
    with caplog.at_level(logging.WARNING, logger="gradad.export"):
        stamp = build_bundle_engine(copy, good_images, trt=trt, gpu=GPU, engine_backend=lambda p: _OnnxEngine(copy))
    assert stamp.tensorrt_version == "11.4.0" and stamp.build_mode == "strongly-typed-fp16-onnx"
    assert (copy / stamp.file).is_file()
    warned = [r.getMessage() for r in caplog.records if "newer than the tested range" in r.getMessage()]
    assert len(warned) == 1


# ---------------------------------------------------------------------------------------------------------------
# 2. Parity images and settings checked before the build
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,refusal", [
    ({}, r"--parity-images folder .* holds no images"),
    ({"a.png": b"hi"}, r"--parity-images .*: cannot decode image .*a\.png"),
])
def test_bad_parity_images_are_refused_before_the_build(copy: Path, tmp_path: Path, content: dict[str, bytes],
                                                        refusal: str) -> None:
    images = tmp_path / "parity"
    images.mkdir()
    for name, data in content.items():
        (images / name).write_bytes(data)
    trt = fake_trt.make_fake_trt(input_shape=(-1, 3, 64, 64))
    with pytest.raises(DatasetError, match=refusal):
        build_bundle_engine(copy, images, trt=trt, gpu=GPU, engine_backend=_never_loaded)
    _assert_nothing_built(trt, copy)


def test_parity_images_are_decoded_before_the_build(copy: Path, good_images: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    trt = fake_trt.make_fake_trt(input_shape=(-1, 3, 64, 64))
    builds_at_decode: list[int] = []
    real_read = engine_module.read_image_rgb

    def spy(path: Any) -> np.ndarray:
        builds_at_decode.append(len(trt.rec.builds))
        return real_read(path)

    monkeypatch.setattr(engine_module, "read_image_rgb", spy)
    stamp = build_bundle_engine(copy, good_images, trt=trt, gpu=GPU, engine_backend=lambda p: _OnnxEngine(copy))
    n = len(builds_at_decode)
    assert n > 0 and builds_at_decode == [0] * n, "parity images decoded after the engine build"
    assert len(trt.rec.builds) == 1 and stamp.parity_vs_onnxruntime["images"] == f"{n} images from {good_images}"


def test_impossible_settings_are_refused_before_tensorrt_is_touched(copy: Path, good_images: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_import() -> Any:
        raise AssertionError("TensorRT imported before the settings were checked")

    monkeypatch.setattr(engine_module, "import_tensorrt", no_import)
    with pytest.raises(ConfigError, match="opt_batch"):
        build_bundle_engine(copy, good_images, opt_batch=8, max_batch=4, gpu=GPU, engine_backend=_never_loaded)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(GradError, match="--timing-cache .*cannot write there"):
        build_bundle_engine(copy, good_images, timing_cache=str(blocker / "timing.cache"), gpu=GPU,
                            engine_backend=_never_loaded)


# ---------------------------------------------------------------------------------------------------------------
# 3. What the bundle still offers ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------


def test_no_tensorrt_message_lists_only_the_onnx_files(copy: Path, good_images: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.load(copy)
    for name in ("refine_model.0123456789ab.pt", "pixel_prior.0123456789ab.npz",
                 "model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan"):  # an engine from another device, say
        (copy / name).write_bytes(b"not ONNX")
        bundle.add_file(name)
    bundle.save()
    onnx_files = sorted(n for n in bundle.files if n.endswith(".onnx"))
    assert len(onnx_files) >= 2

    def missing() -> Any:
        raise TensorRTUnavailable("TensorRT not installed")

    monkeypatch.setattr(engine_module, "import_tensorrt", missing)
    with pytest.raises(TensorRTUnavailable) as info:
        build_bundle_engine(copy, good_images, engine_backend=_never_loaded)
    message = str(info.value)
    assert f"still holds {', '.join(onnx_files)} for ONNX Runtime" in message
    assert ".pt" not in message and ".npz" not in message and ".plan" not in message
