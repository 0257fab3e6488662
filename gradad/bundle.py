"""The model bundle contract between stages (DESIGN.md section 5): ``bundle.json`` and its files.

Torch-free: the runtime reads and verifies bundles with this module alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jsonschema

from gradad.errors import GradError

BUNDLE_SCHEMA_VERSION = 1
MANIFEST_NAME = "bundle.json"
FP32_ONNX = "model.onnx"
FP16_ONNX = "model.fp16.onnx"


class BundleError(GradError):
    """A model bundle that is missing, malformed, tampered with or made for another version/device."""


_FILE_ENTRY = {
    "type": "object",
    "required": ["sha256", "bytes"],
    "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "bytes": {"type": "integer"}},
}

BUNDLE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "gradad model bundle",
    "type": "object",
    "required": ["schema_version", "gradad_version", "created", "name", "preset", "backbone", "input",
                 "outputs", "classes", "training_data", "onnx", "files", "parity", "engines", "calibration"],
    "properties": {
        "schema_version": {"const": BUNDLE_SCHEMA_VERSION},
        "gradad_version": {"type": "string"},
        "created": {"type": "string"},
        "name": {"type": "string"},
        "preset": {"type": "string"},
        "backbone": {
            "type": "object",
            "required": ["name", "out_indices", "weights"],
            "properties": {"name": {"type": "string"}, "out_indices": {"type": "array"},
                           "weights": {"type": "string"}},
        },
        "input": {
            "type": "object",
            "required": ["name", "layout", "dtype", "color", "value_range", "height", "width", "model_height",
                         "model_width", "normalisation", "resize"],
            "properties": {
                "name": {"type": "string"},
                "layout": {"const": "NCHW"},
                "dtype": {"const": "float32"},
                "color": {"const": "RGB"},
                "value_range": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                "height": {"type": "integer", "minimum": 16},
                "width": {"type": "integer", "minimum": 16},
                "model_height": {"type": "integer", "minimum": 16},
                "model_width": {"type": "integer", "minimum": 16},
                "normalisation": {
                    "type": "object",
                    "required": ["mean", "std", "in_graph"],
                    "properties": {"mean": {"type": "array", "minItems": 3, "maxItems": 3},
                                   "std": {"type": "array", "minItems": 3, "maxItems": 3},
                                   "in_graph": {"type": "boolean"}},
                },
                "resize": {"type": "string"},
            },
        },
        "outputs": {"type": "object", "required": ["score", "anomaly_map"]},
        "classes": {"type": "array", "items": {"type": "string"}},
        "training_data": {"type": "object"},
        "onnx": {
            "type": "object",
            "required": ["opset", "exporter", "dynamic_batch", "simplified"],
            "properties": {"opset": {"type": "integer", "minimum": 16, "maximum": 19},
                           "exporter": {"type": "string"}, "dynamic_batch": {"type": "boolean"},
                           "simplified": {"type": "boolean"}},
        },
        "files": {
            "type": "object",
            "required": [FP32_ONNX],
            "additionalProperties": _FILE_ENTRY,
        },
        "parity": {"type": "object", "required": ["onnx_fp32_vs_pytorch", "gates"]},
        "engines": {"type": "array", "items": {"type": "object", "required": ["file", "tensorrt_version",
                                                                            "gpu_name", "compute_capability",
                                                                            "precision"]}},
        "calibration": {"type": ["object", "null"]},
    },
}


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: str | Path) -> dict[str, Any]:
    """The manifest entry of one bundle file: its hash and size."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def validate_manifest(manifest: dict[str, Any], where: str = MANIFEST_NAME) -> None:
    """Raise BundleError unless ``manifest`` matches the schema of this gradad version."""
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != BUNDLE_SCHEMA_VERSION:
        raise BundleError(
            f"{where}: bundle schema version {version!r}, this gradad reads version {BUNDLE_SCHEMA_VERSION}; "
            f"re-export the model with this version (grad-export onnx CHECKPOINT -o DIR)"
        )
    try:
        jsonschema.validate(manifest, BUNDLE_SCHEMA)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"{where}: invalid bundle manifest at {path}: {exc.message}") from exc


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate and write bundle.json atomically."""
    path = Path(bundle_dir) / MANIFEST_NAME
    validate_manifest(manifest, str(path))
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``<bundle_dir>/bundle.json`` with one clear error for every way it can be wrong."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"model bundle not found: {bundle_dir} (create it with grad-export onnx CHECKPOINT -o DIR)")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a model bundle")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    validate_manifest(manifest, str(path))
    return manifest


def verify_files(bundle_dir: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check that each listed file exists and has the hash recorded in the manifest."""
    bundle_dir = Path(bundle_dir)
    for name in names if names is not None else list(manifest["files"]):
        entry = manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"{bundle_dir / MANIFEST_NAME} lists no file {name!r}")
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}; re-export the bundle with grad-export onnx")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise BundleError(
                f"bundle file {path} does not match the hash in {MANIFEST_NAME} (modified or corrupt); "
                f"re-export the bundle with grad-export onnx"
            )
