"""Hostile and faulty inputs (issue 12): real malicious pickles, traversal bundles, bad thresholds, full disks,
killed writers, leaked credentials, stalled streams, duplicate calibration images, globs with symlink loops."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line

from gradad.bundle import file_entry, read_manifest, write_manifest
from gradad.runtime.cli import main as run_main

EVIL = """\
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"format": 1, "config": Evil(), "state_dict": {}}, sys.argv[1])
"""


def _evil_checkpoint(tmp_path: Path, name: str = "model.pt") -> tuple[Path, Path]:
    """A torch file whose unpickling would create ``marker`` (written by a subprocess, never loaded here)."""
    path, marker = tmp_path / name, tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", EVIL, str(path), str(marker)], check=True)
    assert path.is_file() and not marker.exists()
    return path, marker


def _manifest_json(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "bundle.json").read_text())


def _write_raw(bundle_dir: Path, manifest: dict) -> None:
    """bundle.json as a hostile user would write it: no validation."""
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def calibrated(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle with a calibration (threshold far above every score: all OK)."""
    out = tmp_path_factory.mktemp("hostile") / "bundle"
    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    manifest["calibration"] = {"image_threshold": 1e6, "pixel_threshold": 1e6, "method": "far"}
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def frames(tiny_demo_root: Path) -> Path:
    return tiny_demo_root / "nut" / "test" / "good"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _run(args: list[str]) -> "CliRunner.invoke":
    return CliRunner().invoke(run_main, [*args, "--backend", "onnxruntime", "--stats-every", "0"])


# ------------------------------------------------------------------------------------------------ 1. pickles


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path, trained_tiny: Path) -> None:
    from gradad.errors import CheckpointError
    from gradad.evaluation.cli import main as eval_main
    from gradad.export.cli import main as export_main
    from gradad.training.checkpoint import load_detector, read_checkpoint

    evil, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*model\.pt.*posix\.system"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError):
        load_detector(evil)
    line = one_error_line(CliRunner().invoke(export_main, ["onnx", str(evil), "-o", str(tmp_path / "out")]))
    assert str(evil) in line and "refusing" in line
    assert str(evil) in one_error_line(CliRunner().invoke(eval_main, [str(evil)]))
    assert not marker.exists()
    # Real training outputs are plain: they load with weights_only=True.
    assert read_checkpoint(trained_tiny)["state_dict"]
    assert read_checkpoint(trained_tiny.parent / "checkpoint.pt")["generator"] is not None


def test_malicious_refine_model_in_bundle_is_refused(calibrated: Path, tmp_path: Path) -> None:
    """The grad-refine / grad-run --refine path: a bundle whose refine model (hash updated) is a payload."""
    from gradad.errors import GradError
    from gradad.refine.bundle_files import load_refine_parts
    from gradad.refine.prior import PixelPrior
    from gradad.training.checkpoint import load_detector

    b = _copy(calibrated, tmp_path)
    evil, marker = _evil_checkpoint(b, "refine_model.pt")
    PixelPrior(np.zeros((1, 3)), np.eye(3)[None], 0.0).save(b / "pixel_prior.npz")
    manifest = read_manifest(b)
    manifest["refine"] = {"model": "refine_model.pt", "pixel_prior": "pixel_prior.npz", "config": {}}
    manifest["files"].update({n: file_entry(b / n) for n in ("refine_model.pt", "pixel_prior.npz")})
    write_manifest(b, manifest)
    parts = load_refine_parts(b)
    with pytest.raises(GradError, match="refusing to load"):
        load_detector(parts.model_path)
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- 2. traversal


@pytest.mark.parametrize("where", ["files", "engine", "refine", "absolute"])
def test_bundle_file_names_cannot_leave_the_bundle(calibrated: Path, frames: Path, tmp_path: Path,
                                                   where: str) -> None:
    b = _copy(calibrated, tmp_path)
    manifest = _manifest_json(b)
    entry = manifest["files"]["model.onnx"]
    if where == "files":
        manifest["files"]["../../etc/passwd"] = entry
    elif where == "absolute":
        manifest["files"]["/etc/passwd"] = entry
    elif where == "engine":
        manifest["engines"] = [{"file": "../outside.plan", "tensorrt_version": "10", "gpu_name": "x",
                                "compute_capability": "8.7", "precision": "fp16"}]
    else:
        manifest["refine"] = {"model": "../../model.pt", "pixel_prior": "p.npz"}
    _write_raw(b, manifest)
    line = one_error_line(_run([str(b), "--source", str(frames)]))
    assert "outside the bundle" in line and "bundle.json" in line


def test_symlink_escaping_the_bundle_is_refused(calibrated: Path, frames: Path, tmp_path: Path) -> None:
    b = _copy(calibrated, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(b / "model.onnx", outside)
    (b / "model.onnx").symlink_to(outside)  # same bytes: the hash still matches
    line = one_error_line(_run([str(b), "--source", str(frames)]))
    assert "outside the bundle" in line and "symlink" in line


def test_refine_preparation_never_deletes_what_the_old_refine_names_point_at(calibrated: Path, trained_tiny: Path,
                                                                            tiny_demo_root: Path, tmp_path: Path) -> None:
    """grad-refine prepare drops the previous preparation's files; a handed-over bundle.json whose refine names point
    through a symlink out of the bundle, or at the bundle's own model, must not make it delete them."""
    from gradad.data.images import read_image_rgb
    from gradad.refine.bundle_files import prepare_bundle
    from gradad.refine.config import RefineConfig

    b = _copy(calibrated, tmp_path)
    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    (victim_dir / "victim.txt").write_text("keep me")
    (b / "escape").symlink_to(victim_dir, target_is_directory=True)
    manifest = _manifest_json(b)
    manifest["refine"] = {"model": "escape/victim.txt", "pixel_prior": "model.onnx", "config": {}}
    _write_raw(b, manifest)
    train = np.stack([read_image_rgb(p) for p in sorted(tiny_demo_root.glob("*/train/good/*.png"))])
    cfg = RefineConfig(mog_pixels=5_000, mog_em_iterations=3)
    prepare_bundle(b, trained_tiny, train, cfg)
    assert (victim_dir / "victim.txt").read_text() == "keep me"
    assert (b / "model.onnx").is_file() and "model.onnx" in read_manifest(b)["files"]
    first = read_manifest(b)["refine"]
    manifest = _manifest_json(b)  # one name given twice: dropped once, no KeyError half-way
    manifest["refine"]["model"] = manifest["refine"]["pixel_prior"]
    _write_raw(b, manifest)
    prepare_bundle(b, trained_tiny, train[::-1].copy(), cfg)  # a real re-preparation still cleans up its own files
    second = read_manifest(b)["refine"]
    assert not (b / first["pixel_prior"]).exists() and (b / second["pixel_prior"]).is_file()
    assert first["pixel_prior"] not in read_manifest(b)["files"]


def test_refine_preparation_refuses_a_model_symlinked_out_of_the_bundle(calibrated: Path, trained_tiny: Path,
                                                                       tiny_demo_root: Path, tmp_path: Path) -> None:
    from gradad.bundle import BundleError
    from gradad.data.images import read_image_rgb
    from gradad.refine.bundle_files import prepare_bundle

    b = _copy(calibrated, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(b / "model.onnx", outside)
    (b / "model.onnx").symlink_to(outside)  # same bytes: the hash still matches
    train = np.stack([read_image_rgb(p) for p in sorted(tiny_demo_root.glob("*/train/good/*.png"))])
    with pytest.raises(BundleError, match="outside the bundle"):
        prepare_bundle(b, trained_tiny, train)


@pytest.mark.parametrize("where", ["parent", "symlink", "inside", "function", "sparse"])
def test_onnx_external_data_must_stay_in_the_bundle(tmp_path: Path, where: str) -> None:
    """TensorRT's parser reads external data itself (symlinks followed): the engine build checks the locations."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from gradad.export.lint import ExportLintError, check_external_data

    b = tmp_path / "bundle"
    b.mkdir()
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    onnx.save_model(helper.make_model(graph), str(b / "model.onnx"), save_as_external_data=True,
                    location="w.bin", size_threshold=0)
    if where == "inside":
        check_external_data(b / "model.onnx", b)
        return
    model = onnx.load(str(b / "model.onnx"), load_external_data=False)
    if where in ("function", "sparse"):  # a Constant whose value lies outside, in a local function or sparse
        outside = numpy_helper.from_array(np.ones(4, np.float32), "w")
        outside.data_location = TensorProto.EXTERNAL
        outside.external_data.add(key="location", value="../w.bin")
        if where == "function":
            const = helper.make_node("Constant", [], ["c"], value=outside)
            model.functions.append(helper.make_function("local", "f", [], ["c"], [const],
                                                        [helper.make_opsetid("", 17)]))
        else:
            sparse = helper.make_sparse_tensor(outside, numpy_helper.from_array(np.arange(4, dtype=np.int64), "i"),
                                               [8])
            model.graph.node.append(helper.make_node("Constant", [], ["c"], sparse_value=sparse))
        (b / "model.onnx").write_bytes(model.SerializeToString())  # onnx.save_model itself refuses '..' here
    elif where == "parent":
        shutil.move(b / "w.bin", tmp_path / "w.bin")
        model.graph.initializer[0].external_data[0].value = "../w.bin"
        onnx.save_model(model, str(b / "model.onnx"))
    else:
        secret = tmp_path / "secret.bin"
        shutil.move(b / "w.bin", secret)
        (b / "w.bin").symlink_to(secret)
    with pytest.raises(ExportLintError, match="tensor 'w' refused.*outside the bundle"):
        check_external_data(b / "model.onnx", b)


# ------------------------------------------------------------------------------------------- 3. thresholds


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0, "0.5", None])
def test_bad_thresholds_in_bundle_json_are_one_line(calibrated: Path, frames: Path, tmp_path: Path,
                                                    value: object) -> None:
    b = _copy(calibrated, tmp_path)
    manifest = _manifest_json(b)
    if value is None:
        manifest["calibration"] = {}
    else:
        manifest["calibration"]["image_threshold"] = value
    _write_raw(b, manifest)  # json writes NaN / Infinity, as a hand-edited file may hold them
    line = one_error_line(_run([str(b), "--source", str(frames)]))
    assert "calibration" in line and "image_threshold" in line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_bad_threshold_option_is_one_line(calibrated: Path, frames: Path, value: str) -> None:
    assert "--threshold" in one_error_line(_run([str(calibrated), "--source", str(frames), "--threshold", value]))


def test_bad_pixel_threshold_refused_for_refinement(calibrated: Path) -> None:
    from gradad.errors import GradError
    from gradad.refine.bundle_files import check_threshold

    for value in (float("nan"), -1.0, 0.0, "x"):
        with pytest.raises(GradError, match="--pixel-threshold"):
            check_threshold(value, "--pixel-threshold")


# ---------------------------------------------------------------------------------- 4. video, crash and disk


def _wait_for(cond, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        time.sleep(0.1)


def _frames_in(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.isOpened():
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    cap.release()
    return n


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_video_survives_sigkill(calibrated: Path, frames: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"run{suffix}"
    proc = subprocess.Popen([sys.executable, "-m", "gradad.runtime.cli", str(calibrated), "--source", str(frames),
                             "--loop", "--jsonl", "", "--video", str(out), "--video-segment", "1", "--backend",
                             "onnxruntime", "--stats-every", "0"], stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: out.with_name(f"run.002{suffix}").exists())
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    finished = [out.with_name(f"run.00{i}{suffix}") for i in (0, 1)]
    for seg in finished:  # closed segments are complete and playable
        assert _frames_in(seg) > 0
    if suffix == ".mp4":
        cap = cv2.VideoCapture(str(finished[0]))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == _frames_in(finished[0])
        cap.release()


FULL_DISK_VIDEO = """\
import resource, signal, sys, numpy as np, logging
logging.basicConfig()
from gradad.runtime.sinks import VideoSink
from gradad.runtime.types import Frame, FrameResult
sink = VideoSink(sys.argv[1], fps=10, segment_s=0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
rng = np.random.default_rng(0)
for i in range(60):
    img = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    sink.write(FrameResult(frame=Frame(i, 0.0, "t", img), score=1.0, normalised_score=0.5, is_anomalous=False,
                           threshold=2.0, anomaly_map=np.zeros((128, 128), np.float32)))
sink.close()
print("REPORT", __import__("json").dumps(sink.report()))
"""


def test_video_on_a_full_disk_is_reported_incomplete(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_VIDEO, str(tmp_path / "v.mp4")], capture_output=True,
                          text=True, timeout=120)
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert report["complete"] is False and report["problems"]
    assert "video INCOMPLETE" in proc.stderr


def test_jsonl_full_disk_names_the_file_and_keeps_whole_lines(tmp_path: Path, monkeypatch) -> None:
    from gradad.errors import GradError
    from gradad.runtime.sinks import JsonlSink

    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path)
    sink.write_record({"frame_id": 0})
    real_write = sink._fh.write

    def full(data):  # the disk takes half the line, then is full
        real_write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sink, "_fh", type("F", (), {"write": staticmethod(full), "fileno": sink._fh.fileno,
                                                     "flush": lambda self=None: None,
                                                     "close": sink._fh.close})())
    with pytest.raises(GradError, match=r"r\.jsonl.*No space left"):
        sink.write_record({"frame_id": 1, "pad": "x" * 100})
    sink.close()
    text = path.read_text()
    assert text.endswith("\n") and [json.loads(x)["frame_id"] for x in text.splitlines()] == [0]


def test_bad_output_paths_fail_before_the_run(calibrated: Path, frames: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "--benchmark-out" in one_error_line(_run([str(calibrated), "--source", str(frames), "--benchmark", "2",
                                                     "--benchmark-out", str(blocker / "b.json")]))
    line = one_error_line(_run([str(calibrated), "--source", str(frames), "--benchmark-out", str(tmp_path / "b.json")]))
    assert "--benchmark-out" in line and "needs --benchmark N" in line  # was ignored without a word
    jsonl = tmp_path / "r.jsonl"
    line = one_error_line(_run([str(calibrated), "--source", str(frames), "--jsonl", str(jsonl), "--video",
                                str(blocker / "v.mp4")]))
    assert "--video" in line and str(blocker) in line


def test_an_image_file_larger_than_any_image_within_the_cap_is_not_read(tmp_path: Path, monkeypatch) -> None:
    """A many-gigabyte file named .png was read whole into memory before OpenCV's pixel cap could refuse it."""
    from gradad.data.images import read_image_rgb
    from gradad.errors import DatasetError

    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "1000000")  # 1 MP: 32 MB + 64 MB of room
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(100 * 2 ** 20)  # sparse: 100 MiB on paper, nothing on disk
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match=r"huge.png is 100 MiB: larger than any image of at most 1000000 pixels "
                                           r"can be, so it was not read \(raise OPENCV_IO_MAX_IMAGE_PIXELS"):
        read_image_rgb(huge)
    assert time.perf_counter() - t0 < 1.0  # refused from its size, not read
    fine = tmp_path / "fine.png"
    cv2.imwrite(str(fine), np.zeros((8, 8, 3), np.uint8))
    assert read_image_rgb(fine).shape == (8, 8, 3)
    stack = tmp_path / "stack.tif"  # a multi-page TIFF is decoded as its first page: no size says it is too big
    assert cv2.imwritemulti(str(stack), [np.zeros((8, 8, 3), np.uint8)] * 2)
    with stack.open("ab") as f:
        f.truncate(100 * 2 ** 20)
    assert read_image_rgb(stack).shape == (8, 8, 3)


def test_truncated_video_source_warns(tmp_path: Path, caplog) -> None:
    from gradad.runtime.sources import open_source

    full, cut = tmp_path / "full.avi", tmp_path / "cut.avi"
    writer = cv2.VideoWriter(str(full), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 64))
    rng = np.random.default_rng(0)
    for _ in range(30):
        writer.write(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    writer.release()
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with caplog.at_level(logging.WARNING), open_source(cut) as src:
        n = len(list(src))
    assert 0 < n < 30
    assert f"ended after {n} of the 30 frames" in caplog.text


# ---------------------------------------------------------------------------------------------- 5. secrets


def test_one_redaction_for_every_url() -> None:
    from gradad.urls import redact_url, redact_secrets_in

    cases = {
        "rtsp://admin:p@ss/w0rd@10.0.0.5/live": "rtsp://admin:***@10.0.0.5/live",
        "https://hooks.example.com/x?token=SECRET&ch=1": "https://hooks.example.com/x?token=***&ch=***",
        "https://TOKEN123@example.com/hook": "https://***@example.com/hook",
        "rtsp://u:pa?ss@cam:554/s": "rtsp://u:***@cam:554/s",
        "http://plain.example.com/path": "http://plain.example.com/path",
    }
    for url, want in cases.items():
        assert redact_url(url) == want
    assert "secret" not in redact_secrets_in("rtspsrc location=rtsp://u:secret@cam/x ! appsink")


@pytest.mark.parametrize(("source", "secret", "kept"), [
    ("rtsps://nvr.local:7441/ABCdef1234567890XYZabc?enableSrtp", "ABCdef1234567890", "/***?"),  # a path token
    ("rtsp://cam.local/live;jsessionid=SESSION42", "SESSION42", "/live;jsessionid=***"),
    ('rtspsrc location="rtsp://adm:pa ss@cam/x" ! appsink', "pa ss", 'location="rtsp://adm:***@cam/x"'),
    ("rtspsrc location=rtsp://cam/x extra-headers=\"Authorization: Bearer SUPERSECRET\" ! appsink", "SUPERSECRET",
     "extra-headers=***"),
    ("rtsp://cam.local/Streaming/Channels/101", None, "/Streaming/Channels/101"),  # names stay readable
    ("rtsp://nvr:554/h264Preview_01_main", None, "/h264Preview_01_main"),  # two channels stay apart
    ("rtsp://cam.local/live;SESSION42", "SESSION42", "/live;***"),
    ("cannot open 'rtsp://u:pa'ss@cam/x'", "pa'ss", "'rtsp://u:***@cam/x'"),  # a quote inside the password
])
def test_secrets_in_a_source_are_hidden_wherever_it_is_shown(source: str, secret: str | None, kept: str) -> None:
    """A security review found a UniFi-style path token, a ;jsessionid, a quoted password with a space and an
    Authorization header shown in full in --print-config, logs and every record's "source"."""
    from gradad.runtime.line_config import holds_placeholder
    from gradad.urls import redact_secrets_in

    shown = redact_secrets_in(source)
    assert kept in shown, shown
    if secret is not None:
        assert secret not in shown
        assert holds_placeholder("sources", [shown])  # the redacted text fed back is refused, not run


def test_webhook_logs_hide_credentials(caplog) -> None:
    from gradad.runtime.sinks import WebhookSink

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    with caplog.at_level(logging.DEBUG):
        sink = WebhookSink(f"http://user:hunter2@127.0.0.1:{port}/h?token=SECRET", timeout_s=0.5,
                           retry_delay_s=0.0, close_timeout_s=2.0)
        sink.write_record({"frame_id": 0})
        sink.close()
    assert sink.failed == 1
    assert "hunter2" not in caplog.text and "SECRET" not in caplog.text and "127.0.0.1" in caplog.text


def test_secrets_outside_a_url_are_hidden_too(caplog) -> None:
    """GStreamer passwords are properties, not URL parts; Slack/Teams/Discord webhooks carry their token in the
    path; a benchmark summary records the command line: none of them may show the secret."""
    from gradad.runtime.cli import redacted_command
    from gradad.runtime.sinks import WebhookSink
    from gradad.runtime.sources import parse_source

    label = parse_source("rtspsrc location=rtsp://cam/live user-id=admin user-pw=S3cret proxy-pw='p w' ! "
                         "decodebin ! videoconvert ! appsink").label
    assert "S3cret" not in label and "p w" not in label and "user-id=admin" in label and "user-pw=***" in label
    assert parse_source("videotestsrc pattern=ball ! appsink").label == "videotestsrc pattern=ball ! appsink"
    plain = "v4l2src ! x264enc bypass=1 key-int-max=30 ! identity passthrough=true authority=x ! appsink"
    assert parse_source(plain).label == plain  # ordinary properties that merely contain a secret word
    assert parse_source("srtsrc uri=srt://h:9 passphrase=hunter2 aes-key=k ! appsink").label == \
        "srtsrc uri=srt://h:9 passphrase=*** aes-key=*** ! appsink"
    with caplog.at_level(logging.WARNING):
        sink = WebhookSink("http://bot:hunter2@hooks.example.com/services/T0/B0/XOXB-SECRET", close_timeout_s=0.1)
        sink.close()
    assert sink.label == "http://bot:***@hooks.example.com/***"
    assert "unencrypted (http)" in caplog.text and "hunter2" not in caplog.text and "XOXB" not in caplog.text
    command = redacted_command(["models/m", "--mqtt-password", "hunter2", "--webhook=https://h/T/XOXB-SECRET",
                                "--source", "rtsp://u:pw@cam/live", "--benchmark"])
    assert command == ("grad-run models/m --mqtt-password *** --webhook=https://h/*** --source rtsp://u:***@cam/live "
                       "--benchmark")


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    """A 300-byte line or training file of nested aliases expands to gigabytes once walked (a repr in an error
    message hung grad-run with memory growing): aliases are one clear error, the file named."""
    from gradad.errors import ConfigError, GradError
    from gradad.runtime.line_config import read_line_config
    from gradad.training.config import load_config

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "line.yaml"
    bomb.write_text("\n".join(levels) + "\nsources: *a8\n")
    started = time.perf_counter()
    with pytest.raises(GradError, match=f"--config {bomb}: not valid YAML .*aliases"):
        read_line_config(bomb)
    with pytest.raises(ConfigError, match=f"config file {bomb} is not valid YAML/JSON: .*aliases"):
        load_config(bomb)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("line", ["    password: S3cr3t:P@ss: word", "    password: [S3cr3t:P@ss",
                                  "    password: \"S3cr3t:P@ss"])
def test_a_yaml_error_in_a_line_file_does_not_quote_the_secret(tmp_path: Path, line: str) -> None:
    """PyYAML's own error text quotes the offending line; on a line file that line can be the MQTT password, and
    grad-run's message goes to stderr and the service log: the error says where (line, column), not what."""
    from gradad.errors import GradError
    from gradad.runtime.line_config import read_line_config

    path = tmp_path / "line.yaml"
    path.write_text(f"sinks:\n  mqtt:\n{line}\n    user: station\n")
    with pytest.raises(GradError) as info:
        read_line_config(path)
    message = str(info.value)
    assert f"--config {path}: not valid YAML" in message and "at line 3, column" in message
    assert "S3cr3t" not in message and "P@ss" not in message


def test_only_names_gradad_gives_engines_are_ever_deleted() -> None:
    from gradad.export.tensorrt_build import engine_filename, is_engine_filename

    for precision in ("fp16", "fp32", "int8"):
        assert is_engine_filename(engine_filename("10.3.0", "NVIDIA Orin (nvgpu)", "8.7", precision))
    assert not any(is_engine_filename(n) for n in ("notes.txt", "model.onnx", "model_int8.onnx", "bundle.json",
                                                   "sub/model.trt10.int8.sm87.x.plan", "model.plan"))


def test_mqtt_credentials_in_host_are_refused_without_echo(calibrated: Path, frames: Path) -> None:
    result = _run([str(calibrated), "--source", str(frames), "--mqtt", "user:hunter2@broker"])
    line = one_error_line(result)
    assert "--mqtt-user" in line and "GRAD_MQTT_PASSWORD" in line and "hunter2" not in result.output
    assert "port" in one_error_line(_run([str(calibrated), "--source", str(frames), "--mqtt", "broker:x"]))


# ------------------------------------------------------------------------------------ 6. stalled stream


def test_stalled_stream_exits_2_not_134(calibrated: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accepts and never answers: FFmpeg's open hangs until our timeout
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        code = ("import sys; from gradad.runtime.cli import main; "
                f"sys.argv = ['grad-run', {str(calibrated)!r}, '--source', 'rtsp://u:pw@127.0.0.1:{port}/x', "
                "'--backend', 'onnxruntime']; main()")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
    assert proc.returncode == 2, proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.startswith("error:")] and "pw@" not in proc.stderr


# ------------------------------------------------------------------------------- 7. calibration duplicates


def test_duplicate_calibration_images_count_once(tmp_path: Path, frames: Path) -> None:
    from gradad.calibration.duplicates import distinct_images

    good = tmp_path / "good"
    good.mkdir()
    source = sorted(frames.iterdir())
    for i in range(12):
        shutil.copy(source[0], good / f"copy_{i:02d}.png")
    img = cv2.imread(str(source[1]))
    cv2.imwrite(str(good / "reencoded.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 98])
    shutil.copy(source[1], good / "original.png")
    shutil.copy(source[2], good / "other.png")
    kept, copies = distinct_images(sorted(good.iterdir()))
    assert len(kept) == 3 and len(copies) == 12  # 11 copies + the JPEG re-encoding
    assert any(c.name == "reencoded.jpg" or o.name == "reencoded.jpg" for c, o in copies)


def test_calibrate_warns_and_counts_distinct(calibrated: Path, frames: Path, tmp_path: Path, caplog) -> None:
    from gradad.calibration.cli import main as calibrate_main

    good = tmp_path / "good"
    good.mkdir()
    for i in range(12):
        shutil.copy(sorted(frames.iterdir())[0], good / f"copy_{i:02d}.png")
    b = _copy(calibrated, tmp_path)
    result = CliRunner().invoke(calibrate_main, [str(b), "--good", str(good), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert "11 of 12 good images are duplicates" in caplog.text  # logged once, when found
    assert "warning(s) above, stored with the thresholds" in result.output
    assert any("11 of 12 good images are duplicates" in w for w in read_manifest(b)["calibration"]["warnings"])
    assert read_manifest(b)["calibration"]["data"]["n_good"] == 1


# -------------------------------------------------------------------------------------- 9. glob records


def test_glob_records_carry_relative_paths_and_skip_loops(calibrated: Path, frames: Path, tmp_path: Path,
                                                          caplog) -> None:
    root = tmp_path / "imgs"
    for sub in ("crack", "good"):
        (root / sub).mkdir(parents=True)
        shutil.copy(sorted(frames.iterdir())[0], root / sub / "000.png")
    (root / "good" / "loop").symlink_to(root)  # a recursive glob would walk this forever-ish
    out = tmp_path / "r.jsonl"
    result = _run([str(calibrated), "--source", str(root / "**" / "*.png"), "--jsonl", str(out)])
    assert result.exit_code == 0, result.output
    names = [json.loads(x)["name"] for x in out.read_text().splitlines()]
    assert names == ["crack/000.png", "good/000.png"]
    assert "symlink" in caplog.text


# ------------------------------------------------------------------------------------------ 10. smaller


def test_other_valid_onnx_in_bundle_is_one_line(calibrated: Path, frames: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    b = _copy(calibrated, tmp_path)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), b / "model.onnx")
    manifest = read_manifest(b)
    manifest["files"]["model.onnx"] = file_entry(b / "model.onnx")  # the hash is updated too
    write_manifest(b, manifest)
    line = one_error_line(_run([str(b), "--source", str(frames)]))
    assert "model.onnx" in line and "not a gradad model" in line


def test_signals_exit_130_and_143(calibrated: Path, frames: Path, tmp_path: Path) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / f"{sig.name}.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "gradad.runtime.cli", str(calibrated), "--source",
                                 str(frames), "--loop", "--jsonl", str(out), "--backend", "onnxruntime"],
                                stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: out.exists() and out.stat().st_size > 0)
            proc.send_signal(sig)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 128 + sig


def test_a_link_planted_at_the_temporary_name_never_redirects_a_bundle_write(bundle: Path, tmp_path: Path) -> None:
    """A bundle from elsewhere holding ``.bundle.json.tmp<pid>`` -> ~/.bashrc must not get that file overwritten
    when a command rewrites bundle.json (the write would follow the link, then rename it into place)."""
    from gradad.bundle import Bundle

    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / f".bundle.json.tmp{os.getpid()}").symlink_to(victim)
    before = (out / "bundle.json").read_text()
    Bundle.load(out).save(out)
    assert victim.read_text() == "precious\n"
    assert not (out / "bundle.json").is_symlink() and (out / "bundle.json").read_text() == before
    assert not (out / f".bundle.json.tmp{os.getpid()}").exists()


def test_a_graph_embedding_a_precompiled_engine_is_refused_before_onnx_runtime_reads_it(tmp_path: Path) -> None:
    """ONNX Runtime's TensorRT provider deserialises the engine an EPContext node embeds (native code): such a
    graph is refused, whichever providers are available, with the file named."""
    import onnx
    from onnx import TensorProto, helper

    from gradad.runtime.backend import BackendError
    from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend, holds_precompiled_engine

    node = helper.make_node("EPContext", ["image"], ["score"], domain="com.microsoft", embed_mode=1,
                            ep_cache_context=b"\x7fELF... a plan with a plugin", source="TensorrtExecutionProvider")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    with pytest.raises(BackendError, match=f"{path} holds an EPContext node"):
        OnnxRuntimeBackend(path, ["cpu"])
    straddling = tmp_path / "straddling.bin"  # the op name across the scan's 1 MiB chunks
    straddling.write_bytes(b"\0" * ((1 << 20) - 4) + b"EPContext")
    assert holds_precompiled_engine(straddling)
    straddling.write_bytes(b"\0" * ((1 << 20) - 4) + b"EPContex")
    assert not holds_precompiled_engine(straddling)


def test_an_image_that_decodes_to_gigabytes_is_one_error_not_an_out_of_memory_kill(tmp_path: Path) -> None:
    """A 20000 x 20000 PNG is a few hundred KB on disk and 1.2 GB decoded (x the prefetch queue on a Jetson): it is
    refused at decode, in a fresh process so the cap set on import is the one OpenCV reads."""
    bomb = tmp_path / "bomb.png"
    ok, buf = cv2.imencode(".png", np.zeros((20_000, 20_000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok and len(buf) < 2_000_000
    buf.tofile(str(bomb))
    code = ("import sys; from gradad.data.images import read_image_rgb\n"
            "try:\n    print(read_image_rgb(sys.argv[1]).shape)\nexcept Exception as e:\n    print(type(e).__name__, e)")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    assert out == (f"DatasetError cannot decode image (corrupt, not an image, or over 100000000 pixels: raise "
                   f"OPENCV_IO_MAX_IMAGE_PIXELS for larger ones): {bomb}\n")
