"""uint8 input in the graph (bundle schema 2) and INT8 QDQ quantisation with its AUROC gate, on real ONNX Runtime
sessions of the tiny trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

from gradad.bundle import INT8_ONNX, BundleError, file_entry, read_manifest
from gradad.data.datasets import load_samples
from gradad.data.images import read_image_rgb
from gradad.errors import GradError
from gradad.export.cli import main as export_main
from gradad.export.graph import ExportModule
from gradad.export.int8 import QuantizeOptions, int8_fp32_nodes, quantize_bundle
from gradad.export.parity import ParityError, ParityGates
from gradad.export.variants import float_input_variant
from gradad.runtime.loader import load_backend
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.runtime.preprocess import to_model_input
from gradad.training.checkpoint import load_detector


@pytest.fixture(scope="module")
def test_images(tiny_demo_root: Path) -> list[np.ndarray]:
    return [read_image_rgb(s.image_path) for s in load_samples(tiny_demo_root, "test")[::2]]


@pytest.fixture(scope="module")
def int8_bundle(bundle: Path, tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A copy of the tiny bundle with an INT8 model (gate relaxed: a 64-px model on 30 images is a glue check)."""
    copy = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(bundle, copy)
    opts = QuantizeOptions(calib=[str(tiny_demo_root / c / "train" / "good") for c in ("fabric", "nut", "capsule")],
                           data_roots=[str(tiny_demo_root)], gates=ParityGates(int8_auroc_max_drop=1.0,
                                                                           int8_map_rel_l2=1.0, int8_score_rel_l2=1.0))
    return copy, quantize_bundle(copy, opts)


def test_graph_takes_uint8_and_matches_the_float_path(bundle: Path, trained_tiny: Path,
                                                      test_images: list[np.ndarray]) -> None:
    manifest = read_manifest(bundle)
    assert manifest["schema_version"] == 2 and manifest["input"]["dtype"] == "uint8"
    model = onnx.load(bundle / "model.onnx")
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    batch = to_model_input(test_images, 64, 64)
    assert batch.dtype == np.uint8 and batch.shape[1] == 3
    # PyTorch on the float frames (today's float path) vs ONNX Runtime on the uint8 frames.
    detector, payload = load_detector(trained_tiny)
    module = ExportModule(detector, payload["normalisation"]["mean"], payload["normalisation"]["std"]).eval()
    with torch.no_grad():
        ref_scores, ref_maps = module(torch.from_numpy(batch.astype(np.float32)))
    backend = OnnxRuntimeBackend(bundle / "model.onnx", ["cpu"], threads=2)
    scores, maps = backend.infer_all(batch)
    scale = max(1.0, float(ref_scores.abs().max()))
    assert np.abs(maps - ref_maps[:, 0].numpy()).max() < 1e-4 * scale
    assert np.abs(scores - ref_scores.numpy()).max() < 1e-4 * scale
    # The float32-input variant of the same graph (the schema-1 contract) gives the same numbers.
    legacy = float_input_variant(model)
    path = bundle.parent / "legacy_check.onnx"
    onnx.save(legacy, path)
    s32, m32 = OnnxRuntimeBackend(path, ["cpu"]).infer_all(batch.astype(np.float32))
    assert np.array_equal(s32, scores) and np.array_equal(m32, maps)
    # Float frames of 0..255 values (older callers) still work with the uint8 graph.
    s_f, _ = backend.infer(batch[:2].astype(np.float32))
    assert np.array_equal(s_f, scores[:2])


def test_schema1_bundle_still_runs_and_newer_versions_are_refused(bundle: Path, tmp_path: Path,
                                                                  test_images: list[np.ndarray]) -> None:
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    onnx.save(float_input_variant(onnx.load(old / "model.onnx")), old / "model.onnx")
    manifest = json.loads((old / "bundle.json").read_text())
    manifest["schema_version"], manifest["input"]["dtype"] = 1, "float32"
    manifest["files"]["model.onnx"] = file_entry(old / "model.onnx")
    manifest["calibration"] = {"image_threshold": 1.0}
    (old / "bundle.json").write_text(json.dumps(manifest))
    backend, _ = load_backend(old, "onnxruntime")
    new, _ = load_backend(bundle, "onnxruntime")
    batch = to_model_input(test_images[:3], 64, 64)
    assert np.array_equal(backend.infer(batch)[0], new.infer(batch)[0])
    manifest["input"]["dtype"] = "uint8"  # a schema-1 manifest claiming uint8: inconsistent
    (old / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="re-export"):
        read_manifest(old)
    manifest["schema_version"] = 3
    (old / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 3.*grad-export onnx"):
        read_manifest(old)


def test_int8_model_is_qdq_with_coordinates_and_head_in_fp32(int8_bundle: tuple[Path, dict], bundle: Path) -> None:
    path, report = int8_bundle
    manifest = read_manifest(path)
    assert INT8_ONNX in manifest["files"] and manifest["parity"]["onnx_int8_vs_fp32"]["auroc_fp32"] is not None
    model = onnx.load(path / INT8_ONNX)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    # Per-channel weights: some DequantizeLinear has a vector scale.
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    # Kept nodes compute in FP32: FP32 weights (not dequantised INT8 ones), FP32 GridSample coordinates. Their
    # activation inputs come from the quantised extractor, as the FP16 rule's mapper takes the FP16 features.
    kept = set(int8_fp32_nodes(onnx.load(bundle / "model.onnx")))
    assert any("mapper/" in k for k in kept) and {"/detector/Resize", "/detector/AveragePool"} <= kept
    producers = {o: n for n in model.graph.node for o in n.output}
    checked = 0
    for node in model.graph.node:
        if node.name in kept and node.op_type in ("GridSample", "Conv", "Gemm", "MatMul"):
            src = producers.get(node.input[1])
            assert src is None or src.op_type != "DequantizeLinear", node.name
            checked += 1
    assert checked >= 4
    quantised_convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in kept]
    assert quantised_convs and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in quantised_convs)
    backend, _ = load_backend(path, "onnxruntime", "int8")
    assert backend.path.name == INT8_ONNX


def test_precision_rule_keeps_named_nodes_fp32_in_the_int8_graph(int8_bundle: tuple[Path, dict], bundle: Path
                                                                   ) -> None:
    """INT8 keeps the FP16 graph's FP32 nodes (one rule, gradad.export.precision) and the rest of the extractor:
    the extractor's convolutions keep FP32 weights and inputs, the model's own arithmetic (pair similarity,
    refinement, map fusion, standardisation) reads no INT8 grid of its own, and both fusion CNNs are quantised."""
    path, _ = int8_bundle
    model32 = onnx.load(bundle / "model.onnx")
    kept = set(int8_fp32_nodes(model32))
    fp16_kept = set(read_manifest(bundle)["parity"]["onnx_fp16_vs_fp32"]["fp32_nodes"])
    assert fp16_kept < kept and all("/extractor/" in n for n in kept - fp16_kept)
    assert any("/extractor/body/blocks.4/" in n for n in kept - fp16_kept)
    model = onnx.load(path / INT8_ONNX)
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    for prefix in ("/detector/model/pair_similarity/", "/detector/model/refine/", "/detector/model/standardize/",
                   "/detector/map_fusion/", "/detector/extractor/body/conv_stem/",
                   "/detector/extractor/body/blocks.1/", "/detector/extractor/body/blocks.2/",
                   "/detector/extractor/body/blocks.3/", "/detector/extractor/body/blocks.4/"):
        names = [n.name for n in model32.graph.node if n.name.startswith(prefix)]
        assert names and set(names) <= kept, prefix
        for name in names:
            node = by_name[name]
            weights = node.input[1:2] if node.op_type in ("Conv", "MatMul", "Gemm") else []
            assert all(producers.get(w) is None or producers[w].op_type != "DequantizeLinear" for w in weights), name
            if node.op_type == "Conv":  # the extractor is FP32 end to end: no INT8 grid on its inputs
                assert producers[node.input[0]].op_type != "DequantizeLinear", name
    for prefix in ("/detector/model/normal_cnn/", "/detector/model/abnormal_cnn/"):
        convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(prefix)]
        assert convs and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in convs), prefix


def test_int8_gate_refuses_a_model_whose_auroc_drops(bundle: Path, tiny_demo_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberately bad quantisation: activation ranges calibrated on flat grey frames clip every real image, and
    every convolution is quantised (only GridSample kept FP32: with the FP32 rule's early extractor the tiny model's
    AUROC survives even flat calibration)."""
    import gradad.export.int8 as int8

    monkeypatch.setattr(int8, "int8_fp32_nodes",
                        lambda model: [n.name for n in model.graph.node if n.op_type == "GridSample"])
    copy = tmp_path / "bad"
    shutil.copytree(bundle, copy)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        cv2.imwrite(str(flat / f"{i}.png"), np.full((64, 64, 3), 120 + i, np.uint8))
    opts = QuantizeOptions(calib=[str(flat)], data_roots=[str(tiny_demo_root)],
                           gates=ParityGates(int8_map_rel_l2=10.0, int8_score_rel_l2=10.0))
    with pytest.raises(ParityError, match=r"rejected \(not written\): INT8 image AUROC drop"):
        quantize_bundle(copy, opts)
    assert not (copy / INT8_ONNX).exists() and INT8_ONNX not in read_manifest(copy)["files"]


def test_quantize_cli_and_run_precision_int8(int8_bundle: tuple[Path, dict], tiny_demo_root: Path) -> None:
    path, _ = int8_bundle
    result = CliRunner().invoke(export_main, ["inspect", str(path)])
    assert result.exit_code == 0 and "parity INT8 vs FP32" in result.output
    result = CliRunner().invoke(export_main, ["quantize", "--help"])
    assert "--calib" in result.output and "AUROC" in result.output
    missing = CliRunner().invoke(export_main, ["quantize", str(path)])
    assert missing.exit_code == 2 and "--calib" in missing.output


def test_uint8_activations_for_x86_onnx_runtime_and_no_tensorrt_engine_from_them(bundle: Path, tiny_demo_root: Path,
                                                                                   tmp_path: Path) -> None:
    """--activations uint8: asymmetric uint8 activations (ONNX Runtime's fast x86 kernels), recorded in bundle.json,
    run by grad-run's INT8 path; grad-export build --int8 refuses the model (TensorRT needs symmetric int8)."""
    from test_tensorrt_glue import GPU, _int8_fake

    from gradad.export.engine import build_bundle_engine

    copy = tmp_path / "u8"
    shutil.copytree(bundle, copy)
    opts = QuantizeOptions(calib=[str(tiny_demo_root / "nut" / "train" / "good")], data_roots=[str(tiny_demo_root)],
                           activations="uint8", gates=ParityGates(int8_auroc_max_drop=1.0, int8_map_rel_l2=1.0,
                                                                  int8_score_rel_l2=1.0))
    report = quantize_bundle(copy, opts)
    assert report["activations"] == "uint8"
    assert read_manifest(copy)["parity"]["onnx_int8_vs_fp32"]["activations"] == "uint8"
    model = onnx.load(copy / INT8_ONNX)
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.data_type == TensorProto.UINT8 for z in zero_points)
    backend, _ = load_backend(copy, "onnxruntime", "int8")
    scores, _ = backend.infer(np.zeros((1, 3, *backend.input_hw), np.uint8))
    assert np.isfinite(scores).all()
    with pytest.raises(GradError, match="asymmetric uint8 activations.*--activations int8"):
        build_bundle_engine(copy, tiny_demo_root / "nut" / "test" / "good", trt=_int8_fake(input_shape=(-1, 3, 64, 64)),
                            gpu=GPU, int8=True)
    with pytest.raises(GradError, match="--activations 'int16'"):
        QuantizeOptions(calib=["x"], activations="int16").validate()


class _OrtAsEngine:
    """Stands in for the TensorRT engine of the glue test: an ONNX Runtime session, outputs scaled by ``factor``."""

    def __init__(self, path: Path, factor: float) -> None:
        self.backend, self.factor = OnnxRuntimeBackend(path, ["cpu"]), factor
        self.max_batch, self.input_hw, self.name = 8, self.backend.input_hw, "tensorrt"

    def infer(self, images: np.ndarray):
        s, m = self.backend.infer(images)
        return s * self.factor, m * self.factor

    def close(self) -> None:
        pass


@pytest.mark.parametrize("factor,accepted", [(1.0, True), (1.5, False)])
def test_build_int8_engine_from_the_qdq_model_glue(int8_bundle: tuple[Path, dict], tiny_demo_root: Path,
                                                  tmp_path: Path, factor: float, accepted: bool) -> None:
    """GLUE (fake `tensorrt`): --int8 parses model.int8.onnx, sets INT8, never a calibrator, gates vs ORT FP32."""
    from test_tensorrt_glue import GPU, _int8_fake

    from gradad.export.engine import build_bundle_engine

    copy = tmp_path / "b"
    shutil.copytree(int8_bundle[0], copy)
    trt = _int8_fake(input_shape=(-1, 3, 64, 64))
    images = tiny_demo_root / "nut" / "test" / "good"

    def factory(path: Path) -> _OrtAsEngine:
        return _OrtAsEngine(copy / INT8_ONNX, factor)  # what the INT8 engine computes, give or take TensorRT

    if accepted:
        stamp = build_bundle_engine(copy, images, trt=trt, gpu=GPU, engine_backend=factory, int8=True)
        assert stamp.precision == "int8" and ".int8." in stamp.file
        assert trt.rec.parsed[0][0] == (copy / INT8_ONNX).read_bytes()
        assert trt.BuilderFlag.INT8 in trt.rec.config.flags and not hasattr(trt.rec.config, "int8_calibrator")
        assert read_manifest(copy)["engines"][0]["parity_vs_onnxruntime"]["map_rel_l2"] < 0.15
    else:
        with pytest.raises(ParityError, match="INT8 engine map relative L2"):
            build_bundle_engine(copy, images, trt=trt, gpu=GPU, engine_backend=factory, int8=True)
        assert not list(copy.glob("*.plan"))
