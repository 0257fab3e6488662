"""Checks every exported graph must pass before it goes into a bundle (DESIGN.md section 6).

TensorRT's ONNX parser only knows the opset-16 GridSample mode names: at opset >= 20 ('linear'/'cubic') it
silently falls back to nearest sampling (NVIDIA/TensorRT issue 4646), so such graphs are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from gradad.errors import GradError

MIN_OPSET, MAX_OPSET = 16, 19


class ExportLintError(GradError):
    """An exported graph that would run wrongly on a target runtime."""


@dataclass(frozen=True)
class GridSampleSettings:
    """How the model samples its grids in training."""

    mode: str = "bilinear"
    padding_mode: str = "zeros"
    align_corners: int = 0


def onnx_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model``."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportLintError("ONNX model imports no default-domain opset")


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def lint_problems(model: onnx.ModelProto, expected: GridSampleSettings = GridSampleSettings()) -> list[str]:
    """Every reason ``model`` is unsafe to deploy; empty when it passes."""
    problems = []
    opset = onnx_opset(model)
    if opset >= 20:
        problems.append(f"opset {opset} >= 20: GridSample modes were renamed and TensorRT falls back to nearest")
    elif opset < MIN_OPSET:
        problems.append(f"opset {opset} < {MIN_OPSET}: GridSample needs opset 16 or later")
    grid_nodes = [n for n in model.graph.node if n.op_type == "GridSample"]
    if not grid_nodes:
        problems.append("no GridSample node: this is not a GRAD graph")
    for node in grid_nodes:
        attrs = _attrs(node)
        # ONNX defaults: mode 'bilinear' (opset 16), padding 'zeros', align_corners 0.
        mode = attrs.get("mode", "bilinear")
        padding = attrs.get("padding_mode", "zeros")
        align = int(attrs.get("align_corners", 0))
        if mode != expected.mode:
            problems.append(f"GridSample {node.name!r} mode {mode!r}, trained with {expected.mode!r}")
        if padding != expected.padding_mode:
            problems.append(f"GridSample {node.name!r} padding_mode {padding!r}, trained with {expected.padding_mode!r}")
        if align != expected.align_corners:
            problems.append(f"GridSample {node.name!r} align_corners {align}, trained with {expected.align_corners}")
    return problems


def lint_or_raise(model: onnx.ModelProto, source: str, expected: GridSampleSettings = GridSampleSettings()) -> int:
    """Raise ExportLintError listing every problem; returns the number of GridSample nodes checked."""
    problems = lint_problems(model, expected)
    if problems:
        raise ExportLintError(f"{source} refused: " + "; ".join(problems))
    return sum(n.op_type == "GridSample" for n in model.graph.node)


def _sparse_parts(sparse: onnx.SparseTensorProto):
    yield sparse.values
    yield sparse.indices


def _node_tensors(nodes):
    """Every TensorProto in the attributes of ``nodes``: dense and sparse, subgraphs too."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from _sparse_parts(attr.sparse_tensor)
            for sparse in attr.sparse_tensors:
                yield from _sparse_parts(sparse)
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto of ``graph``: initializers, sparse initializers' parts and node attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse_parts(sparse)
    yield from _node_tensors(graph.node)


def _model_tensors(model: onnx.ModelProto):
    """Every TensorProto of ``model``: its graph's and those inside its local functions (TensorRT imports both)."""
    yield from _tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def check_external_data(onnx_path: Path, root: Path) -> None:
    """Refuse an ONNX file whose external tensor data lies outside ``root`` (the bundle folder).

    TensorRT's parser reads external data itself, before ONNX Runtime or onnx ever check it, and follows symlinks:
    a handed-over bundle could otherwise make ``grad-export engine`` read any file the user can. gradad's own
    exports hold no external data; a file that does must keep it inside the bundle, symlinks resolved.
    """
    from gradad.bundle import BundleError, bundle_file, check_file_name

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is one line naming the file
        raise ExportLintError(f"{onnx_path}: not a readable ONNX model ({exc})") from None
    for tensor in _model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None:
            raise ExportLintError(f"{onnx_path}: tensor {tensor.name!r} has external data without a location")
        try:
            check_file_name(location, f"{onnx_path}: tensor {tensor.name!r}")
            bundle_file(root, location)
        except BundleError as exc:
            raise ExportLintError(f"{onnx_path}: tensor {tensor.name!r} refused: {exc}") from None
