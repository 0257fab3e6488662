"""Preset models with random weights (for size and speed, which do not depend on weight values) and their ONNX
graphs, exported exactly as ``grad-export onnx`` does (same wrapper, opset, simplification, FP16 block-list)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from gradad.export.fp16 import convert_to_fp16
from gradad.export.graph import ExportModule
from gradad.export.onnx_export import export_onnx_fp32, simplify
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import RunConfig, preset_config
from gradad.training.image_gaussian import placeholder_statistics
from gradad.training.model import GRADDetector, GRADModel


def random_detector(cfg: RunConfig) -> GRADDetector:
    """The eval-mode detector of ``cfg`` with random backbone and GRAD weights (``backbone.weights=none``)."""
    cfg.backbone.weights = "none"
    size = cfg.data.image_size
    extractor = FeatureExtractor(cfg.backbone)
    with torch.no_grad():
        x = extractor(torch.zeros(1, 3, size, size))
    model = GRADModel(x.shape[1], tuple(x.shape[-2:]), cfg.model).eval()
    if model.image_gaussian is not None:  # its ops count in size and speed: statistics of a two-class model
        model.image_gaussian.set_statistics(placeholder_statistics(model.image_gaussian.dims(x.shape[1])))
    return GRADDetector(extractor, model, (size, size)).eval()


def export_preset_onnx(preset: str, out_dir: str | Path, fp16: bool = True) -> dict[str, Path]:
    """Write ``<preset>.onnx`` (FP32) and ``<preset>.fp16.onnx`` of a random-weight preset; returns their paths."""
    detector = random_detector(preset_config(preset))
    module = ExportModule(detector, detector.extractor.mean, detector.extractor.std).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": out / f"{preset}.onnx"}
    model32 = simplify(export_onnx_fp32(module, paths["fp32"]))
    onnx.save(model32, paths["fp32"])
    if fp16:
        paths["fp16"] = out / f"{preset}.fp16.onnx"
        onnx.save(convert_to_fp16(model32)[0], paths["fp16"])
    return paths


def export_patchcore_onnx(bank_size: int, image_size: int, out_dir: str | Path) -> Path:
    """``patchcore.onnx``: PatchCore on the edge preset's extractor (random weights) with a random memory bank of
    ``bank_size`` rows and PatchCore's own map head, exported like a bundle's FP32 graph (uint8 input, normalisation
    inside), so its latency row runs on ONNX Runtime as GRAD's does."""
    from gradad.benchmarks.patchcore import PATCHCORE_HEAD, PatchCoreConfig, PatchCoreGraph
    from gradad.training.model import AnomalyHead

    cfg = preset_config("edge")
    cfg.backbone.weights = "none"
    extractor = FeatureExtractor(cfg.backbone).eval()
    bank = torch.randn(bank_size, extractor.channels, generator=torch.Generator().manual_seed(0))
    graph = PatchCoreGraph(extractor, bank, AnomalyHead(PATCHCORE_HEAD, (image_size, image_size)),
                           PatchCoreConfig().neighbourhood).eval()
    module = ExportModule(graph, extractor.mean, extractor.std).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "patchcore.onnx"
    onnx.save(simplify(export_onnx_fp32(module, path)), path)
    return path
