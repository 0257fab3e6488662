"""The model bundle contract between stages (DESIGN.md section 5): ``bundle.json`` and its files.

Torch-free: the runtime reads and verifies bundles with this module alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import jsonschema

from gradad.errors import GradError

#: Version 2: the graph takes uint8 RGB frames (N, 3, H, W) and casts/normalises inside (version 1: float32 0..255).
BUNDLE_SCHEMA_VERSION = 2
#: Versions this gradad still reads: version 1 bundles (float32 input) keep running; the host then converts frames.
READABLE_SCHEMA_VERSIONS = (1, 2)
#: Input dtype of the graph per schema version.
INPUT_DTYPE_BY_VERSION = {1: "float32", 2: "uint8"}
MANIFEST_NAME = "bundle.json"
FP32_ONNX = "model.onnx"
FP16_ONNX = "model.fp16.onnx"
INT8_ONNX = "model.int8.onnx"
#: ONNX file of each ONNX Runtime precision.
ONNX_BY_PRECISION = {"fp32": FP32_ONNX, "fp16": FP16_ONNX, "int8": INT8_ONNX}
REEXPORT_COMMAND = "grad-export onnx CHECKPOINT -o DIR --overwrite"


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
        "schema_version": {"enum": list(READABLE_SCHEMA_VERSIONS)},
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
                "dtype": {"enum": sorted(set(INPUT_DTYPE_BY_VERSION.values()))},
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
        "calibration": {
            "type": ["object", "null"],
            "required": ["image_threshold"],
            "properties": {"image_threshold": {"type": "number"}, "pixel_threshold": {"type": ["number", "null"]}},
        },
        "refine": {
            "type": ["object", "null"],
            "properties": {"model": {"type": "string"}, "pixel_prior": {"type": "string"}},
        },
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


def check_threshold(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite number > 0, else a one-line error naming ``what``.

    A NaN or infinite threshold passes every defect, a negative one flags every part and 0 divides by zero in
    the normalised score: none of them is ever a usable threshold.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BundleError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise BundleError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def check_calibration(manifest: dict[str, Any], where: str = MANIFEST_NAME) -> None:
    """Raise BundleError unless the calibration thresholds (when present) are finite positive numbers."""
    cal = manifest.get("calibration")
    if not cal:
        return
    check_threshold(cal.get("image_threshold"), f"{where}: calibration.image_threshold")
    if cal.get("pixel_threshold") is not None:
        check_threshold(cal["pixel_threshold"], f"{where}: calibration.pixel_threshold")


def referenced_files(manifest: dict[str, Any]) -> list[tuple[str, Any]]:
    """(where in bundle.json, file name) of every file the manifest points at."""
    refs: list[tuple[str, Any]] = [(f"files/{name}", name) for name in manifest.get("files") or {}]
    refs += [(f"engines/{i}/file", e.get("file")) for i, e in enumerate(manifest.get("engines") or [])
             if isinstance(e, dict)]
    refine = manifest.get("refine")
    if isinstance(refine, dict):
        refs += [(f"refine/{key}", refine[key]) for key in ("model", "pixel_prior") if key in refine]
    return refs


def check_file_name(name: Any, where: str) -> None:
    """A bundle file name must be a relative path inside the bundle: no absolute path, drive or ``..``."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise BundleError(f"{where}: invalid bundle file name {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise BundleError(f"{where}: file name {name!r} points outside the bundle folder (absolute paths and '..' "
                          f"are refused)")


def bundle_file(bundle_dir: str | Path, name: str) -> Path:
    """The path of bundle file ``name``, refused unless it resolves inside ``bundle_dir`` (symlinks included)."""
    bundle_dir = Path(bundle_dir)
    check_file_name(name, str(bundle_dir / MANIFEST_NAME))
    path = bundle_dir / name
    root = bundle_dir.resolve()
    if not path.resolve().is_relative_to(root):
        raise BundleError(f"bundle file {path} resolves to {path.resolve()}, outside the bundle folder {root} "
                          f"(a symlink escaping the bundle is refused)")
    return path


def validate_manifest(manifest: dict[str, Any], where: str = MANIFEST_NAME) -> None:
    """Raise BundleError unless ``manifest`` matches the schema of this gradad version, every file it names
    stays inside the bundle folder and its thresholds are finite positive numbers."""
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise BundleError(
            f"{where}: bundle schema version {version!r}, this gradad reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; re-export the model with this version "
            f"({REEXPORT_COMMAND})"
        )
    try:
        jsonschema.validate(manifest, BUNDLE_SCHEMA)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"{where}: invalid bundle manifest at {path}: {exc.message}") from exc
    dtype = manifest["input"]["dtype"]
    if dtype != INPUT_DTYPE_BY_VERSION[version]:
        raise BundleError(f"{where}: input dtype {dtype!r} does not belong to schema version {version} (expects "
                          f"{INPUT_DTYPE_BY_VERSION[version]!r}); re-export the bundle ({REEXPORT_COMMAND})")
    for key, name in referenced_files(manifest):
        check_file_name(name, f"{where}: {key}")
    check_calibration(manifest, where)


def require_current_schema(manifest: dict[str, Any], bundle_dir: str | Path, what: str) -> None:
    """Refuse an older (still runnable) bundle for an operation that needs the current schema, with the fix."""
    version = manifest.get("schema_version")
    if version != BUNDLE_SCHEMA_VERSION:
        raise BundleError(f"{what} needs a bundle of schema version {BUNDLE_SCHEMA_VERSION} (uint8 input in the "
                          f"graph); {bundle_dir} is version {version}: re-export it first "
                          f"(grad-export onnx CHECKPOINT -o {bundle_dir} --overwrite)")


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
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
        path = bundle_file(bundle_dir, name)
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}; re-export the bundle with grad-export onnx")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise BundleError(
                f"bundle file {path} does not match the hash in {MANIFEST_NAME} (modified or corrupt); "
                f"re-export the bundle with grad-export onnx"
            )
