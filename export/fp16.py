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
    # The coordinate path is FP32 only from the mapper on; before it (the extractor) FP16 is wanted.
    path = coordinate_path(model)
    fp32_nodes = [n.name for n in graph.node if keep_fp32(n) or (n.name in path and _after_mapper(n, graph))]
    conversion = _Conversion(model, set(fp32_nodes))
    conversion.convert_initializers()
    nodes = conversion.rewrite_nodes()
    conversion.keep_outputs_fp32(nodes)
    graph.ClearField("node")
    graph.node.extend(_topological(nodes, [i.name for i in graph.input] + [i.name for i in graph.initializer]))
    model = shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model, fp32_nodes


class _Conversion:
    """The state of one FP16 conversion: every float tensor's precision as the nodes are rewritten in order
    (graph inputs FP32, initializers as their consumers need them) and the Cast nodes added on the way."""

    def __init__(self, model: onnx.ModelProto, fp32_nodes: set[str]) -> None:
        self.graph = model.graph
        self.fp32_nodes = fp32_nodes
        inferred = shape_inference.infer_shapes(model)
        self.elem: dict[str, int] = {vi.name: vi.type.tensor_type.elem_type for vi in
                                     [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
        self.elem.update({init.name: init.data_type for init in self.graph.initializer})
        self.current: dict[str, int] = {i.name: FLOAT for i in self.graph.input if self.elem.get(i.name) == FLOAT}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.graph.node:
            for idx, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, idx))
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list[onnx.NodeProto] = []

    def wanted(self, node: onnx.NodeProto, idx: int) -> int:
        """The precision input ``idx`` of ``node`` must have."""
        if node.name in self.fp32_nodes or idx in _FP32_ONLY_INPUTS.get(node.op_type, ()):
            return FLOAT
        return HALF

    def convert_initializers(self) -> None:
        """FP16 initializers where every consumer wants FP16; an FP16 twin (``<name>_fp16``) where both do."""
        twins = []
        for init in list(self.graph.initializer):
            if init.data_type != FLOAT:
                continue
            needs = {self.wanted(n, i) for n, i in self.consumers.get(init.name, [])}
            if needs == {HALF}:
                init.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(init)), init.name))
                self.current[init.name] = HALF
            elif needs == {FLOAT, HALF}:
                half = numpy_helper.from_array(_to_half(numpy_helper.to_array(init)), init.name + "_fp16")
                twins.append(half)
                self.current[init.name] = FLOAT
                self.current[half.name] = HALF
            else:
                self.current[init.name] = FLOAT
        self.graph.initializer.extend(twins)

    def cast_to(self, name: str, to: int) -> str:
        """``name`` in precision ``to``: its FP16 twin, or one shared Cast node per (tensor, precision)."""
        if name + "_fp16" in self.current and to == HALF:
            return name + "_fp16"
        key = (name, to)
        if key not in self.casts:
            out = f"{name}_as_{'fp16' if to == HALF else 'fp32'}"
            self.new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}_cast"))
            self.current[out] = to
            self.casts[key] = out
        return self.casts[key]

    def rewrite_nodes(self) -> list[onnx.NodeProto]:
        """Every node with its inputs cast to the precision it wants and its float constants and Cast targets in
        FP16 where it runs in FP16; the Cast nodes added are in the list too (out of order: sorted later)."""
        for node in self.graph.node:
            half_node = node.name not in self.fp32_nodes
            for idx, name in enumerate(node.input):
                if name and self.current.get(name) is not None:
                    need = self.wanted(node, idx)
                    if self.current[name] != need:
                        node.input[idx] = self.cast_to(name, need)
            if half_node:
                _constants_to_half(node)
            for out in node.output:
                if self.elem.get(out) == FLOAT:
                    self.current[out] = HALF if half_node else FLOAT
            self.new_nodes.append(node)
        return self.new_nodes

    def keep_outputs_fp32(self, nodes: list[onnx.NodeProto]) -> None:
        """Graph outputs computed in FP16 are renamed inside the graph and cast back to FP32 under their name."""
        for out in self.graph.output:
            if self.current.get(out.name) != HALF:
                continue
            internal = out.name + "_fp16_internal"
            for node in nodes:
                for names in (node.output, node.input):
                    for i, name in enumerate(names):
                        if name == out.name:
                            names[i] = internal
            nodes.append(helper.make_node("Cast", [internal], [out.name], to=FLOAT, name=f"{out.name}_to_fp32"))


def _constants_to_half(node: onnx.NodeProto) -> None:
    """A node running in FP16: a Cast to FP32 casts to FP16, a float Constant(OfShape) value becomes FP16."""
    if node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = HALF
    if node.op_type in ("Constant", "ConstantOfShape"):
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(attr.t)), attr.t.name))


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
