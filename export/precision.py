"""The FP32 rule of every reduced-precision form of a bundle: one list, used by the FP16 ONNX
(:mod:`gradad.export.fp16`), the INT8 QDQ ONNX (:mod:`gradad.export.int8`, its quantiser's exclusions) and the
TensorRT per-layer FP32 pins (:mod:`gradad.export.engine`). A node (or TensorRT layer, which the ONNX parser names
after its node) stays FP32 when it is a GridSample or its name matches :data:`FP32_NAME_PATTERNS` or the map head
(:func:`is_map_head_name`); FP16/INT8 also keep the coordinate path from a mapper to each GridSample.

The groups, and why (DESIGN.md section 6). Numbers: the unified MTD + tyre edge model on ONNX Runtime CPU, the
relative L2 error of the anomaly map against FP32 — FP16 on the 46 parity images (gate 2e-2), INT8 on 64 labelled
test images (gate 0.15, AUROC drop <= 0.5 point); "full rule" = FP16 2.4e-3, INT8 0.097 (AUROC +0.4 point):

* :data:`COORDINATE_BRANCH`, :data:`GRID_MODULES`: the coordinate mappers and the grid modules. FP16 coordinates
  lose sub-cell precision; ONNX Runtime's CUDA GridSample is FP32-only.
* :data:`GRAD_ARITHMETIC`: the model's own arithmetic, named by parameterless modules of
  ``gradad.training.model`` — the abnormal query's standardisation, the pair similarity d = cos(x_a, x), the
  similarity refinement (its cosine, and the hard mask M = [0.05 m < 0.5] in models whose map still uses it) and
  the feature-resolution map ||x_ref - x|| + w relu(d). The hard mask flips where m sits near its threshold and each
  flip moves the map a lot:
  FP16 1.0e-2 with this arithmetic in FP16. Both cosines also form |a|^2 |b|^2 before the square root: median 3e6
  to 5e6 per position on these features (up to 2e8), past FP16's 65504, so an FP16 kernel that stores the product
  overflows (ONNX Runtime's CPU runs these element-wise chains in FP32 internally and cannot show it). Element-wise work on one feature map.
* :data:`MAP_HEAD` and :func:`is_map_head_name`: up-sampling, smoothing (two convolutions) and the image score.
  INT8 of the smoothing: map 0.27, score 0.46.
* :data:`EARLY_EXTRACTOR`: the extractor's stem and blocks 0-2 (12% of the model's multiply-adds). The map is a
  feature-reconstruction error, and rounding in the first layers grows through the extractor into mask flips:
  blocks 1-2 in reduced precision: FP16 2.3e-2, INT8 0.39; block 2 alone: FP16 score error 2.1e-2 (gate 1e-2),
  INT8 AUROC drop 0.9 point.
* :func:`is_graph_prologue_name`: the input cast and normalisation of the exported wrapper (root-scope ops): the
  FP32 stem reads the image without an FP32 -> FP16 -> FP32 round trip (no measurable effect on the error).

Kept in reduced precision: extractor blocks 3-4 and both fusion CNNs — 84% of the multiply-adds — except that
INT8 also keeps the rest of the extractor (:func:`keeps_fp32_in_int8`, :data:`EXTRACTOR`; INT8 then covers the two
fusion CNNs, 70% of the multiply-adds). INT8 of blocks 3-4 was most of INT8's error, and the image Gaussian reads
their pooled features through a whitening that amplifies it: ``models/unified_s6`` (image Gaussian) with blocks 3-4
in INT8, score relative L2 0.107 and image AUROC -0.78 point (refused by the gate); with the extractor kept, map
0.008, score 0.007, AUROC -0.10 point. FP16 of blocks 3-4 is well inside its gate (score 1.9e-3), so FP16 and the
FP16 layers of a TensorRT INT8 engine keep them in FP16. The abnormal
branch's CNN in FP32 changes nothing measurable (FP16 2.37e-3 -> 2.39e-3, INT8 0.097 -> 0.097), and on the old rule
neither did its CNN, pair similarity and the map arithmetic together (FP16 2.54e-2 -> 2.55e-2): the error that
failed the gates came from the extractor and the refinement mask, not from w * relu(d).

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
GRAD_ARITHMETIC = ("/standardize/", "/pair_similarity/", "/refine/", "/map_fusion/", "/image_gaussian/")
#: The map head module (its ops are mostly inlined under the detector: see :func:`is_map_head_name`).
MAP_HEAD = "/head/"
#: The extractor's stem and first three blocks.
EARLY_EXTRACTOR = ("/extractor/body/conv_stem", "/extractor/body/bn1", "/extractor/body/blocks.0/",
                   "/extractor/body/blocks.1/", "/extractor/body/blocks.2/")
#: The whole extractor, kept out of INT8 (:func:`keeps_fp32_in_int8`).
EXTRACTOR = "/extractor/"
#: backbone.exposure's per-image gain before the stem (an image mean over 196k values, in FP16 near its limit).
EXPOSURE = "/extractor/exposure/"
#: Every name fragment kept FP32 (TensorRT pins match these as substrings of layer names).
FP32_NAME_PATTERNS = (COORDINATE_BRANCH, GRID_MODULES, *GRAD_ARITHMETIC, MAP_HEAD, EXPOSURE, *EARLY_EXTRACTOR)

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


def keeps_fp32_in_int8(node: onnx.NodeProto) -> bool:
    """INT8's rule: the FP32 rule (:func:`keeps_fp32`) plus the rest of the extractor (:data:`EXTRACTOR`)."""
    return keeps_fp32(node) or EXTRACTOR in (node.name or "")
