"""A minimal typed bundle for tests that need a bundle folder without exporting a model."""

from __future__ import annotations

from pathlib import Path

from gradad.bundle import (BUNDLE_SCHEMA_VERSION, FP32_ONNX, Backbone, Bundle, EngineStamp, FileEntry, InputSpec,
                           Normalisation, OnnxInfo)


def minimal_bundle(directory: Path, height: int = 64, width: int = 64, files: dict[str, FileEntry] | None = None,
                   engines: list[EngineStamp] | None = None) -> Bundle:
    """A schema-valid Bundle in ``directory`` (not written); ``files`` default to a placeholder FP32 entry."""
    return Bundle(
        schema_version=BUNDLE_SCHEMA_VERSION, gradad_version="test", created="2026-01-01T00:00:00+00:00",
        name=directory.name, preset="edge", backbone=Backbone("tf_efficientnet_lite0", [2, 3], "packaged"),
        input=InputSpec("image", "NCHW", "uint8", "RGB", [0, 255], height, width, height, width,
                        Normalisation([0.5] * 3, [0.5] * 3, True), "caller"),
        outputs={"score": {}, "anomaly_map": {}}, classes=["good"], training_data={},
        onnx=OnnxInfo(17, "test", True, False),
        files=files if files is not None else {FP32_ONNX: FileEntry("0" * 64, 0)},
        parity={"onnx_fp32_vs_pytorch": {}, "gates": {}}, engines=engines or [], directory=directory)
