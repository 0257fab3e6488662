"""grad-export: ONNX parity with PyTorch, FP16 with FP32 GridSample, the GridSample lint, bundle.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from gradad.bundle import BUNDLE_SCHEMA, BundleError, read_manifest, validate_manifest, verify_files
from gradad.export.cli import main as export_main
from gradad.export.fp16 import fp32_tensor_check
from gradad.export.precision import FP32_NAME_PATTERNS, keeps_fp32, keeps_fp32_name
from gradad.export.graph import ExportModule
from gradad.export.lint import ExportLintError, lint_or_raise, lint_problems
from gradad.export.onnx_export import ExportOptions, export_bundle
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.runtime.preprocess import to_model_input
from gradad.data.datasets import load_samples
from gradad.data.images import read_image_rgb
from gradad.training.checkpoint import load_detector


@pytest.fixture(scope="module")
def test_batch(trained_tiny: Path, tiny_demo_root: Path) -> np.ndarray:
    samples = load_samples(tiny_demo_root, "test")[::3]
    return to_model_input([read_image_rgb(s.image_path) for s in samples], 64, 64)


def test_onnx_runtime_matches_pytorch(bundle: Path, trained_tiny: Path, test_batch: np.ndarray) -> None:
    detector, payload = load_detector(trained_tiny)
    norm = payload["normalisation"]
    module = ExportModule(detector, norm["mean"], norm["std"]).eval()
    with torch.no_grad():
        ref_scores, ref_maps = module(torch.from_numpy(test_batch))
    scores, maps = OnnxRuntimeBackend(bundle / "model.onnx", ["cpu"], threads=2).infer_all(test_batch, 4)
    scale = max(1.0, float(np.abs(ref_scores.numpy()).max()))  # float32 rounding grows with the score scale
    assert np.abs(maps - ref_maps[:, 0].numpy()).max() < 1e-4 * scale
    assert np.abs(scores - ref_scores.numpy()).max() < 1e-4 * scale
    # Dynamic batch: batch 1 gives the same as batch 4.
    s1, m1 = OnnxRuntimeBackend(bundle / "model.onnx", ["cpu"]).infer(test_batch[:1])
    assert np.allclose(m1, maps[:1], atol=1e-5)
    # the graph declares the shapes it returns (the exporter had named the map's height after the batch axis)
    import onnxruntime as ort

    for name in ("model.onnx", "model.fp16.onnx"):
        declared = {o.name: o.shape for o in ort.InferenceSession(str(bundle / name)).get_outputs()}
        assert declared == {"score": ["batch"], "anomaly_map": ["batch", 1, *maps.shape[1:]]}, name


def test_fp16_onnx_close_to_fp32_with_fp32_gridsample(bundle: Path, test_batch: np.ndarray) -> None:
    s32, m32 = OnnxRuntimeBackend(bundle / "model.onnx", ["cpu"]).infer_all(test_batch)
    s16, m16 = OnnxRuntimeBackend(bundle / "model.fp16.onnx", ["cpu"]).infer_all(test_batch)
    assert m16.dtype == np.float32  # FP32 inputs/outputs
    assert np.linalg.norm(m16 - m32) / np.linalg.norm(m32) < 1e-2
    assert np.linalg.norm(s16 - s32) / np.linalg.norm(s32) < 1e-2
    model16 = onnx.load(bundle / "model.fp16.onnx")
    inferred = onnx.shape_inference.infer_shapes(model16)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in model16.graph.initializer})
    grid_nodes = [n for n in model16.graph.node if n.op_type == "GridSample"]
    assert len(grid_nodes) == 2  # the local grids; the global grids are a bilinear-weights MatMul
    global_reads = [n for n in model16.graph.node if n.op_type == "MatMul" and "_grid/" in n.name]
    assert len(global_reads) == 2
    for node in grid_nodes + global_reads:
        assert all(types[t] == TensorProto.FLOAT for t in [*node.input, *node.output]), node.name
    # Most of the rest really is FP16 (the conversion did something): every convolution outside the FP32 rule.
    convs = [n for n in model16.graph.node if n.op_type == "Conv" and not keeps_fp32(n)]
    assert convs and all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs)
    assert fp32_tensor_check(model16) == []


#: One node per group of the FP32 rule (gradad.export.precision) that the tiny model's graph must contain.
RULE_GROUPS = {
    "pair similarity": "/detector/model/pair_similarity/",
    "refinement (cosine + hard mask)": "/detector/model/refine/",
    "abnormal query standardisation": "/detector/model/standardize/",
    "map fusion (||x_ref - x|| + w relu(d))": "/detector/map_fusion/",
    "map head (up-sampling, smoothing, score)": "/detector/Resize",
    "extractor stem": "/detector/extractor/body/conv_stem/",
    "extractor block 2": "/detector/extractor/body/blocks.2/",
    "input normalisation": "/Sub",
}


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def test_precision_rule_keeps_named_nodes_fp32_in_the_fp16_graph(bundle: Path) -> None:
    """The shared FP32 rule on the FP16 graph: every node of each named group computes on FP32 tensors only; the
    fusion CNNs (both branches) and the later extractor blocks are FP16."""
    model32 = onnx.load(bundle / "model.onnx")
    model16 = onnx.load(bundle / "model.fp16.onnx")
    types = _float_types(model16)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    by_name = {n.name: n for n in model16.graph.node}
    for group, prefix in RULE_GROUPS.items():
        names = [n.name for n in model32.graph.node if n.name.startswith(prefix)]
        assert names, f"{group}: no node named {prefix}* in the exported graph (module renamed?)"
        for name in names:
            assert keeps_fp32_name(name), (group, name)
            node = by_name[name]
            assert node.op_type == "Cast" or all(types[t] == TensorProto.FLOAT for t in [*node.input, *node.output]
                                                 if t and types.get(t) in floats), (group, name)
    # Kept in reduced precision: the fusion CNNs of both branches (abnormal included) and extractor blocks 3+.
    for prefix in ("/detector/model/normal_cnn/", "/detector/model/abnormal_cnn/",
                   "/detector/extractor/body/blocks.3/"):
        convs = [n for n in model16.graph.node if n.op_type == "Conv" and n.name.startswith(prefix)]
        assert convs and all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs), prefix
    # The TensorRT pins use the same rule on layer names (named after the ONNX nodes).
    assert {p in FP32_NAME_PATTERNS for p in ("/pair_similarity/", "/refine/", "/map_fusion/")} == {True}


def test_bundle_manifest_valid_and_complete(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    validate_manifest(manifest)
    verify_files(bundle, manifest)
    assert manifest["onnx"]["opset"] == 17 and manifest["onnx"]["gridsample_nodes"] == 2
    assert manifest["input"]["height"] == 64 and manifest["input"]["normalisation"]["in_graph"]
    parity = manifest["parity"]
    # the gate: max abs error relative to max(1, largest |reference|) (maps of some models reach hundreds)
    assert parity["passed"] and parity["onnx_fp32_vs_pytorch"]["max_abs_over_scale"] < 1e-4
    assert parity["onnx_fp16_vs_fp32"]["auroc_fp32"] is not None
    assert set(manifest["files"]) == {"model.onnx", "model.fp16.onnx"}
    # the map's form is named: its scales and its refinement (the hard mask off by default)
    amap = manifest["outputs"]["anomaly_map"]
    assert amap["map_scales"] == [1, 3, 5, 7] and amap["refine_mask_weight"] == 0.0
    model = onnx.load(bundle / "model.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    onnx.checker.check_model(model)
    for key in BUNDLE_SCHEMA["required"]:
        assert key in manifest


def test_tampered_file_and_bad_manifest_rejected(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model.fp16.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.fp16.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.fp16.onnx.*hash"):
        verify_files(copy, read_manifest(copy))
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["schema_version"] = 99
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99"):
        read_manifest(copy)
    manifest["schema_version"] = 1
    del manifest["input"]["height"]
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="input"):
        read_manifest(copy)


def _gridsample_model(opset: int, mode: str, align_corners: int = 0) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    g = helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 3, 3, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, align_corners=align_corners,
                            padding_mode="zeros", name="gs")
    graph = helper.make_graph([node], "g", [x, g], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_lint_rejects_opset20_nearest_and_wrong_align(bundle: Path) -> None:
    assert lint_problems(_gridsample_model(17, "bilinear")) == []
    with pytest.raises(ExportLintError, match="opset 20"):
        lint_or_raise(_gridsample_model(20, "linear"), "m")
    with pytest.raises(ExportLintError, match="mode 'nearest'"):
        lint_or_raise(_gridsample_model(17, "nearest"), "m")
    with pytest.raises(ExportLintError, match="align_corners 1"):
        lint_or_raise(_gridsample_model(17, "bilinear", align_corners=1), "m")
    # The real exported graph, edited to nearest, is refused too.
    model = onnx.load(bundle / "model.onnx")
    for node in model.graph.node:
        if node.op_type == "GridSample":
            for attr in node.attribute:
                if attr.name == "mode":
                    attr.s = b"nearest"
    assert len(lint_problems(model)) == 2  # both local-grid GridSamples


def test_real_torch_export_at_opset20_is_refused(trained_tiny: Path, tmp_path: Path) -> None:
    import warnings

    detector, payload = load_detector(trained_tiny)
    module = ExportModule(detector, payload["normalisation"]["mean"], payload["normalisation"]["std"]).eval()
    path = tmp_path / "op20.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(1, 3, 64, 64) * 255,), str(path), dynamo=False, opset_version=20,
                          input_names=["image"], output_names=["score", "anomaly_map"])
    with pytest.raises(ExportLintError, match="opset 20"):
        lint_or_raise(onnx.load(path), str(path))


def test_cli_inspect_build_and_refusals(bundle: Path, trained_tiny: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(export_main, ["inspect", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "opset 17" in result.output and "model.fp16.onnx" in result.output and "parity FP16" in result.output
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = runner.invoke(export_main, ["build", "--fp16", str(bundle), "--parity-images",
                                             str(tmp_path)])
        assert result.exit_code == 2
        assert "TensorRT not installed" in result.stderr and "model.onnx" in result.stderr
        assert read_manifest(bundle)["engines"] == []
    # Never writes into a folder that is not a bundle; never replaces a bundle without --overwrite.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = runner.invoke(export_main, ["onnx", str(trained_tiny), "-o", str(other)])
    assert result.exit_code == 2 and "not a model bundle" in result.stderr
    assert (other / "keep.txt").read_text() == "mine"
    result = runner.invoke(export_main, ["onnx", str(trained_tiny), "-o", str(bundle)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr


def test_inspect_shows_the_bundle_when_one_file_fails_and_trust_needs_an_engine(bundle: Path, tmp_path: Path) -> None:
    """The diagnostic tool shows everything it can and marks the bad file (exit 2 with one error line), and
    `trust` on a bundle without engines is the usual one-line error with exit code 2."""
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "model.fp16.onnx").unlink()
    result = CliRunner().invoke(export_main, ["inspect", str(copy)])
    assert result.exit_code == 2, result.output
    assert "parity FP16" in result.stdout and "opset 17" in result.stdout
    marked = [line for line in result.stdout.splitlines() if "FAILED VERIFICATION" in line]
    assert len(marked) == 1 and "model.fp16.onnx" in marked[0] and "FAILED VERIFICATION (missing)" in marked[0]
    assert result.stderr.startswith("error: 1 of ") and "bundle file missing" in result.stderr
    (copy / "model.onnx").write_bytes(b"garbage\n")  # a corrupt file: its own size beside the recorded one
    result = CliRunner().invoke(export_main, ["inspect", str(copy)])
    (corrupt,) = [line for line in result.stdout.splitlines() if "FAILED VERIFICATION" in line and "model.onnx " in line]
    assert "FAILED VERIFICATION (8 bytes on disk)" in corrupt
    result = CliRunner().invoke(export_main, ["trust", str(bundle)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "no TensorRT engine" in result.stderr


def test_parity_gate_failure_writes_nothing(trained_tiny: Path, tmp_path: Path) -> None:
    from gradad.export.parity import ParityError, ParityGates

    opts = ExportOptions(parity_max_images=6, gates=ParityGates(fp16_map_rel_l2=1e-9))
    with pytest.raises(ParityError, match="FP16 map relative L2"):
        export_bundle(trained_tiny, tmp_path / "rejected", opts)
    assert not (tmp_path / "rejected").exists()
    assert not list(tmp_path.glob(".*export-tmp"))


class _ScaledOnnxEngine:
    """Glue-test stand-in for a TensorRT engine: ONNX Runtime FP32 with its outputs scaled by ``factor``."""

    def __init__(self, bundle: Path, factor: float) -> None:
        self.inner = OnnxRuntimeBackend(bundle / "model.onnx", ["cpu"])
        self.name, self.max_batch, self.factor = "fake-engine", 4, factor
        self.closed = False

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.inner.input_hw

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, m = self.inner.infer(images)
        return s * self.factor, m * self.factor

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("factor,accepted,refusal", [(1.001, True, ""), (1.2, False, "engine map relative L2"),
                                                     (float("nan"), False, "engine outputs hold .* NaN/inf")])
def test_engine_parity_gate_glue(bundle: Path, tiny_demo_root: Path, tmp_path: Path, factor: float,
                                 accepted: bool, refusal: str) -> None:
    """GLUE test with the fake `tensorrt` module (tests/fakes/tensorrt.py): the engine-vs-ORT gate keeps or deletes."""
    import shutil

    from fakes.tensorrt import CHW, make_fake_trt
    from test_tensorrt_glue import GPU

    from gradad.export.engine import build_bundle_engine
    from gradad.export.parity import ParityError

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    engines: list[_ScaledOnnxEngine] = []

    def factory(path: Path) -> _ScaledOnnxEngine:
        assert path.read_bytes() == b"engine-bytes"
        engines.append(_ScaledOnnxEngine(copy, factor))
        return engines[-1]

    trt = make_fake_trt(input_shape=(-1, 3, 64, 64))
    images = tiny_demo_root / "fabric" / "test" / "good"
    assert CHW[0] == 3
    if accepted:
        stamp = build_bundle_engine(copy, images, trt=trt, gpu=GPU, engine_backend=factory)
        manifest = read_manifest(copy)
        assert manifest["engines"][0]["file"] == stamp.file and (copy / stamp.file).is_file()
        assert stamp.parity_vs_onnxruntime["map_rel_l2"] == pytest.approx(0.001, rel=1e-3)
        assert stamp.built_from == {n: e["sha256"] for n, e in manifest["files"].items() if n.endswith(".onnx")}
        verify_files(copy, manifest)
    else:
        with pytest.raises(ParityError, match=refusal):
            build_bundle_engine(copy, images, trt=trt, gpu=GPU, engine_backend=factory)
        assert not list(copy.glob("*.plan")) and read_manifest(copy)["engines"] == []
        assert not (copy / ".engine-build-tmp").exists()
    assert engines and engines[0].closed


def test_nan_fails_every_parity_gate() -> None:
    """``nan > gate`` is False: a single NaN (an FP16 overflow, 0/0 in a cosine) must fail the gates, not hide a
    candidate that is also 10x off."""
    from gradad.export.parity import ParityGates, check_gates, check_int8_gates, compare_fp16, compare_fp32

    rng = np.random.default_rng(0)
    ref_s, ref_m = rng.random(8) + 1, rng.random((8, 16, 16)) + 1
    bad_s, bad_m = ref_s * 10, ref_m * 10
    bad_m[0, 0, 0] = np.nan
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    r16 = compare_fp16(ref_s, ref_m, bad_s, bad_m, labels)  # no AUROC on NaN (it would raise): not measured
    assert r16["nonfinite"] == 1 and r16["auroc_change"] is None
    assert any("NaN/inf" in f for f in check_gates({"max_abs_over_scale": 0.0}, r16, ParityGates()))
    assert any("NaN/inf" in f for f in check_int8_gates(r16, ParityGates(), need_auroc=False))
    r32 = compare_fp32(ref_s, ref_m, np.full(8, np.inf), ref_m)
    assert r32["nonfinite"] == 8 and check_gates(r32, None, ParityGates())
    nan_ref = compare_fp16(np.full(8, np.nan), ref_m, ref_s, ref_m, None)  # a broken reference fails too
    assert any("reference" in f for f in check_gates({"max_abs_over_scale": 0.0}, nan_ref, ParityGates()))
    clean = compare_fp16(ref_s, ref_m, ref_s, ref_m, labels)
    assert clean["nonfinite"] == 0 and check_gates({"max_abs_over_scale": 0.0}, clean, ParityGates()) == []


def test_tensorrt_pins_follow_the_precision_rule(bundle: Path, tiny_demo_root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """GLUE test with the fake `tensorrt` module: on the FP16-flag route, `grad-export build` pins to FP32 exactly the
    layers the shared rule keeps FP32 in the FP16 and INT8 graphs (layers named after the ONNX nodes, as TensorRT's
    ONNX parser names them) — the model's own arithmetic and the early extractor included, the fusion CNNs not."""
    import shutil

    import fakes.tensorrt as fake_trt
    from test_tensorrt_glue import GPU

    from gradad.export.engine import build_bundle_engine

    model = onnx.load(bundle / "model.onnx")
    layers = [fake_trt.FakeLayer(n.name, fake_trt.FakeLayerType.GRID_SAMPLE if n.op_type == "GridSample"
                                 else fake_trt.FakeLayerType.ELEMENTWISE, [fake_trt.FakeDataType.FLOAT])
              for n in model.graph.node]
    monkeypatch.setattr(fake_trt, "default_layers", lambda: layers)
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    trt = fake_trt.make_fake_trt(input_shape=(-1, 3, 64, 64))
    stamp = build_bundle_engine(copy, tiny_demo_root / "fabric" / "test" / "good", trt=trt, gpu=GPU,
                                engine_backend=lambda path: _ScaledOnnxEngine(copy, 1.0))
    pinned = set(stamp.fp32_layers)
    assert pinned == {n.name for n in model.graph.node if keeps_fp32(n)}
    assert any("/pair_similarity/" in p for p in pinned) and any("/refine/" in p for p in pinned)
    assert any("/extractor/body/blocks.2/" in p for p in pinned)
    assert not any("_cnn/" in p or "/blocks.3/" in p for p in pinned)
