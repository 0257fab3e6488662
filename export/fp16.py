"""FP16 ONNX with an explicit FP32 block-list (DESIGN.md section 6).

The block-list is :mod:`gradad.export.precision` (shared with INT8 and TensorRT): GridSample and the coordinate
branch (FP16 coordinates lose sub-cell precision; ONNX Runtime's CUDA GridSample is FP32-only), the model's own
arithmetic (cosines, refinement mask, map fusion), the map head and the extractor's first blocks, plus every node
between a mapper and a GridSample coordinate input. Inputs and outputs stay FP32, so callers see no difference.

A small purpose-built converter instead of onnxconverter-common: on these graphs that tool leaves Cast nodes
and value_info with stale types, producing models ONNX Runtime refuses to load.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from gradad.export.precision import COORDINATE_BRANCH, FP32_NAME_PATTERNS, GRID_MODULES, keeps_fp32  # noqa: F401

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

# Inputs that ONNX requires to be float32 whatever the data type (Resize's roi and scales).
_FP32_ONLY_INPUTS = {"Resize": {1, 2}}
# The FP32 rule (GridSample, coordinate branch, the model's own arithmetic, map head, early extractor) is one list
# shared with INT8 and TensorRT's per-layer pins: gradad.export.precision. Re-exported here under its old names.
default_fp32_nodes = keeps_fp32


def coordinate_path(model: onnx.ModelProto) -> set[str]:
    """Names of every node between a graph input and the coordinate input (input 1) of each GridSample."""
    producer = {out: node for node in model.graph.node for out in node.output}
    seen: set[str] = set()
    stack = [n.input[1] for n in model.graph.node if n.op_type == "GridSample"]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def _to_half(array: np.ndarray) -> np.ndarray:
    # Clip to the FP16 range so huge values become +-65504 instead of inf.
    return np.clip(array, -65504, 65504).astype(np.float16)


def convert_to_fp16(
    model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] = default_fp32_nodes
) -> tuple[onnx.ModelProto, list[str]]:
    """Return (fp16 model, names of nodes kept in FP32). Graph inputs/outputs keep their FP32 type."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    graph.ClearField("value_info")
    inferred = shape_inference.infer_shapes(model)
    elem: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        elem[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        elem[init.name] = init.data_type

    # The coordinate path is FP32 only from the mapper on; before it (the extractor) FP16 is wanted.
    path = coordinate_path(model)
    fp32_nodes = [n.name for n in graph.node if keep_fp32(n) or (n.name in path and _after_mapper(n, graph))]
    fp32_set = set(fp32_nodes)
    # Current precision of every float tensor: graph inputs are FP32, initializers decided by consumers.
    current: dict[str, int] = {i.name: FLOAT for i in graph.input if elem.get(i.name) == FLOAT}
    init_by_name = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))

    def wanted(node: onnx.NodeProto, idx: int) -> int:
        if node.name in fp32_set or idx in _FP32_ONLY_INPUTS.get(node.op_type, ()):
            return FLOAT
        return HALF

    new_inits = []
    for name, init in init_by_name.items():
        if init.data_type != FLOAT:
            continue
        needs = {wanted(n, i) for n, i in consumers.get(name, [])}
        if needs == {HALF}:
            init.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(init)), name))
            current[name] = HALF
        elif needs == {FLOAT, HALF}:
            half = numpy_helper.from_array(_to_half(numpy_helper.to_array(init)), name + "_fp16")
            new_inits.append(half)
            current[name] = FLOAT
            current[half.name] = HALF
        else:
            current[name] = FLOAT
    graph.initializer.extend(new_inits)

    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast_to(name: str, to: int) -> str:
        if name + "_fp16" in current and to == HALF:
            return name + "_fp16"
        key = (name, to)
        if key not in casts:
            out = f"{name}_as_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}_cast"))
            current[out] = to
            casts[key] = out
        return casts[key]

    for node in graph.node:
        half_node = node.name not in fp32_set
        for idx, name in enumerate(node.input):
            if name and current.get(name) is not None:
                need = wanted(node, idx)
                if current[name] != need:
                    node.input[idx] = cast_to(name, need)
        if half_node and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
        if half_node and node.op_type in ("Constant", "ConstantOfShape"):
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(attr.t)), attr.t.name))
        for out in node.output:
            if elem.get(out) == FLOAT:
                current[out] = HALF if half_node else FLOAT
        new_nodes.append(node)

    # Graph outputs stay FP32.
    for out in graph.output:
        if current.get(out.name) == HALF:
            internal = out.name + "_fp16_internal"
            for node in new_nodes:
                for i, name in enumerate(node.output):
                    if name == out.name:
                        node.output[i] = internal
                for i, name in enumerate(node.input):
                    if name == out.name:
                        node.input[i] = internal
            new_nodes.append(helper.make_node("Cast", [internal], [out.name], to=FLOAT, name=f"{out.name}_to_fp32"))
    graph.ClearField("node")
    graph.node.extend(_topological(new_nodes, [i.name for i in graph.input] + [i.name for i in graph.initializer]))
    model = shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model, fp32_nodes


def _topological(nodes: list[onnx.NodeProto], available: Iterable[str]) -> list[onnx.NodeProto]:
    """Order nodes so each comes after the producers of its inputs (casts were appended out of place)."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise ValueError(f"FP16 conversion produced a cycle or dangling input near {rest[0].name!r}")
        pending = rest
    return ordered


def _after_mapper(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    """True when ``node`` is the mapper or downstream of it (its inputs trace back to a mapper node)."""
    producer = {out: n for n in graph.node for out in n.output}
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if COORDINATE_BRANCH in n.name:
            return True
        if n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(producer[i] for i in n.input if i in producer)
    return False


def fp32_tensor_check(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] = default_fp32_nodes
                      ) -> list[str]:
    """Block-listed nodes, or nodes on a GridSample coordinate path after the mapper, that touch an FP16 float
    tensor (empty = the coordinates are FP32 from the mapper to GridSample)."""
    inferred = shape_inference.infer_shapes(model)
    elem = {vi.name: vi.type.tensor_type.elem_type
            for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    elem.update({i.name: i.data_type for i in inferred.graph.initializer})
    bad = []
    path = coordinate_path(inferred)
    for node in inferred.graph.node:
        on_path = node.name in path and _after_mapper(node, inferred.graph)
        if on_path or (keep_fp32(node) and node.op_type != "Cast"):
            floats = [elem.get(t) for t in [*node.input, *node.output] if t and elem.get(t) in (FLOAT, HALF)]
            if HALF in floats:
                bad.append(node.name)
    return bad
