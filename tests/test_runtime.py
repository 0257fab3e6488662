"""grad-calibrate + grad-run end to end on ONNX Runtime CPU, bad inputs, clean shutdown, and no torch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line

from gradad.calibration.cli import main as calibrate_main
from gradad.data.demo import DemoDataConfig, generate_demo_dataset
from gradad.runtime.cli import main as run_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated bundle of a small fabric model, and folders of clearly good and clearly defective frames."""
    from gradad.export.onnx_export import ExportOptions, export_bundle
    from gradad.training.config import preset_config
    from gradad.training.trainer import train

    base = tmp_path_factory.mktemp("line")
    root = generate_demo_dataset(base / "data", DemoDataConfig(classes=("fabric",), image_size=64, train_good=16,
                                                               test_good=8, test_per_defect=1, seed=3))
    cfg = preset_config("tiny")
    cfg.data.root, cfg.data.cache_dir, cfg.output_dir = str(root), str(base / "cache"), str(base / "run")
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 2, 20
    cfg.data.val_fraction = 0.0  # all 16 images train: the line's thresholds, not model selection, are under test
    bundle = export_bundle(train(cfg), base / "bundle", ExportOptions(parity_max_images=12))
    good = sorted((root / "fabric" / "test" / "good").iterdir())
    calib, clearly_good = base / "calib_good", base / "clearly_good"
    calib.mkdir()
    clearly_good.mkdir()
    for i, f in enumerate(good):
        shutil.copy(f, (calib if i % 2 == 0 else clearly_good) / f.name)
    for f in sorted((root / "fabric" / "train" / "good").iterdir())[:8]:
        shutil.copy(f, calib / f"train_{f.name}")
    # Clearly defective: large dark stains and a bright bar on held-out good fabric.
    clearly_bad = base / "clearly_bad"
    clearly_bad.mkdir()
    for i, f in enumerate(sorted(clearly_good.iterdir())):
        img = cv2.imread(str(f))
        if i % 2:
            cv2.circle(img, (20 + 6 * i, 30), 12, (10, 10, 10), -1)
        else:
            cv2.rectangle(img, (8, 24 + 4 * i), (56, 34 + 4 * i), (250, 250, 250), -1)
        cv2.imwrite(str(clearly_bad / f"bad_{f.name}"), img)
    result = CliRunner().invoke(calibrate_main, [str(bundle), "--good", str(calib), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    return {"bundle": bundle, "good": clearly_good, "bad": clearly_bad, "root": root}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_calibration_written_to_bundle(line: dict[str, Path]) -> None:
    from gradad.bundle import read_manifest, verify_files

    manifest = read_manifest(line["bundle"])
    cal = manifest["calibration"]
    assert cal["method"] == "far" and cal["image_threshold"] > 0 and cal["pixel_threshold"] > 0
    assert cal["data"]["n_good"] == 12 and cal["warnings"]  # 12 images cannot certify a 1% rate
    verify_files(line["bundle"], manifest)  # calibrating leaves the model files untouched


def test_run_folder_one_line_per_image_with_correct_decisions(line: dict[str, Path], tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for f in [*line["good"].iterdir(), *line["bad"].iterdir()]:
        shutil.copy(f, frames / f.name)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(run_main, [str(line["bundle"]), "--source", str(frames), "--jsonl", str(out),
                                           "--backend", "onnxruntime", "--batch", "3",
                                           "--save-flagged", str(tmp_path / "ng")])
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert sorted(r["name"] for r in records) == sorted(p.name for p in frames.iterdir())
    assert [r["frame_id"] for r in records] == list(range(len(records)))
    for r in records:
        expected = "NG" if r["name"].startswith("bad_") else "OK"
        assert r["decision"] == expected, r
        assert (r["score"] > r["threshold"]) == (r["decision"] == "NG")
        assert r["normalised_score"] == pytest.approx(r["score"] / (2 * r["threshold"]), rel=1e-4)
        assert {"decode", "preprocess", "inference", "postprocess"} <= set(r["latency_ms"])
    n_bad = sum(r["decision"] == "NG" for r in records)
    assert len(list((tmp_path / "ng").glob("*_map.npy"))) == n_bad


def test_video_source_writes_overlay_video(line: dict[str, Path], tmp_path: Path) -> None:
    video = tmp_path / "line.avi"
    images = [cv2.imread(str(f)) for f in sorted(line["good"].iterdir())]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 64))
    for img in images:
        writer.write(img)
    writer.release()
    out_video, out_jsonl = tmp_path / "overlay.mp4", tmp_path / "v.jsonl"
    result = CliRunner().invoke(run_main, [str(line["bundle"]), "--source", str(video), "--video", str(out_video),
                                           "--jsonl", str(out_jsonl), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert len(_records(out_jsonl)) == len(images)
    cap = cv2.VideoCapture(str(tmp_path / "overlay.000.mp4"))  # segmented: --video-segment 60 by default
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(images)
    ok, frame = cap.read()
    assert ok and frame.shape[:2] == (64, 64)
    cap.release()


def test_corrupt_and_odd_sized_images_in_folder(line: dict[str, Path], tmp_path: Path, caplog) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    good = sorted(line["good"].iterdir())
    shutil.copy(good[0], frames / "a.png")
    (frames / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    big = cv2.resize(cv2.imread(str(good[1])), (200, 120))  # another size and aspect ratio: resized
    cv2.imwrite(str(frames / "c.png"), big)
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(run_main, [str(line["bundle"]), "--source", str(frames), "--jsonl", str(out),
                                           "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in _records(out)] == ["a.png", "c.png"]
    assert "b.png" in caplog.text


def test_bad_inputs_are_one_clear_line(line: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(run_main, [str(tmp_path / "nope"), "--source", str(line["good"])])
    assert "not found" in one_error_line(missing)
    assert "camera 99" in one_error_line(runner.invoke(run_main, [str(line["bundle"]), "--camera", "99",
                                                          "--backend", "onnxruntime"]))
    tampered = tmp_path / "tampered"
    shutil.copytree(line["bundle"], tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    msg = one_error_line(runner.invoke(run_main, [str(tampered), "--source", str(line["good"]), "--backend",
                                          "onnxruntime"]))
    assert "model.onnx" in msg and "grad-export onnx" in msg
    assert "TensorRT" in one_error_line(runner.invoke(run_main, [str(line["bundle"]), "--source", str(line["good"]),
                                                         "--backend", "tensorrt"]))


def test_wrong_input_size_to_backend_is_a_clear_error(line: dict[str, Path]) -> None:
    from gradad.runtime.loader import load_backend
    from gradad.runtime.backend import BackendError

    backend, _ = load_backend(line["bundle"], "onnxruntime")
    with pytest.raises(BackendError, match=r"\(N, 3, 64, 64\)"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_benchmark_mode_writes_summary(line: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out.symlink_to(precious)  # a link at the output's name is replaced, not written through
    result = CliRunner().invoke(run_main, [str(line["bundle"]), "--source", str(line["good"]), "--benchmark", "12",
                                           "--warmup", "2", "--benchmark-out", str(out), "--backend",
                                           "onnxruntime", "--threads", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert not out.is_symlink() and precious.read_text() == "keep me"
    assert summary["frames"] == 12 and summary["fps"] > 0
    assert summary["latency_ms"]["inference"]["p50"] > 0 and summary["backend"].startswith("onnxruntime")


def _lean_env(tmp_path: Path) -> dict[str, str]:
    """A sitecustomize that makes importing torch or timm fail, prepended to PYTHONPATH."""
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'timm', 'torchvision'):\n"
        "            raise ImportError(f'{name} is blocked: the runtime must not import it')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(block), env.get("PYTHONPATH", "")])
    return env


def test_runtime_runs_without_torch(line: dict[str, Path], tmp_path: Path) -> None:
    env = _lean_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    out = tmp_path / "lean.jsonl"
    code = ("import sys; from gradad.runtime.cli import main; "
            f"sys.argv = ['grad-run', {str(line['bundle'])!r}, '--source', {str(line['good'])!r}, "
            f"'--jsonl', {str(out)!r}, '--backend', 'auto']; main()")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(_records(out)) == len(list(line["good"].iterdir()))
    check = ("import sys, gradad.runtime.cli, gradad.calibration.calibrate, gradad.runtime.sinks, "
             "gradad.runtime.tensorrt_backend; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", check], env=env, capture_output=True).returncode == 0


def test_sigterm_leaves_complete_jsonl(line: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "term.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradad.runtime.cli", str(line["bundle"]), "--source", str(line["good"]), "--loop",
         "--jsonl", str(out), "--backend", "onnxruntime", "--stats-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 10):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # never leave a looping runtime behind, whatever failed
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # 143: stopped cleanly by SIGTERM
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(x) for x in text.splitlines()]  # every line parses
    assert len(records) >= 10
    assert [r["frame_id"] for r in records] == list(range(len(records)))
    assert "stopped by SIGTERM" in stderr
