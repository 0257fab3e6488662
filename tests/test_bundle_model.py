"""The typed bundle model: every field round-trips, the JSON schema agrees with the dataclasses, old bundles are
migrated or refused with the fix, and the security checks (confined file names, finite thresholds) still hold."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from fakes.bundles import minimal_bundle
from gradad.bundle import (BUNDLE_SCHEMA, BUNDLE_SCHEMA_VERSION, FP16_ONNX, FP32_ONNX, MANIFEST_NAME, Backbone,
                           Bundle, BundleError, Calibration, EngineStamp, FileEntry, InputSpec, Normalisation,
                           OnnxInfo, RefineSection)

RECORDS = (Bundle, Backbone, InputSpec, Normalisation, OnnxInfo, EngineStamp, FileEntry, Calibration, RefineSection)


def _full_bundle(directory: Path) -> Bundle:
    """A bundle with every field of every record set to a non-default value."""
    bundle = minimal_bundle(directory, 96, 128, {FP32_ONNX: FileEntry("a" * 64, 10), FP16_ONNX: FileEntry("b" * 64, 5)})
    bundle.backbone.exposure, bundle.backbone.exposure_max_gain = "gain", 3.0
    bundle.onnx = OnnxInfo(17, "torch", True, True, gridsample_nodes=2,
                           gridsample={"mode": "bilinear"}, extra={"future_key": 1})
    bundle.engines = [EngineStamp("m.plan", "10.3.0", "Orin", "8.7", "fp16", profile={"min": [1, 3, 96, 128]},
                                  profiles=2, build_mode="strongly_typed", workspace_mib=1024, build_seconds=1.5,
                                  timing_cache="t.cache", fp32_layers=["grid"], parity_vs_onnxruntime={"x": 1.0},
                                  built_from={"model.onnx": "ab" * 32}, extra={"note": "n"})]
    other = [{"target": 0.05, "threshold": 1.5, "good_above": 1, "false_alarm_rate": 0.05, "recall": None}]
    bundle.calibration = Calibration(2.5, 0.7, "far", "n", "d", {"far": {"other_targets": other}}, {"method": "p"},
                                     {"c": 1}, "ort", "2026-01-01", {"n_good": 3}, ["w"],
                                     {"nut": {"image_threshold": 2.0, "pixel_threshold": 0.5, "other_targets": other}},
                                     extra={"new": True})
    bundle.refine = RefineSection("r.pt", "p.npz", "ck.pt", "2026", 1e-4, 0.1, "rule", 0.7, "rule2",
                                  {"components": 2}, {"lambda0": 0.1}, {"nut": {"lambda0": 0.5}},
                                  {"nut": {"images": ["a.png"]}}, extra={"more": [1]})
    bundle.source_checkpoint, bundle.data_root, bundle.export_seconds = "model.pt", "data", 3.5
    bundle.training_data = {"total": 3}
    bundle.extra = {"unknown_top_level": {"kept": True}}
    return bundle


def _unset_fields(record: Any, where: str) -> list[str]:
    """Fields of ``record`` (recursively) still at None or empty: the round-trip test must cover them all."""
    out = []
    for f in dataclasses.fields(record):
        if f.metadata.get("transient"):
            continue
        value = getattr(record, f.name)
        if value is None or value == {} or value == []:
            out.append(f"{where}.{f.name}")
        items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]
        for item in items:
            if dataclasses.is_dataclass(item):
                out += _unset_fields(item, f"{where}.{f.name}")
    return out


def test_every_field_round_trips(tmp_path: Path) -> None:
    bundle = _full_bundle(tmp_path)
    assert _unset_fields(bundle, "bundle") == []
    bundle.save(tmp_path)
    again = Bundle.load(tmp_path)
    assert again == bundle and again.directory == tmp_path
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == bundle.to_dict()
    assert again.to_dict()["unknown_top_level"] == {"kept": True}  # a newer writer's keys survive a rewrite
    assert again.engines_for("fp16") == bundle.engines and again.onnx_file("fp16") == FP16_ONNX
    assert again.onnx_file("int8") is None and again.input.hw == (96, 128)


def test_exported_bundle_round_trips_to_the_same_json(bundle: Path) -> None:
    text = json.loads((bundle / MANIFEST_NAME).read_text())
    typed = Bundle.load(bundle)
    assert typed.to_dict() == text and list(typed.to_dict()) == list(text)
    assert typed.schema_version == BUNDLE_SCHEMA_VERSION and typed.input_dtype == "uint8"
    typed.verify()


def _schema_nodes() -> list[tuple[type, dict[str, Any]]]:
    props = BUNDLE_SCHEMA["properties"]
    return [(Bundle, BUNDLE_SCHEMA), (Backbone, props["backbone"]), (InputSpec, props["input"]),
            (Normalisation, props["input"]["properties"]["normalisation"]), (OnnxInfo, props["onnx"]),
            (FileEntry, props["files"]["additionalProperties"]), (EngineStamp, props["engines"]["items"]),
            (Calibration, props["calibration"]), (RefineSection, props["refine"])]


@pytest.mark.parametrize("record,node", _schema_nodes(), ids=lambda v: getattr(v, "__name__", ""))
def test_schema_agrees_with_the_dataclasses(record: type, node: dict[str, Any]) -> None:
    """Required schema keys are the fields without defaults (plus those always written, if null); every schema
    property is a field."""
    fields = {f.name: f for f in dataclasses.fields(record) if not f.metadata.get("transient") and f.name != "extra"}
    required = {n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    always_written = {n for n, f in fields.items() if f.metadata.get("keep_none")}  # e.g. "calibration": null
    assert required <= set(node.get("required", [])) <= required | always_written
    assert set(node.get("properties", {})) <= set(fields)


def test_schema_version_comes_from_the_constant() -> None:
    source = (Path(__file__).parents[1] / "export" / "onnx_export.py").read_text()
    assert '"schema_version": 1' not in source and "schema_version=BUNDLE_SCHEMA_VERSION" in source


def test_old_bundle_is_migrated_or_refused(tmp_path: Path) -> None:
    old = _full_bundle(tmp_path)
    old.schema_version, old.input.dtype = 1, "float32"  # version 1: float32 input, still runs (host converts)
    old.save()
    loaded = Bundle.load(tmp_path)
    assert loaded.input_dtype == "float32" and not loaded.is_current
    with pytest.raises(BundleError, match=r"grad-export quantize needs a bundle of schema version 2.*re-export"):
        loaded.require_current("grad-export quantize")
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    for version in (0, None):
        manifest["schema_version"] = version
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=r"bundle schema version .* this gradad reads versions 1, 2; "
                                              r"re-export the model"):
            Bundle.load(tmp_path)
    manifest["schema_version"], manifest["gradad_version"] = BUNDLE_SCHEMA_VERSION + 1, "9.9.0"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"reads versions 1, 2; it was written by a newer gradad \(9.9.0\): "
                                          r"upgrade gradad"):
        Bundle.load(tmp_path)


@pytest.mark.parametrize("change", ["file", "engine", "refine", "nan", "negative"])
def test_security_checks_hold_on_save_and_load(tmp_path: Path, change: str) -> None:
    bundle = _full_bundle(tmp_path)
    if change == "file":
        bundle.files["../../etc/passwd"] = FileEntry("c" * 64, 1)
    elif change == "engine":
        bundle.engines[0].file = "/abs/model.plan"
    elif change == "refine":
        bundle.refine.model = "..\\..\\model.pt"  # type: ignore[union-attr]
    else:
        bundle.calibration.image_threshold = math.nan if change == "nan" else -1.0  # type: ignore[union-attr]
    with pytest.raises(BundleError, match="outside the bundle|finite number > 0"):
        bundle.save()
    assert not (tmp_path / MANIFEST_NAME).exists()
    with pytest.raises(BundleError):
        Bundle.from_dict(bundle.to_dict())


def test_file_symlink_escaping_the_bundle_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"x")
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / FP32_ONNX).symlink_to(outside)
    bundle = minimal_bundle(folder, files={FP32_ONNX: FileEntry.of(outside)})
    with pytest.raises(BundleError, match="symlink escaping the bundle"):
        bundle.verify()


def test_file_symlink_loop_is_a_bundle_error(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    folder.mkdir()
    real = tmp_path / "real.onnx"
    real.write_bytes(b"x")
    (folder / FP32_ONNX).symlink_to(FP32_ONNX)  # points at itself
    bundle = minimal_bundle(folder, files={FP32_ONNX: FileEntry.of(real)})
    with pytest.raises(BundleError, match="cannot resolve it"):
        bundle.verify()


def test_verify_finds_modified_files(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    typed = Bundle.load(copy)
    with (copy / FP32_ONNX).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match the hash"):
        typed.verify([FP32_ONNX])
    typed.add_file(FP32_ONNX)
    typed.verify([FP32_ONNX])


def test_an_oversized_manifest_is_refused_before_it_is_parsed(tmp_path: Path, monkeypatch) -> None:
    """json.loads of many small objects takes ~25x the file's size in memory: a bundle.json from someone else is
    read only up to a cap, far above a real one."""
    import gradad.bundle as bundle_module
    from gradad.bundle import BundleError

    directory = tmp_path / "bundle"
    directory.mkdir()
    minimal_bundle(directory).save()
    size = (directory / MANIFEST_NAME).stat().st_size
    assert bundle_module.read_manifest(directory)["name"] == "bundle"
    monkeypatch.setattr(bundle_module, "MANIFEST_MAX_BYTES", size - 1)
    with pytest.raises(BundleError, match=f"bundle.json is {size} bytes: a bundle manifest is read only up to"):
        bundle_module.read_manifest(directory)


def test_a_manifest_larger_than_readers_accept_is_not_written(tmp_path: Path, monkeypatch) -> None:
    """The cap is checked when the manifest is written too: an export fails (the model file untouched) rather than
    every reader after deployment."""
    import gradad.bundle as bundle_module
    from gradad.bundle import BundleError

    directory = tmp_path / "bundle"
    directory.mkdir()
    monkeypatch.setattr(bundle_module, "MANIFEST_MAX_BYTES", 100)
    with pytest.raises(BundleError, match="more than the 100 a bundle manifest is read up to"):
        minimal_bundle(directory).save()
    assert not (directory / MANIFEST_NAME).exists()


def test_a_huge_value_in_a_manifest_is_quoted_short(tmp_path: Path) -> None:
    """jsonschema quotes the offending value whole; a bundle from someone else could make the message megabytes."""
    import gradad.bundle as bundle_module
    from gradad.bundle import BundleError

    directory = tmp_path / "bundle"
    directory.mkdir()
    minimal_bundle(directory).save()
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["preset"] = ["x" * 1000] * 1000
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        bundle_module.read_manifest(directory)
    assert "invalid bundle manifest at preset" in str(info.value) and len(str(info.value)) < 600
    manifest["schema_version"] = "9" * 100_000
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle schema version") as info:
        bundle_module.read_manifest(directory)
    assert len(str(info.value)) < 600
