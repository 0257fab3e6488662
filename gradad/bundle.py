"""The model bundle contract between stages (DESIGN.md section 5): ``bundle.json`` and its files.

Torch-free: the runtime reads and verifies bundles with this module alone.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import logging
import math
import types
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Collection, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import jsonschema

from gradad.errors import GradError
from gradad.files import atomic_write_text
from gradad.text import one_line, shown_value

log = logging.getLogger(__name__)

#: Version 2: the graph takes uint8 RGB frames (N, 3, H, W) and casts/normalises inside (version 1: float32 0..255).
BUNDLE_SCHEMA_VERSION = 2
#: Versions this gradad still reads: version 1 bundles (float32 input) keep running; the host then converts frames.
READABLE_SCHEMA_VERSIONS = (1, 2)
#: Input dtype of the graph per schema version.
INPUT_DTYPE_BY_VERSION = {1: "float32", 2: "uint8"}
MANIFEST_NAME = "bundle.json"
#: The values of backbone.exposure (training's BackboneConfig and the bundle's Backbone record)
EXPOSURE_RULES = ("none", "gain")
#: Largest backbone.exposure_max_gain: a full-scale step on an 8-bit input; more is "unlimited" (null)
EXPOSURE_MAX_GAIN_LIMIT = 255.0
#: What backbone.exposure_max_gain accepts, as every refusal of it says (see :func:`exposure_gain_limit_ok`)
EXPOSURE_MAX_GAIN_RULE = f"must be null (unlimited) or a number in [1, {EXPOSURE_MAX_GAIN_LIMIT:g}]"


def exposure_text(rule: str, max_gain: float | None) -> str:
    """`` (exposure gain, at most 2x)`` for a description line; empty for "none"."""
    if rule == "none":
        return ""
    return f" (exposure {rule}{'' if max_gain is None else f', at most {max_gain:g}x'})"


def exposure_gain_limit_ok(value: object) -> bool:
    """Whether ``value`` is a valid backbone.exposure_max_gain: None (unlimited) or a number in [1, 255]."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and 1.0 <= value <= EXPOSURE_MAX_GAIN_LIMIT)


#: Largest bundle.json read. A real one is ~50 KB (a calibrated two-class bundle); JSON of many small objects takes
#: ~25x its size in memory once parsed, so an unbounded file from someone else could exhaust a Jetson's RAM.
MANIFEST_MAX_BYTES = 16 * 2**20
#: Largest input side bundle.json may give (input.height/width and the model's): every frame is resized to this
#: size and batched, so without a bound a handed-over bundle could make each frame allocate GBs. 8192 covers
#: full-frame inputs of the largest industrial cameras (--input-size) and is far beyond any model input size.
MAX_INPUT_SIDE = 8192
FP32_ONNX = "model.onnx"
FP16_ONNX = "model.fp16.onnx"
INT8_ONNX = "model.int8.onnx"


class _StrEnum(str, Enum):
    """An enum equal to, and printed as, its string value (what the CLI flags and bundle.json hold)."""

    def __str__(self) -> str:
        return self.value


class Precision(_StrEnum):
    """Numeric precision of a model file or engine (``Precision.FP16 == "fp16"``)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class BackendKind(_StrEnum):
    """Inference backend a command asks for (``auto``: TensorRT where an engine fits, else ONNX Runtime)."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"


#: ONNX file of each ONNX Runtime precision.
ONNX_BY_PRECISION = {Precision.FP32.value: FP32_ONNX, Precision.FP16.value: FP16_ONNX, Precision.INT8.value: INT8_ONNX}
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
                           "weights": {"type": "string"}, "exposure": {"enum": list(EXPOSURE_RULES)},
                           "exposure_max_gain": {"anyOf": [{"type": "null"}, {
                               "type": "number", "minimum": 1, "maximum": EXPOSURE_MAX_GAIN_LIMIT}]}},
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
                "height": {"type": "integer", "minimum": 16, "maximum": MAX_INPUT_SIDE},
                "width": {"type": "integer", "minimum": 16, "maximum": MAX_INPUT_SIDE},
                "model_height": {"type": "integer", "minimum": 16, "maximum": MAX_INPUT_SIDE},
                "model_width": {"type": "integer", "minimum": 16, "maximum": MAX_INPUT_SIDE},
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
            "properties": {
                "image_threshold": {"type": "number"}, "pixel_threshold": {"type": ["number", "null"]},
                "classes": {"type": ["object", "null"], "additionalProperties": {
                    "type": "object", "required": ["image_threshold", "pixel_threshold"],
                    "properties": {"image_threshold": {"type": "number"}, "pixel_threshold": {"type": "number"}}}},
            },
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


#: Hex digits of an image's SHA-256 that bundle.json keeps per training image (64 bits: no collision among a
#: dataset's images, a few kB for a thousand of them).
IMAGE_DIGEST_CHARS = 16


def image_digest(path: str | Path) -> str:
    """The short content digest of an image file that ``training_data.trained_good_digests`` records: it names
    the image wherever a copy of it lies, without naming the training machine's folders."""
    return sha256_file(path)[:IMAGE_DIGEST_CHARS]


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
    classes = cal.get("classes")
    if classes is None:
        return
    if not isinstance(classes, dict):
        raise BundleError(f"{where}: calibration.classes must be a mapping of class name to thresholds")
    for name, entry in classes.items():
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: calibration.classes.{name} must be a mapping")
        for key in ("image_threshold", "pixel_threshold"):
            check_threshold(entry.get(key), f"{where}: calibration.classes.{name}.{key}")


def referenced_files(manifest: dict[str, Any]) -> list[tuple[str, Any]]:
    """(where in bundle.json, file name) of every file the manifest points at."""
    refs: list[tuple[str, Any]] = [(f"files/{name}", name) for name in manifest.get("files") or {}]
    refs += [(f"engines/{i}/file", e.get("file")) for i, e in enumerate(manifest.get("engines") or [])
             if isinstance(e, dict)]
    refine = manifest.get("refine")
    if isinstance(refine, dict):
        refs += [(f"refine/{key}", refine[key]) for key in ("model", "pixel_prior") if key in refine]
    return refs


#: The bundle's TensorRT timing cache (not a listed file: a build speed-up, rebuilt when missing or stale).
TIMING_CACHE = "timing.cache"
#: Unlisted names gradad leaves in a bundle folder: the timing cache and hidden temporaries. Anything else a
#: bundle does not list is the user's, even when named like ours (``model_backup.onnx``, a hand-built ``.plan``).
BUNDLE_SCRATCH_PATTERNS = (TIMING_CACHE, ".*tmp*")


def foreign_entries(bundle_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Names in ``bundle_dir`` that gradad did not put there: not bundle.json, not a file the manifest lists, not
    one of :data:`BUNDLE_SCRATCH_PATTERNS` (sub-folders and links always count). What replacing the whole
    folder would destroy."""
    listed = {MANIFEST_NAME} | {PurePosixPath(name).parts[0] for _, name in referenced_files(manifest)
                                if isinstance(name, str) and name.strip()}
    foreign = []
    for entry in Path(bundle_dir).iterdir():
        ours = entry.name in listed or any(fnmatch.fnmatchcase(entry.name, p) for p in BUNDLE_SCRATCH_PATTERNS)
        if not ours or entry.is_symlink() or (entry.is_dir() and entry.name not in listed):
            foreign.append(entry.name)
    return sorted(foreign)


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
    try:
        root, resolved = bundle_dir.resolve(), path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise BundleError(f"bundle file {path}: cannot resolve it ({exc})") from None
    if not resolved.is_relative_to(root):
        raise BundleError(f"bundle file {path} resolves to {resolved}, outside the bundle folder {root} "
                          f"(a symlink escaping the bundle is refused)")
    return path


def validate_manifest(manifest: dict[str, Any], where: str = MANIFEST_NAME) -> None:
    """Raise BundleError unless ``manifest`` matches the schema of this gradad version, every file it names
    stays inside the bundle folder and its thresholds are finite positive numbers."""
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(READABLE_SCHEMA_VERSIONS)
        made_by = manifest.get("gradad_version") if isinstance(manifest, dict) else None
        written_by = one_line(str(made_by), 60) if made_by else "version unknown"
        remedy = (f"it was written by a newer gradad ({written_by}): upgrade gradad on this "
                  f"machine to that version, or re-export the model with this one ({REEXPORT_COMMAND})" if newer
                  else f"re-export the model with this version ({REEXPORT_COMMAND})")
        raise BundleError(
            f"{where}: bundle schema version {shown_value(version)}, this gradad reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; {remedy}"
        )
    try:
        jsonschema.validate(manifest, BUNDLE_SCHEMA)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        # jsonschema quotes the offending value whole: a bundle from someone else can make it megabytes
        raise BundleError(f"{where}: invalid bundle manifest at {one_line(path, 200)}: "
                          f"{one_line(exc.message)}") from None
    dtype = manifest["input"]["dtype"]
    if dtype != INPUT_DTYPE_BY_VERSION[version]:
        raise BundleError(f"{where}: input dtype {shown_value(dtype)} does not belong to schema version {version} "
                          f"(expects {INPUT_DTYPE_BY_VERSION[version]!r}); re-export the bundle ({REEXPORT_COMMAND})")
    for key, name in referenced_files(manifest):
        check_file_name(name, f"{where}: {key}")
    check_calibration(manifest, where)
    max_gain = manifest["backbone"].get("exposure_max_gain")
    if not exposure_gain_limit_ok(max_gain):  # the schema's bounds let NaN through
        raise BundleError(f"{where}: backbone.exposure_max_gain {shown_value(max_gain)} {EXPOSURE_MAX_GAIN_RULE}; "
                          f"re-export the bundle ({REEXPORT_COMMAND})")


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate and write bundle.json atomically."""
    path = Path(bundle_dir) / MANIFEST_NAME
    validate_manifest(manifest, str(path))
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    size = len(text.encode())
    if size > MANIFEST_MAX_BYTES:  # refused here, not by every reader after deployment
        raise BundleError(f"{path} would be {size} bytes, more than the {MANIFEST_MAX_BYTES} a bundle manifest is "
                          "read up to (a real one is ~50 KB): nothing written")
    atomic_write_text(path, text)
    return path


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``<bundle_dir>/bundle.json`` with one clear error for every way it can be wrong."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"model bundle not found: {bundle_dir} (create it with grad-export onnx CHECKPOINT -o DIR)")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a model bundle")
    size = path.stat().st_size
    if size > MANIFEST_MAX_BYTES:
        raise BundleError(f"{path} is {size} bytes: a bundle manifest is read only up to {MANIFEST_MAX_BYTES} bytes "
                          "(a real one is ~50 KB); not a manifest grad-export wrote")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    except ValueError as exc:  # int(): an integer longer than sys.get_int_max_str_digits() (4300) digits
        raise BundleError(f"{path} is not a usable bundle manifest: it holds a number too long to read "
                          f"({str(exc).split(':')[0]})") from None
    validate_manifest(manifest, str(path))
    return manifest


def verify_files(bundle_dir: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check that each listed file exists and has the hash recorded in the manifest (see :meth:`Bundle.verify`)."""
    Bundle.from_dict(manifest, str(Path(bundle_dir) / MANIFEST_NAME), bundle_dir).verify(names)


# ---------------------------------------------------------------------------------------------------------------
# The typed model of bundle.json. Readers and writers use these classes, never string keys: a renamed or added
# field is then one edit here (and in BUNDLE_SCHEMA, which a test checks against these classes).
# Keys this version does not know are kept in ``extra`` so that a newer writer's additions survive a rewrite.
# ---------------------------------------------------------------------------------------------------------------

_EXTRA = "extra"


def _decode(tp: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as type ``tp``: records, optionals, lists and dicts of records; else as is."""
    if value is None:
        return None
    if isinstance(tp, type) and issubclass(tp, _Record):
        return tp.from_json(value)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if origin is list and args:
        return [_decode(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _decode(args[1], v) for k, v in value.items()}
    return copy.deepcopy(value)


def _encode(value: Any) -> Any:
    """The JSON form of a record field."""
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return copy.deepcopy(value)


class _Record:
    """Dataclass mix-in: JSON object <-> typed fields. ``None`` fields are left out of the JSON unless their
    field metadata says ``keep_none``; fields with ``transient`` metadata are never written."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Any:
        """The record of a (schema-checked) JSON object; unknown keys go to ``extra``."""
        hints = get_type_hints(cls)
        names = [f.name for f in fields(cls) if f.name != _EXTRA and not f.metadata.get("transient")]
        kwargs = {n: _decode(hints[n], data[n]) for n in names if n in data}
        if any(f.name == _EXTRA for f in fields(cls)):
            kwargs[_EXTRA] = {k: copy.deepcopy(v) for k, v in data.items() if k not in names}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == _EXTRA or f.metadata.get("transient") or (value is None and not f.metadata.get("keep_none")):
                continue
            out[f.name] = _encode(value)
        out.update(copy.deepcopy(getattr(self, _EXTRA, {})))
        return out


_KEEP_NONE = {"keep_none": True}


@dataclass
class FileEntry(_Record):
    """Hash and size of one bundle file."""

    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: str | Path) -> "FileEntry":
        """The entry of the file at ``path``."""
        return cls(sha256_file(path), Path(path).stat().st_size)


@dataclass
class Backbone(_Record):
    """The frozen extractor the model was trained on."""

    name: str
    out_indices: list[int]
    weights: str
    exposure: str = "none"  # backbone.exposure: applied inside the exported graph; recorded for PatchCore rows
    exposure_max_gain: float | None = None  # backbone.exposure_max_gain; absent in older bundles: unlimited


@dataclass
class Normalisation(_Record):
    """Per-channel mean/std (of 0..1 RGB) and whether the graph applies them."""

    mean: list[float]
    std: list[float]
    in_graph: bool


@dataclass
class InputSpec(_Record):
    """What the graph takes: one NCHW RGB batch of ``height`` x ``width`` (resized to the model size inside)."""

    name: str
    layout: str
    dtype: str
    color: str
    value_range: list[float]
    height: int
    width: int
    model_height: int
    model_width: int
    normalisation: Normalisation
    resize: str

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of a frame as the graph takes it."""
        return int(self.height), int(self.width)

    @property
    def model_hw(self) -> tuple[int, int]:
        """(height, width) the model itself runs at."""
        return int(self.model_height), int(self.model_width)


@dataclass
class OnnxInfo(_Record):
    """How the ONNX files were made."""

    opset: int
    exporter: str
    dynamic_batch: bool
    simplified: bool
    gridsample_nodes: int | None = None
    gridsample: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineStamp(_Record):
    """A TensorRT engine in the bundle and the TensorRT version and GPU it was built for (it runs on no other)."""

    file: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict[str, Any] | None = None
    profiles: int | None = None  # identical optimisation profiles: the most batches in flight (older: 1)
    build_mode: str | None = None
    workspace_mib: int | None = None
    build_seconds: float | None = None
    timing_cache: str | None = field(default=None, metadata=_KEEP_NONE)
    fp32_layers: list[str] | None = None
    parity_vs_onnxruntime: dict[str, Any] | None = None
    #: sha256 of every ONNX file the engine was built from, by bundle file name (older bundles: absent)
    built_from: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stale_sources(self, files: dict[str, "FileEntry"]) -> list[str]:
        """The ONNX files this engine was built from that the bundle now holds in another version (re-exported
        or re-quantised since the build), or no longer lists."""
        return sorted(name for name, sha in (self.built_from or {}).items()
                      if name not in files or files[name].sha256 != sha)


@dataclass
class Calibration(_Record):
    """Thresholds from grad-calibrate and the evidence behind them."""

    image_threshold: float
    pixel_threshold: float | None = field(default=None, metadata=_KEEP_NONE)
    method: str | None = None
    normalisation: str | None = None
    decision: str | None = None
    rules: dict[str, Any] | None = None
    pixel: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    backend: str | None = None
    date: str | None = None
    data: dict[str, Any] | None = None
    warnings: list[str] | None = None
    # per class of a unified bundle (grad-run --class): image_threshold, pixel_threshold, n_good, good_above,
    # false_alarm_rate_upper, other_targets (the far rule at the other usual targets), set by the good-only rules on
    # that class's --good images
    classes: dict[str, dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def for_class(self, name: str) -> tuple[float, float | None] | None:
        """(image, pixel) thresholds of class ``name``, or None when it was not calibrated on its own."""
        entry = (self.classes or {}).get(name)
        return None if entry is None else (entry["image_threshold"], entry["pixel_threshold"])

    def class_values(self, key: str) -> dict[str, float]:
        """``key`` (``image_threshold`` or ``pixel_threshold``) of every class calibrated on its own."""
        return {name: float(entry[key]) for name, entry in (self.classes or {}).items()}


@dataclass
class RefineSection(_Record):
    """The F2PAD refinement files and settings (``grad-refine prepare``/``tune``)."""

    model: str | None = None
    pixel_prior: str | None = None
    source_checkpoint: str | None = None
    prepared: str | None = None
    checkpoint_vs_onnx_max_rel_error: float | None = None
    normal_map_level: float | None = None
    normal_map_level_rule: str | None = None
    feature_scale: float | None = None
    feature_scale_rule: str | None = None
    prior: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    classes: dict[str, dict[str, Any]] | None = None
    tuning: dict[str, dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True for a section with nothing in it (``"refine": {}``): the bundle is not prepared."""
        return not self.to_dict()


@dataclass
class Bundle(_Record):
    """A model bundle: ``bundle.json`` as typed fields, plus the folder it was read from (not written).

    ``Bundle.load(dir)`` reads and checks it (schema, file names confined to the folder, finite positive
    thresholds), ``bundle.verify(names)`` checks file hashes, ``bundle.save()`` checks and writes it atomically.
    """

    schema_version: int
    gradad_version: str
    created: str
    name: str
    preset: str
    backbone: Backbone
    input: InputSpec
    outputs: dict[str, Any]
    classes: list[str]
    training_data: dict[str, Any]
    onnx: OnnxInfo
    files: dict[str, FileEntry]
    parity: dict[str, Any]
    engines: list[EngineStamp]
    calibration: Calibration | None = field(default=None, metadata=_KEEP_NONE)
    source_checkpoint: str | None = None
    data_root: str | None = None
    export_seconds: float | None = None
    refine: RefineSection | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = field(default=None, compare=False, metadata={"transient": True})

    @classmethod
    def from_dict(cls, manifest: Mapping[str, Any], where: str = MANIFEST_NAME,
                  directory: str | Path | None = None) -> "Bundle":
        """Check ``manifest`` (:func:`validate_manifest`) and return it typed."""
        validate_manifest(manifest, where)  # type: ignore[arg-type]
        try:
            bundle = cls.from_json(manifest)
        except (TypeError, AttributeError, ValueError, KeyError) as exc:  # a field of the wrong shape, hand-edited
            raise BundleError(f"{where}: a setting has the wrong type ({type(exc).__name__}: {exc}); re-export the "
                              f"bundle ({REEXPORT_COMMAND}) or restore its bundle.json") from None
        bundle.directory = Path(directory) if directory is not None else None
        return bundle

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "Bundle":
        """Read and check ``<bundle_dir>/bundle.json`` (one clear BundleError for every way it can be wrong)."""
        bundle_dir = Path(bundle_dir)
        return cls.from_dict(read_manifest(bundle_dir), str(bundle_dir / MANIFEST_NAME), bundle_dir)

    def save(self, bundle_dir: str | Path | None = None) -> Path:
        """Check and write bundle.json atomically into ``bundle_dir`` (default: the folder it was read from)."""
        return write_manifest(self._dir(bundle_dir), self.to_dict())

    def _dir(self, bundle_dir: str | Path | None = None) -> Path:
        if bundle_dir is not None:
            return Path(bundle_dir)
        if self.directory is None:
            raise BundleError(f"bundle {self.name!r} has no folder: load it with Bundle.load(DIR) or name one")
        return self.directory

    def file(self, name: str) -> Path:
        """Path of bundle file ``name``, refused unless it resolves inside the bundle folder."""
        return bundle_file(self._dir(), name)

    def add_file(self, name: str) -> None:
        """Record (or re-record) the hash and size of bundle file ``name``."""
        self.files[name] = FileEntry.of(self.file(name))

    def verify(self, names: Sequence[str] | None = None) -> None:
        """Check that each named file (default: all) is listed, present and has its recorded hash."""
        bundle_dir = self._dir()
        for name in names if names is not None else list(self.files):
            entry = self.files.get(name)
            if entry is None:
                raise BundleError(f"{bundle_dir / MANIFEST_NAME} lists no file {name!r}{self._fix(name)}")
            path = bundle_file(bundle_dir, name)
            if not path.is_file():
                raise BundleError(f"bundle file missing: {path}{self._fix(name)}")
            if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
                raise BundleError(
                    f"bundle file {path} does not match the hash in {MANIFEST_NAME} (modified or corrupt)"
                    f"{self._fix(name)}"
                )

    def _fix(self, name: str) -> str:
        """How to restore bundle file ``name``: an engine is rebuilt on this device, or copied again with the
        bundle.json that records it and trusted; an ONNX file comes from a re-export."""
        engine = next((e for e in self.engines if e.file == name), None)
        if self.refine is not None and name in (self.refine.model, self.refine.pixel_prior):
            return (f"; grad-refine prepare --bundle {self._dir()} --checkpoint MODEL.pt --data TRAIN_ROOT writes the "
                    f"refinement files anew (it drops tuned F2PAD settings: run grad-refine tune after it)")
        if engine is None:
            return "; re-export the bundle with grad-export onnx" if name in self.files else ""
        where = self._dir()
        listed = "" if name in self.files else " (its engines name it)"
        return (f"{listed}; rebuild the engine on this device (grad-export build --{engine.precision} {where} "
                f"--parity-images DIR), or copy it again with the bundle.json that records it from the machine that "
                f"built it and trust it (grad-export trust {where})")

    @property
    def input_dtype(self) -> str:
        """dtype the graph takes (uint8 from schema version 2, float32 before)."""
        return INPUT_DTYPE_BY_VERSION[self.schema_version]

    @property
    def is_current(self) -> bool:
        """Whether the bundle has this gradad's schema version (older ones still run, with host conversion)."""
        return self.schema_version == BUNDLE_SCHEMA_VERSION

    def require_current(self, what: str) -> None:
        """Refuse an older (still runnable) bundle for an operation that needs the current schema, with the fix."""
        if not self.is_current:
            raise BundleError(f"{what} needs a bundle of schema version {BUNDLE_SCHEMA_VERSION} (uint8 input in "
                              f"the graph); {self._dir()} is version {self.schema_version}: re-export it first "
                              f"(grad-export onnx CHECKPOINT -o {self._dir()} --overwrite)")

    def engines_for(self, precision: str) -> list[EngineStamp]:
        """Engine stamps of one precision, oldest first."""
        return [e for e in self.engines if e.precision == precision]

    def onnx_file(self, precision: str) -> str | None:
        """File name of the ONNX model of ``precision`` when the bundle has one."""
        name = ONNX_BY_PRECISION.get(precision)
        return name if name in self.files else None


def check_bundle_class(bundle: Bundle, class_name: str | None) -> None:
    """A ``--class`` the bundle was not trained on (a typo) is one error naming its classes; None passes. The rule
    of grad-run --class and grad-refine run --class."""
    classes = bundle.classes or []
    if class_name is not None and class_name not in classes:
        raise GradError(f"--class {class_name}: bundle {bundle.name} has the classes {', '.join(classes)}")


def tuned_class_for(tuned: Collection[str], class_name: str | None) -> str | None:
    """The tuned class whose F2PAD settings refine an image of ``class_name`` (``tuned``: the classes with tuned
    settings), None for the bundle's defaults: the class itself when it was tuned, an untuned class the defaults;
    an image of unknown class (None) the only tuned class's when exactly one was tuned. The one rule of
    ``grad-refine run`` and of ``grad-run --refine``'s worker."""
    if class_name is not None:
        return class_name if class_name in tuned else None
    return next(iter(tuned)) if len(tuned) == 1 else None


def warn_refine_settings(bundle_dir: str | Path, classes: Sequence[str], tuned: Collection[str],
                         class_name: str | None, option: str = "--class") -> str:
    """Which settings refine images of ``class_name`` (:func:`tuned_class_for`): a tuned class's name, or
    ``"defaults"``; one log line when they are not the images' class's own tuned ones (``classes``: the bundle's,
    ``option``: the flag that names the class). Shared by grad-refine run and grad-run --refine."""
    chosen = tuned_class_for(tuned, class_name)
    if class_name is not None and chosen is None:
        log.warning("F2PAD refines class %s with the bundle's settings: it was not tuned (grad-refine tune "
                    "--bundle %s --classes %s)", class_name, bundle_dir, class_name)
    elif class_name is None and chosen is not None and set(classes) - {chosen}:
        log.warning("no %s: F2PAD refines every image with the settings tuned for %s, the bundle's only tuned "
                    "class; name the images' class with %s (an untuned one refines with the bundle's settings)",
                    option, chosen, option)
    elif class_name is None and len(tuned) > 1:
        check_refine_class(bundle_dir, sorted(tuned), None, option)  # its warning: the defaults, name the class
    elif not tuned:
        log.info("bundle %s has no tuned F2PAD settings: refining with its default settings (grad-refine tune)",
                 bundle_dir)
    return chosen or "defaults"


def check_refine_class(bundle_dir: str | Path, tuned: Sequence[str], class_name: str | None,
                       option: str = "--class") -> None:
    """The rule of every command that refines with a bundle's tuned F2PAD settings (grad-run --refine-class,
    grad-refine run --class; ``option`` names the flag): a named class must have settings (a typo would refine
    with untuned defaults without a word), and no name given for a bundle tuned for several classes refines with
    the defaults, with a warning."""
    tuned = sorted(tuned)
    if class_name is not None and class_name not in tuned:
        raise GradError(f"{option} {class_name!r}: bundle {bundle_dir} has no F2PAD settings tuned for it "
                        f"(tuned: {', '.join(tuned) or 'none'}; grad-refine tune --bundle {bundle_dir} --classes NAME)")
    if class_name is None and len(tuned) > 1:
        log.warning("bundle %s has F2PAD settings tuned for %s: refining with the bundle's default settings; name "
                    "the images' class with %s", bundle_dir, ", ".join(tuned), option)
