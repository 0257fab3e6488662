"""The FP32 rule of every reduced-precision form of a bundle: one list, used by the FP16 ONNX
(:mod:`gradad.export.fp16`), the INT8 QDQ ONNX (:mod:`gradad.export.int8`, its quantiser's exclusions) and the
TensorRT per-layer FP32 pins (:mod:`gradad.export.engine`). A node (or TensorRT layer, which the ONNX parser names
after its node) stays FP32 when it is a GridSample or its name matches :data:`FP32_NAME_PATTERNS` or the map head
(:func:`is_map_head_name`); FP16/INT8 also keep the coordinate path from a mapper to each GridSample.

The groups, and why (DESIGN.md section 6; measured on the unified MTD + tyre edge model, 46 parity images, ONNX
Runtime CPU; "map" = relative L2 error of the anomaly map against FP32):

* :data:`COORDINATE_BRANCH`, :data:`GRID_MODULES`: the coordinate mappers and the grid modules. FP16 coordinates
  lose sub-cell precision; ONNX Runtime's CUDA GridSample is FP32-only.
* :data:`GRAD_ARITHMETIC`: the model's own arithmetic, named by parameterless modules of
  ``gradad.training.model`` — the abnormal query's standardisation, the pair similarity d = cos(x_a, x), the
  similarity refinement (its cosine and its hard mask M = [0.05 m < 0.5]) and the feature-resolution map
  ||x_ref - x|| + w relu(d). Both cosines form |a|^2 |b|^2 before the square root: about 5e6 per position on
  these features (up to 2e8), far past FP16's 65504, so on FP16 hardware they overflow. The hard mask flips where
  m sits near its threshold, and each flip moves the map a lot (FP16 with the whole extractor FP32: map 1.5e-2 with
  this arithmetic FP16, 1.3e-4 with it FP32). Element-wise work on one feature map: negligible cost.
* :data:`MAP_HEAD` and :func:`is_map_head_name`: up-sampling, smoothing and the image score.
* :data:`EARLY_EXTRACTOR`: the extractor's stem and blocks 0-2 (about 12% of the edge model's multiply-adds).
  The map is a feature-reconstruction error, and rounding in the first layers grows through the extractor into
  mask flips: FP16 map 2.5e-2 (gate 2e-2) with the extractor FP16, 2.3e-2 with the stem + block 0 FP32, 2.4e-3
  with blocks 0-2 FP32. INT8: map 0.39 with stem + block 0 FP32 (gate 0.15), 0.097 with blocks 0-2.
  Kept in reduced precision: the rest of the extractor, both fusion CNNs (the bulk of the work) — the abnormal
  branch's CNN in FP32 changed neither the FP16 map (2.54e-2 -> 2.55e-2) nor the INT8 map (0.392 -> 0.390).
* :func:`is_graph_prologue_name`: the input cast and normalisation of the exported wrapper (root-scope ops), so the
  FP32 stem reads an unrounded image.

Graphs exported before the named modules existed have the same arithmetic as ops directly in the model's scope
(``/detector/model/Mul_4``); :func:`is_model_arithmetic_name` keeps those too.
"""

from __future__ import annotations

import onnx

#: The coordinate mappers: ``/mapper/`` and ``/abnormal_mapper/``.
COORDINATE_BRANCH = "mapper/"
#: The grid modules (``/normal_grid/``, ``/abnormal_grid/``), which reshape coordinates right before GridSample.
GRID_MODULES = "_grid/"
#: The model's own arithmetic (parameterless named modules in ``gradad.training.model``).
GRAD_ARITHMETIC = ("/standardize/", "/pair_similarity/", "/refine/", "/map_fusion/")
#: The map head module (its ops are mostly inlined under the detector: see :func:`is_map_head_name`).
MAP_HEAD = "/head/"
#: The extractor's stem and first three blocks.
EARLY_EXTRACTOR = ("/extractor/body/conv_stem", "/extractor/body/bn1", "/extractor/body/blocks.0/",
                   "/extractor/body/blocks.1/", "/extractor/body/blocks.2/")
#: Every name fragment kept FP32 (TensorRT pins match these as substrings of layer names).
FP32_NAME_PATTERNS = (COORDINATE_BRANCH, GRID_MODULES, *GRAD_ARITHMETIC, MAP_HEAD, *EARLY_EXTRACTOR)

DETECTOR_SCOPE = "detector"
MODEL_SCOPE = "model"


def _parts(name: str) -> list[str]:
    return (name or "").split("/")


def is_map_head_name(name: str) -> bool:
    """A ``/head/`` module op, or an op of the detector itself (``/detector/Resize``: the TorchScript export inlines
    the head's up-sampling, smoothing and score there)."""
    parts = _parts(name)
    return MAP_HEAD in (name or "") or (len(parts) == 3 and parts[0] == "" and parts[1] == DETECTOR_SCOPE)


def is_model_arithmetic_name(name: str) -> bool:
    """An op directly in the GRAD model's scope (``/detector/model/Mul_4``): its own arithmetic in graphs exported
    before :data:`GRAD_ARITHMETIC` named it; today only what no named module holds (the feature-space fusion
    forms' ``x_n + w x_a``)."""
    parts = _parts(name)
    return len(parts) == 4 and parts[0] == "" and parts[1] == DETECTOR_SCOPE and parts[2] == MODEL_SCOPE


def is_graph_prologue_name(name: str) -> bool:
    """A root-scope op of the exported wrapper (``/Cast``, ``/Sub``, ``/Mul``: the input cast and normalisation)."""
    parts = _parts(name)
    return len(parts) == 2 and parts[0] == "" and bool(parts[1])


def keeps_fp32_name(name: str) -> bool:
    """The FP32 rule on a node or TensorRT layer name."""
    return (any(p in (name or "") for p in FP32_NAME_PATTERNS) or is_map_head_name(name)
            or is_model_arithmetic_name(name) or is_graph_prologue_name(name))


def keeps_fp32(node: onnx.NodeProto) -> bool:
    """The FP32 rule on an ONNX node: GridSample, or a name :func:`keeps_fp32_name` keeps."""
    return node.op_type == "GridSample" or keeps_fp32_name(node.name)
