"""Variants of a bundle graph that are not part of the bundle (comparisons, older contracts). onnx only."""

from __future__ import annotations

import onnx
from onnx import TensorProto


def float_input_variant(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph taking float32 frames of 0..255 values (bundle schema 1, the pre-uint8 contract).

    The uint8 graph's first node casts the input to float32; on a float32 input that cast is a no-op, so the
    numbers are identical. Used by benchmarks to measure today's float path side by side with the uint8 one.
    """
    variant = onnx.ModelProto.FromString(model.SerializeToString())
    variant.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(variant)
    return variant
