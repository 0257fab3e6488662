"""grad-run --refine: follow-up records with the frame's id, masks saved with the flagged frame, counts, errors.

Most tests use the stand-in refiner of ``test_refine_worker.py`` (set as ``refine_worker.DEFAULT_FACTORY``); the last one runs
the real F2PAD refiner on the tiny bundle and checks that the main process never imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line
from test_runtime import _lean_env
from test_sinks import make_result

from gradad.bundle import read_manifest, write_manifest
from gradad.runtime.refine_result import STATUSES
from gradad.runtime.cli import main as run_main
from gradad.runtime.sinks import FlaggedFrameSink

TESTS = Path(__file__).resolve().parent
STAND_IN = "test_refine_worker:standin_factory"


@pytest.fixture(scope="module")
def frames(tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good and defective fabric frames in one folder (11 images, 64 px)."""
    out = tmp_path_factory.mktemp("refine_frames")
    for f in sorted((tiny_demo_root / "fabric" / "test").rglob("*.png")):
        shutil.copy(f, out / f"{f.parent.name}_{f.name}")
    return out


@pytest.fixture(scope="module")
def stand_in(bundle: Path, frames: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the tiny bundle marked as prepared (for the stand-in refiner) and a threshold flagging about half."""
    from gradad.data.images import read_image_rgb
    from gradad.runtime.loader import load_backend
    from gradad.runtime.preprocess import to_model_input

    copy = tmp_path_factory.mktemp("refine_bundle") / "tiny"
    shutil.copytree(bundle, copy)
    manifest = read_manifest(copy)
    manifest["refine"] = {"stand_in": True}
    write_manifest(copy, manifest)
    backend, _ = load_backend(copy, "onnxruntime")
    scores, _ = backend.infer(to_model_input([read_image_rgb(p) for p in sorted(frames.iterdir())], 64, 64))
    s = np.sort(scores)
    return {"bundle": copy, "threshold": float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2}


def _run(args: list[str], factory: str | None = None):
    """grad-run in-process; ``factory`` replaces the refiner factory (Python-level injection, no CLI flag)."""
    from gradad.runtime import refine_worker

    with mock.patch.object(refine_worker, "DEFAULT_FACTORY", factory or refine_worker.DEFAULT_FACTORY):
        return CliRunner().invoke(run_main, [*args, "--backend", "onnxruntime", "--stats-every", "0"])


def _split(path: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(all records in order, frame lines, refine follow-ups)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return records, [r for r in records if "type" not in r], [r for r in records if r.get("type") == "refine"]


def test_follow_up_has_the_frame_id_and_mask_is_saved_with_the_frame(stand_in: dict, frames: Path,
                                                                     tmp_path: Path) -> None:
    out, flagged = tmp_path / "run.jsonl", tmp_path / "ng"
    result = _run([str(stand_in["bundle"]), "--source", str(frames), "--jsonl", str(out), "--save-flagged",
                   str(flagged), "--threshold", str(stand_in["threshold"]), "--refine",
                   "--refine-drain", "30", "--batch", "2"], STAND_IN)
    assert result.exit_code == 0, result.output
    records, lines, follow_ups = _split(out)
    ng = {r["frame_id"]: r for r in lines if r["decision"] == "NG"}
    assert 0 < len(ng) < len(lines) == len(list(frames.iterdir()))
    assert all(r.get("refine") == "queued" for r in ng.values())
    assert all("refine" not in r for r in lines if r["decision"] == "OK")
    assert sorted(f["frame_id"] for f in follow_ups) == sorted(ng)  # one follow-up per NG frame, same id
    for f in follow_ups:
        line = ng[f["frame_id"]]
        assert records.index(line) < records.index(f)  # the frame's own line comes first
        assert (f["source"], f["name"]) == (line["source"], line["name"])
        assert f["status"] == "converged" and f["height"] == f["width"] == 64
        mask_file, repaired_file = Path(f["mask_file"]), Path(f["repaired_file"])
        assert mask_file.parent == flagged and repaired_file.parent == flagged
        key = mask_file.name[: -len("_refined_mask.png")]
        assert (flagged / f"{key}_orig.png").is_file() and repaired_file.name == f"{key}_repaired.png"
        amap = np.load(flagged / f"{key}_map.npy")
        mask = cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (64, 64) and np.array_equal(mask > 0, amap > amap.mean())  # the stand-in's mask
        assert cv2.imread(str(repaired_file)).shape == (64, 64, 3)
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["refine"]["submitted"] == summary["refine"]["done"] == len(ng) == summary["flagged"]
    assert summary["refine"]["follow_up_records"] == len(ng)


def test_benchmark_reports_refine_counts(stand_in: dict, frames: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _run([str(stand_in["bundle"]), "--source", str(frames), "--benchmark", "20", "--warmup", "2",
                   "--benchmark-out", str(out), "--threshold", str(stand_in["threshold"]), "--refine",
                   "--refine-budget", "0.2", "--refine-queue", "2", "--refine-batch", "1", "--refine-drain", "0"],
                  STAND_IN)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    refine = summary["refine"]
    assert summary["frames"] == 20 and refine["submitted"] == summary["flagged"] > 0
    assert refine["done"] + refine["dropped"] + refine["unfinished"] + refine["failed"] == refine["submitted"]
    assert refine["dropped"] > 0  # 0.2 s per frame cannot keep up with the loop: dropped, not waited for
    assert "refine" in summary["latency_ms"] and refine["drain_seconds"] is not None


def test_unprepared_bundle_fails_fast_with_one_line(bundle: Path, frames: Path) -> None:
    msg = one_error_line(_run([str(bundle), "--source", str(frames), "--threshold", "1", "--refine"]))
    assert "not prepared for refinement" in msg and "grad-refine prepare" in msg


def test_worker_start_failure_is_one_line(stand_in: dict, frames: Path) -> None:
    msg = one_error_line(_run([str(stand_in["bundle"]), "--source", str(frames), "--threshold", "1", "--refine"],
                               "test_refine_worker:failing_factory"))
    assert "refinement worker failed to start" in msg and "not prepared for refinement (stand-in)" in msg
    bad = _run([str(stand_in["bundle"]), "--source", str(frames), "--threshold", "1", "--refine",
                "--refine-queue", "0"])  # refused by the option's range, before anything starts
    assert bad.exit_code == 2 and "'--refine-queue': 0 is not in the range x>=1" in bad.stderr


def test_lean_runtime_with_refine_worker_needs_no_torch(stand_in: dict, frames: Path, tmp_path: Path) -> None:
    env = _lean_env(tmp_path)  # importing torch fails in the main process and in the worker
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{TESTS}"
    out = tmp_path / "lean.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from gradad.runtime import cli, refine_worker; "
         "refine_worker.DEFAULT_FACTORY = sys.argv.pop(1); cli.main()", STAND_IN, str(stand_in["bundle"]), "--source",
         str(frames), "--jsonl", str(out), "--backend", "onnxruntime", "--threshold", str(stand_in["threshold"]),
         "--refine"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, lines, follow_ups = _split(out)
    assert len(follow_ups) == sum(r["decision"] == "NG" for r in lines) > 0


def test_refined_files_share_the_flagged_frame_budget(tmp_path: Path) -> None:
    probe = FlaggedFrameSink(tmp_path / "probe")
    probe.write(make_result(0, True))
    one = probe.total_bytes
    mask = np.zeros((16, 16), bool)
    mask[5:11, 6:12] = True
    repaired = np.full((16, 16, 3), 90, np.uint8)

    sink = FlaggedFrameSink(tmp_path / "ng", max_bytes=2 * one + 10)
    sink.write(make_result(0, True))
    sink.write(make_result(1, True))
    assert sink.write_refined(7, None, "cam0", mask, repaired) == {"mask_file": None, "repaired_file": None}
    files = sink.write_refined(1, None, "cam0", mask, repaired)  # needs room: frame 0 is evicted
    assert files == {"mask_file": str(tmp_path / "ng" / "00000001_cam0_refined_mask.png"),
                     "repaired_file": str(tmp_path / "ng" / "00000001_cam0_repaired.png")}
    assert sink.evicted == 1 and sink.total_bytes <= sink.max_bytes
    assert np.array_equal(cv2.imread(files["mask_file"], cv2.IMREAD_UNCHANGED) > 0, mask)
    assert sink.write_refined(0, None, "cam0", mask) == {"mask_file": None, "repaired_file": None}  # evicted
    assert len(sink._run_keys) == 1  # evicted frames are forgotten: bounded memory on 24/7 runs
    sink.write(make_result(2, True))
    sink.write(make_result(3, True))  # frame 1 and its refined files go together
    assert not list((tmp_path / "ng").glob("00000001_*"))
    sink.write_refined(3, None, "cam0", mask, repaired)
    sink.close()
    again = FlaggedFrameSink(tmp_path / "ng", max_bytes=2 * one + 10)  # the refined files are indexed
    assert again.total_bytes == sum(p.stat().st_size for p in (tmp_path / "ng").iterdir())


def test_multisink_forwards_refined_files_to_the_flagged_sink(tmp_path: Path) -> None:
    from gradad.runtime.sinks import JsonlSink, MultiSink

    flagged = FlaggedFrameSink(tmp_path / "ng")
    multi = MultiSink([JsonlSink(tmp_path / "r.jsonl"), flagged])
    multi.write(make_result(4, True))
    files = multi.write_refined(4, None, "cam0", np.ones((16, 16), bool))
    assert files["mask_file"] == str(tmp_path / "ng" / "00000004_cam0_refined_mask.png")
    assert Path(files["mask_file"]).is_file() and files["repaired_file"] is None
    multi.close()


def _prepare_real(bundle: Path, trained_tiny: Path, tiny_demo_root: Path, dest: Path) -> Path:
    """Copy the tiny bundle, calibrate it and prepare it for refinement (small prior and iteration cap)."""
    from gradad.calibration.cli import main as calibrate_main
    from gradad.data.images import read_image_rgb
    from gradad.refine.bundle_files import prepare_bundle
    from gradad.refine.config import RefineConfig

    copy = dest / "tiny"
    shutil.copytree(bundle, copy)
    good = dest / "good"
    good.mkdir()
    for f in tiny_demo_root.glob("*/test/good/*.png"):
        shutil.copy(f, good / f"{f.parts[-4]}_{f.name}")
    result = CliRunner().invoke(calibrate_main, [str(copy), "--good", str(good), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    train = np.stack([read_image_rgb(p) for p in sorted(tiny_demo_root.glob("*/train/good/*.png"))])
    prepare_bundle(copy, trained_tiny, train, dataclasses.replace(RefineConfig(), mog_pixels=20_000,
                                                                  mog_em_iterations=10, max_iterations=40))
    return copy


@pytest.mark.skipif(importlib.util.find_spec("gradad.refine.refiner") is None,
                    reason="gradad.refine.refiner (F2PAD core) not there yet")
def test_real_refiner_end_to_end_torch_only_in_the_worker(bundle: Path, trained_tiny: Path, tiny_demo_root: Path,
                                                          stand_in: dict, frames: Path, tmp_path: Path) -> None:
    prepared = _prepare_real(bundle, trained_tiny, tiny_demo_root, tmp_path)
    out, flagged = tmp_path / "real.jsonl", tmp_path / "ng"
    argv = ["grad-run", str(prepared), "--source", str(frames), "--jsonl", str(out), "--save-flagged", str(flagged),
            "--backend", "onnxruntime", "--threshold", str(stand_in["threshold"]), "--refine", "--refine-device",
            "cpu", "--refine-budget", "2", "--refine-drain", "120", "--stats-every", "0"]
    code = ("import sys\nfrom gradad.runtime.cli import main\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('TORCH_IN_MAIN', any(m.split('.')[0] == 'torch' for m in sys.modules))\nsys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_IN_MAIN False" in proc.stdout
    _, lines, follow_ups = _split(out)
    ng = {r["frame_id"] for r in lines if r["decision"] == "NG"}
    assert ng and sorted(f["frame_id"] for f in follow_ups) == sorted(ng)
    for f in follow_ups:
        assert f["status"] in STATUSES, f  # refined (none dropped or unfinished with a 120 s drain)
        mask = cv2.imread(f["mask_file"], cv2.IMREAD_UNCHANGED)
        assert mask.shape == (64, 64) and Path(f["mask_file"]).parent == flagged


def test_an_untuned_refine_class_is_one_line_naming_the_tuned_ones(stand_in: dict, frames: Path) -> None:
    msg = one_error_line(_run([str(stand_in["bundle"]), "--source", str(frames), "--threshold", "1", "--refine",
                               "--refine-class", "screw"], STAND_IN))
    assert "--refine-class 'screw'" in msg and "tuned:" in msg and "grad-refine tune" in msg


def test_the_line_class_refines_untuned_with_the_bundle_settings(stand_in: dict, frames: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """--class names the line's product: it must not make a working --refine run refuse to start (only an explicit
    --refine-class must be tuned)."""
    out = tmp_path / "r.jsonl"
    with caplog.at_level(logging.WARNING):
        result = _run([str(stand_in["bundle"]), "--source", str(frames), "--threshold", "1", "--refine",
                       "--class", "fabric", "--jsonl", str(out)], STAND_IN)
    assert result.exit_code == 0, result.output
    assert "F2PAD refines class fabric with the bundle's settings" in caplog.text
    follow_ups = _split(out)[2]
    assert follow_ups and all(f["settings"] == "defaults" for f in follow_ups)  # as grad-refine run's records


def test_without_a_class_the_only_tuned_class_refines_every_frame_and_says_so(
        stand_in: dict, frames: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tuned = tmp_path / "tuned"
    shutil.copytree(stand_in["bundle"], tuned)
    manifest = read_manifest(tuned)
    manifest["refine"]["classes"] = {"fabric": {"lambda0": 0.1}}
    write_manifest(tuned, manifest)
    out = tmp_path / "r.jsonl"
    with caplog.at_level(logging.WARNING):
        result = _run([str(tuned), "--source", str(frames), "--threshold", "1", "--refine", "--jsonl", str(out)],
                      STAND_IN)
    assert result.exit_code == 0, result.output
    assert "no --class: F2PAD refines every image with the settings tuned for fabric" in caplog.text
    follow_ups = _split(out)[2]
    assert follow_ups and all(f["settings"] == "fabric" for f in follow_ups)
