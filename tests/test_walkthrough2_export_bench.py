"""Walkthrough 2 findings on grad-bench and grad-export: foreign JSON in a results folder, --name outside -o, the
"random weights" log of bundle rows, inspect's calibration summary and engine checks, the advice for a modified
engine, a trust list path that is a folder, and an interrupted quantize/build leaving the bundle as it was."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line
from gradad.benchmarks.cli import main as bench_main
from gradad.bundle import Bundle, BundleError, Calibration, EngineStamp
from gradad.engine_trust import TRUST_FILE_ENV, TrustListError, trust
from gradad.export.cli import main as export_main

ENGINE = "model.trt10.3.0.fp16.sm87.NVIDIA-Orin.plan"  # the name a fake-TensorRT build writes


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    return copy


def _add_engine(bundle_dir: Path, listed: bool = True) -> Bundle:
    """A fake engine in ``bundle_dir``: in ``engines``, and in ``files`` when ``listed``."""
    (bundle_dir / ENGINE).write_bytes(b"fake-serialized-engine")
    b = Bundle.load(bundle_dir)
    b.engines.append(EngineStamp(ENGINE, "10.3.0", "NVIDIA Orin", "8.7", "fp16"))
    if listed:
        b.add_file(ENGINE)
    b.save()
    return Bundle.load(bundle_dir)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- 1. grad-bench report: foreign and malformed JSON ------------------------------------------------------------


def test_report_lists_foreign_json_and_refuses_a_malformed_result_by_name(tmp_path: Path) -> None:
    (tmp_path / "foreign.json").write_text("[1, 2, 3]")  # another tool's JSON: not an object
    (tmp_path / "number.json").write_text("42")
    result = CliRunner().invoke(bench_main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "README.md").read_text()
    assert "- `foreign.json`" in page and "- `number.json`" in page  # listed like other tools' JSON objects
    # a file that says it is a grad-bench result but lacks its fields: one error naming it, as for invalid JSON
    (tmp_path / "cut.json").write_text(json.dumps({"kind": "latency", "rows": []}))
    line = one_error_line(CliRunner().invoke(bench_main, ["report", str(tmp_path)]))
    assert "cut.json" in line and "latency" in line and "'environment'" in line
    (tmp_path / "cut.json").write_text(json.dumps({"kind": "accuracy", "dataset": [], "rows": 1}))
    assert "cut.json" in one_error_line(CliRunner().invoke(bench_main, ["report", str(tmp_path)]))


# --- 2. --name stays inside -o --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "sub/escaped", ".."])
@pytest.mark.parametrize("command", [
    ["latency", "--preset", "tiny", "--backend", "pytorch", "--no-patchcore", "--batches", "1", "--iters", "1",
     "--min-iters", "1", "--warmup", "0"],
    ["accuracy", "--data", "no-such-root"],
    ["refine", "--bundle", "no-such-bundle", "--data", "no-such-root"],
    ["gpu", "--smoke", "--preset", "tiny", "--time-budget", "0"],
], ids=lambda c: c[0] if isinstance(c, list) else c)
def test_every_bench_command_refuses_a_name_outside_the_output_folder(tmp_path: Path, command: list[str],
                                                                      name: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_main, [*command, "-o", str(out), "--name", name])
    line = one_error_line(result)
    assert "--name" in line and repr(name) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside -o or beside it


def test_result_files_refuse_a_name_with_a_path_separator(tmp_path: Path) -> None:
    from gradad.benchmarks.results_io import write_result_files
    from gradad.errors import GradError

    with pytest.raises(GradError, match="--name"):
        write_result_files(tmp_path / "out", "../escaped", {"kind": "latency"}, "x")
    assert list(tmp_path.iterdir()) == []


# --- 3. "random weights" only where true ------------------------------------------------------------------------


def test_random_weights_are_logged_for_preset_rows_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gradad.benchmarks.latency import LatencyConfig, _complexity, preset_specs

    caplog.set_level(logging.INFO)
    counted = _complexity("tiny", {})  # what a bundle row's GFLOP/params come from
    assert counted["gflop_total"] > 0
    assert "random weights" not in caplog.text
    preset_specs(LatencyConfig(presets=["tiny"], backends=("pytorch",)), "tiny", tmp_path, [])
    assert "GRAD tiny preset rows: random weights" in caplog.text


# --- 4. inspect: a readable calibration ---------------------------------------------------------------------------


def test_inspect_summarises_the_calibration_and_keeps_the_full_record_for_json(bundle: Path, tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    b = Bundle.load(copy)
    images = [f"/data/{c}/test/good/{i:03d}.png" for c in ("fabric", "nut") for i in range(12)]
    b.calibration = Calibration(
        image_threshold=19.466, pixel_threshold=17.152, method="far", backend="onnxruntime:CPUExecutionProvider",
        date="2026-11-29T07:24:05+00:00", rules={"far": {"threshold": 19.466}},
        data={"good_dirs": ["data/fabric/test/good", "data/nut/test/good"], "n_good": 24, "n_defect": 0,
              "defect_dir": None, "masks_dir": None, "images": images},
        warnings=["calibration set too small"],
        classes={"fabric": {"image_threshold": 18.2, "pixel_threshold": 14.9, "n_good": 12},
                 "nut": {"image_threshold": 19.466, "pixel_threshold": 17.55, "n_good": 12}})
    b.save()
    result = CliRunner().invoke(export_main, ["inspect", str(copy)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "calibration: method far, image threshold 19.47, pixel threshold 17.15" in out
    assert "24 good images from data/fabric/test/good, data/nut/test/good; 0 defect images" in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["fabric"], ["nut"])]
    assert table == [["fabric", "18.20", "14.90", "12"], ["nut", "19.47", "17.55", "12"]]
    assert "warning: calibration set too small" in out
    assert "/data/fabric/test/good/000.png" not in out and max(len(line) for line in out.splitlines()) < 200
    full = json.loads(CliRunner().invoke(export_main, ["inspect", str(copy), "--json"]).stdout)
    assert full["calibration"]["data"]["images"] == images


# --- 5. inspect checks the engines too ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["not in files", "missing on disk"])
def test_inspect_marks_a_bad_engine_like_trust_refuses_it(bundle: Path, tmp_path: Path, case: str) -> None:
    copy = _copy(bundle, tmp_path)
    _add_engine(copy, listed=case != "not in files")
    if case == "missing on disk":
        (copy / ENGINE).unlink()
    result = CliRunner().invoke(export_main, ["inspect", str(copy)])
    line = one_error_line(result)
    assert ENGINE in line and f"grad-export build --fp16 {copy}" in line
    marked = [row for row in result.stdout.splitlines() if "FAILED VERIFICATION" in row]
    assert marked and all(ENGINE in row for row in marked)
    assert any(row.startswith("  engine: ") for row in marked)
    assert ENGINE in one_error_line(CliRunner().invoke(export_main, ["trust", str(copy)]))


# --- 6. a modified engine: rebuild or re-trust, not re-export ------------------------------------------------------


def test_a_modified_engine_names_build_and_trust_not_a_reexport(bundle: Path, tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    b = _add_engine(copy)
    (copy / ENGINE).write_bytes(b"fake-serialized-engine, modified")
    with pytest.raises(BundleError) as info:
        b.verify([ENGINE])
    msg = str(info.value)
    assert "does not match the hash" in msg and "grad-export onnx" not in msg
    assert f"grad-export build --fp16 {copy} --parity-images DIR" in msg and f"grad-export trust {copy}" in msg
    line = one_error_line(CliRunner().invoke(export_main, ["trust", str(copy)]))
    assert "grad-export build --fp16" in line and "grad-export onnx" not in line
    with pytest.raises(BundleError, match="grad-export onnx"):  # an ONNX file still comes from a re-export
        (copy / "model.fp16.onnx").write_bytes(b"changed")
        b.verify(["model.fp16.onnx"])


# --- 7. trust list path that is a folder; no lock file left behind ----------------------------------------------


def test_a_trust_list_folder_is_refused_before_any_lock_file(bundle: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    copy = _copy(bundle, tmp_path)
    _add_engine(copy)
    folder = tmp_path / "emptydir"
    folder.mkdir()
    monkeypatch.setenv(TRUST_FILE_ENV, str(folder))
    line = one_error_line(CliRunner().invoke(export_main, ["trust", str(copy)]))
    assert str(folder) in line and "folder" in line and TRUST_FILE_ENV in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "emptydir"] and not any(folder.iterdir())
    with pytest.raises(TrustListError, match="folder"):  # reading it is refused the same way
        from gradad.engine_trust import is_trusted

        is_trusted("a" * 64)


def test_a_failed_trust_keeps_the_lock_file_and_the_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock file stays, also after a failure: removing a path another process may hold or wait on would let a
    third one lock a new file at the same path while the waiter gets the old one."""
    listing = tmp_path / "trusted.json"
    listing.write_text("{not json")  # e.g. provided by a container, never written here
    monkeypatch.setenv(TRUST_FILE_ENV, str(listing))
    with pytest.raises(TrustListError, match="unreadable"):
        trust("a" * 64, tmp_path / "x.plan", "engine")
    assert listing.read_text() == "{not json" and (tmp_path / "trusted.json.lock").exists()


# --- 8. Ctrl-C during quantize / build: exit 130, the bundle as it was ------------------------------------------


def test_ctrl_c_during_quantize_leaves_the_bundle_intact(bundle: Path, tiny_demo_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import gradad.export.int8 as int8

    copy = _copy(bundle, tmp_path)
    before = _snapshot(copy)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(int8, "quantize_model", interrupted)
    result = CliRunner().invoke(export_main, [
        "quantize", str(copy), "--calib", str(tiny_demo_root / "nut" / "train" / "good"), "--data",
        str(tiny_demo_root), "--parity-max-images", "6", "--calib-max-images", "4"])
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert _snapshot(copy) == before and sorted(os.listdir(copy)) == sorted(before)  # no .int8-tmp either


def test_ctrl_c_during_an_engine_build_leaves_the_bundle_intact(bundle: Path, tiny_demo_root: Path,
                                                                tmp_path: Path) -> None:
    from fakes.tensorrt import make_fake_trt
    from test_tensorrt_glue import GPU

    from gradad.export.engine import build_bundle_engine

    copy = _copy(bundle, tmp_path)
    _add_engine(copy)  # an earlier engine of the same name: a rebuild must not replace it half-way
    before = _snapshot(copy)

    def interrupted_parity(path: Path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_bundle_engine(copy, tiny_demo_root / "nut" / "test" / "good",
                            trt=make_fake_trt(input_shape=(-1, 3, 64, 64)), gpu=GPU, engine_backend=interrupted_parity)
    after = _snapshot(copy)
    after.pop("timing.cache", None)  # the builder's speed-up file, written atomically, not part of the bundle
    assert after == before and not (copy / ".engine-build-tmp").exists()
    Bundle.load(copy).verify()
