"""Runtime sinks: JSONL, annotated frames/video/window, flagged-frame folder, webhook, MQTT, fan-out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from gradad.errors import GradError
from gradad.runtime.sinks import (DisplaySink, FlaggedFrameSink, JsonlSink, MqttSink, MultiSink, SinkBase, VideoSink,
                                  WebhookSink, annotate_frame)
from gradad.runtime.types import Frame, FrameResult

H, W = 48, 64


def make_result(frame_id: int, anomalous: bool, *, threshold: float = 1.0, hw: tuple[int, int] = (H, W),
                name: str | None = None, pixel_threshold: float | None = None, seed: int = 0,
                score: float | None = None) -> FrameResult:
    rng = np.random.default_rng(seed)
    h, w = hw
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.linspace(40, 200, w, dtype=np.uint8)[None, :]
    image[..., 1] = 90
    image[..., 2] = rng.integers(60, 120, size=(h, w), dtype=np.uint8)
    amap = np.full((16, 16), 0.2 * threshold, np.float32)
    if anomalous:
        amap[5:11, 6:12] = 1.8 * threshold
    if score is None:
        score = 1.7 * threshold if anomalous else 0.4 * threshold
    frame = Frame(frame_id=frame_id, timestamp=1_700_000_000.0 + frame_id, source="cam0", image=image,
                  name=name, decode_ms=1.5)
    return FrameResult(frame=frame, score=score, normalised_score=score / (2 * threshold), is_anomalous=anomalous,
                       threshold=threshold, anomaly_map=amap, pixel_threshold=pixel_threshold,
                       latency_ms={"decode": 1.5, "preprocess": 0.7, "inference": 4.25})


def strict_loads(line: str) -> dict:
    def bad(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(line, parse_constant=bad)


# ---------------------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_appends_flushes_and_takes_follow_ups(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.jsonl"
    path.parent.mkdir()
    path.write_text('{"earlier": "run"}\n')
    sink = JsonlSink(path)
    for i in range(3):
        sink.write(make_result(i, anomalous=(i == 1)))
    sink.write_record({"frame_id": 1, "refined": True, "mask_area": 0.12})
    # flushed after every line: visible before close
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    sink.close()
    sink.close()  # idempotent
    recs = [strict_loads(x) for x in path.read_text().splitlines()]
    assert recs[0] == {"earlier": "run"}  # appended, not truncated
    r = recs[2]
    assert r["frame_id"] == 1 and r["decision"] == "NG" and r["source"] == "cam0"
    assert r["threshold"] == 1.0 and r["refined"] is False
    assert {"timestamp", "score", "normalised_score", "latency_ms"} <= r.keys()
    assert r["latency_ms"]["inference"] == 4.25
    assert recs[1]["decision"] == "OK"
    assert recs[4] == {"frame_id": 1, "refined": True, "mask_area": 0.12}
    with pytest.raises(RuntimeError):
        sink.write_record({"frame_id": 9})
    # a second run appends again
    with JsonlSink(path) as again:
        again.write(make_result(0, False))
    assert len(path.read_text().splitlines()) == 6


def test_jsonl_partial_last_line_and_non_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"frame_id": 0}\n{"frame_id": 1, "sco')  # a run killed mid-line
    with JsonlSink(path) as sink:
        r = make_result(2, True, score=float("nan"))
        r.extra["area"] = np.float32(0.25)
        r.extra["boxes"] = np.array([[1, 2, 3, 4]])
        sink.write(r)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    rec = strict_loads(lines[2])
    assert rec["frame_id"] == 2 and rec["score"] is None and rec["area"] == 0.25 and rec["boxes"] == [[1, 2, 3, 4]]


@pytest.mark.parametrize("content", ["export PATH=$PATH:/opt/bin\n", "[1, 2]\n", "not json at all", "#!/bin/sh\n{}\n"])
def test_jsonl_refuses_to_append_to_a_file_that_holds_something_else(tmp_path: Path, content: str) -> None:
    """A line file naming ~/.bashrc as its JSONL output would get records appended, and a record's "name" (a file
    name someone else chose, e.g. '$(cmd).png') would run at the next shell start."""
    path = tmp_path / "bashrc"
    path.write_text(content)
    with pytest.raises(GradError, match="refusing to append") as info:
        JsonlSink(path)
    assert str(path) in str(info.value)
    assert path.read_text() == content  # untouched


def test_jsonl_appends_after_a_first_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"frame_id": 0, "sco')  # the first run was killed while writing its first line
    for frame_id in (1, 2):  # the second run and the third (which finds the cut line followed by a record)
        with JsonlSink(path) as sink:
            sink.write(make_result(frame_id, False))
    assert [strict_loads(line)["frame_id"] for line in path.read_text().splitlines()[1:]] == [1, 2]
    nested = tmp_path / "nested.jsonl"
    nested.write_text("[" * 200_000 + "\n")
    with pytest.raises(GradError, match="refusing to append"):  # not a RecursionError traceback
        JsonlSink(nested)


def test_jsonl_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    n, m = 300, 200
    path = tmp_path / "c.jsonl"
    sink = JsonlSink(path, fsync_every=50)
    results = [make_result(i, i % 3 == 0) for i in range(n)]

    def follow_ups() -> None:
        for j in range(m):
            sink.write_record({"frame_id": j, "refined": True, "follow_up": j, "pad": "x" * 200})

    t = threading.Thread(target=follow_ups)
    t.start()
    for r in results:
        sink.write(r)
    t.join()
    sink.close()
    recs = [strict_loads(x) for x in path.read_text().splitlines()]
    assert len(recs) == n + m
    assert sorted(r["follow_up"] for r in recs if "follow_up" in r) == list(range(m))
    assert sorted(r["frame_id"] for r in recs if "follow_up" not in r) == list(range(n))


def test_jsonl_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    sink = JsonlSink("-")
    sink.write(make_result(7, True))
    sink.close()
    out = capsys.readouterr().out.splitlines()
    assert strict_loads(out[0])["frame_id"] == 7


def test_jsonl_sigkill_keeps_every_completed_line(tmp_path: Path) -> None:
    path = tmp_path / "k.jsonl"
    code = (
        "import sys, time\n"
        "from gradad.runtime.sinks import JsonlSink\n"
        f"s = JsonlSink({str(path)!r})\n"
        "for i in range(50):\n"
        "    s.write_record({'frame_id': i})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = [strict_loads(x) for x in path.read_text().splitlines()]
    assert [r["frame_id"] for r in recs] == list(range(50))


def test_runtime_sinks_do_not_import_torch() -> None:
    code = ("import sys\nimport gradad.runtime.sinks\n"
            "bad = [m for m in ('torch', 'timm') if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# annotated frames, video, display


def _banner_fraction(img: np.ndarray, bgr: tuple[int, int, int]) -> float:
    band = img[1:10].reshape(-1, 3).astype(int)
    close = np.all(np.abs(band - np.array(bgr)) < 40, axis=1)
    return float(close.mean())


def test_annotate_frame_banner_and_size() -> None:
    ng = annotate_frame(make_result(1, True))
    ok = annotate_frame(make_result(2, False))
    for img in (ng, ok):
        assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert _banner_fraction(ng, (0, 0, 220)) > 0.6  # red (BGR)
    assert _banner_fraction(ok, (0, 170, 0)) > 0.6  # green
    assert _banner_fraction(ng, (0, 170, 0)) < 0.05 and _banner_fraction(ok, (0, 0, 220)) < 0.05
    # fixed colour range [0, 2*thr]: the hot region (1.8 thr) is red-ish, the background (0.2 thr) blue-ish
    y, x = int(8 / 16 * H), int(9 / 16 * W)
    hot, cold = ng[y, x].astype(int), ng[H - 3, 2].astype(int)
    assert hot[2] > hot[0] and cold[0] > cold[2]
    # other image sizes, a given RGB image, and the pixel-threshold contour (white)
    big = make_result(3, True, hw=(120, 200), pixel_threshold=1.0)
    out = annotate_frame(big, alpha=0.4)
    assert out.shape == (120, 200, 3)
    body = out[20:]
    assert np.all(body >= 250, axis=2).any()
    plain = annotate_frame(make_result(3, True, hw=(120, 200)))
    assert not np.all(plain[20:] >= 250, axis=2).any()
    grey = annotate_frame(make_result(4, False), image_rgb=np.full((30, 40), 128, np.uint8))
    assert grey.shape == (30, 40, 3)


def test_video_sink_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "vid" / "out.mp4"
    sink = VideoSink(path, fps=5.0)
    for i in range(6):
        hw = (24, 32) if i == 3 else (H, W)  # a frame of another size is resized to the first size
        sink.write(make_result(i, i % 2 == 0, hw=hw))
    sink.close()
    sink.close()
    assert sink.frames_written == 6
    assert sink.files == [path.with_name("out.000.mp4")] and sink.report()["complete"]
    cap = cv2.VideoCapture(str(sink.files[0]))
    try:
        assert cap.isOpened()
        count, sizes = 0, set()
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            count += 1
            sizes.add(frame.shape[:2])
    finally:
        cap.release()
    assert count == 6 and sizes == {(H, W)}


def test_video_segments_of_an_earlier_run_are_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "run.mp4"
    first = VideoSink(path, fps=5.0)
    first.write(make_result(0, True))
    first.close()
    before = path.with_name("run.000.mp4").read_bytes()
    second = VideoSink(path, fps=5.0)  # the service restarted: yesterday's evidence stays
    second.write(make_result(1, False))
    second.close()
    assert second.files == [path.with_name("run.001.mp4")]
    assert path.with_name("run.000.mp4").read_bytes() == before
    single = tmp_path / "one.mp4"
    single.write_bytes(b"an earlier single-file video")
    with pytest.raises(GradError, match="one.mp4 exists"):
        VideoSink(single, segment_s=0)
    assert single.read_bytes() == b"an earlier single-file video"


def test_an_idle_camera_s_video_segment_is_closed_when_due(tmp_path: Path) -> None:
    sink = VideoSink(tmp_path / "run.mp4", fps=5.0, segment_s=0.4)
    for i in range(3):
        sink.write(make_result(i, i == 1))
    time.sleep(1.5)  # no frame comes: the segment is closed anyway, playable if the process dies now
    assert sink._writer is None and not sink.incomplete
    cap = cv2.VideoCapture(str(sink.files[0]))
    try:
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    finally:
        cap.release()
    sink.write(make_result(3, False))  # the next frame starts the next segment
    sink.close()
    assert [f.name for f in sink.files] == ["run.000.mp4", "run.001.mp4"] and sink.report()["complete"]


def test_video_sink_errors(tmp_path: Path) -> None:
    with pytest.raises(GradError, match="FOURCC"):
        VideoSink(tmp_path / "a.mp4", fourcc="mp4")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(GradError, match="not_a_dir"):
        VideoSink(blocker / "out.mp4").write(make_result(0, True))
    with pytest.raises(GradError, match=r"cannot write a video there.*out\.nosuchformat|out\.nosuchformat.*'mp4v'"):
        VideoSink(tmp_path / "out.nosuchformat").write(make_result(0, True))


def test_display_sink_headless_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if sys.platform.startswith("linux"):
        with pytest.raises(GradError, match="no display available: use --video OUT.mp4 instead"):
            DisplaySink()
    if "GUI: NONE" in " ".join(cv2.getBuildInformation().split()):
        monkeypatch.setenv("DISPLAY", ":99")  # a display is claimed, but OpenCV has no GUI (headless build)
        with pytest.raises(GradError, match="no display available: use --video OUT.mp4 instead"):
            DisplaySink()


# ---------------------------------------------------------------------------------------------------------------
# flagged-frame folder


def _own_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name[:8].isdigit())


def _own_keys(folder: Path) -> set[str]:
    suffixes = ("_orig.png", "_overlay.jpg", "_map.npy", "_map.png")
    keys = [n[: -len(s)] for n in _own_files(folder) for s in suffixes if n.endswith(s)]
    assert len(keys) % 4 == 0
    return set(keys)


def test_flagged_frames_saved_for_ng_only(tmp_path: Path) -> None:
    folder = tmp_path / "flagged"
    sink = FlaggedFrameSink(folder)
    ok = make_result(0, False, name="part_000.png")
    ng = make_result(1, True, name="sub/part 001.png")
    sink.write(ok)
    sink.write(ng)
    sink.close()
    names = _own_files(folder)
    assert names == ["00000001_part_001_map.npy", "00000001_part_001_map.png", "00000001_part_001_orig.png",
                     "00000001_part_001_overlay.jpg"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    amap = np.load(folder / "00000001_part_001_map.npy")
    assert amap.dtype == np.float32 and np.array_equal(amap, ng.anomaly_map)
    grey = cv2.imread(str(folder / "00000001_part_001_map.png"), cv2.IMREAD_UNCHANGED)
    assert grey.dtype == np.uint8 and grey.shape == (16, 16)
    assert abs(int(grey[8, 8]) - 1.8 / 2 * 255) <= 1 and abs(int(grey[0, 0]) - 0.2 / 2 * 255) <= 1  # [0, 2 thr]
    orig = cv2.imread(str(folder / "00000001_part_001_orig.png"))
    assert np.array_equal(orig[..., ::-1], ng.frame.image)
    overlay = cv2.imread(str(folder / "00000001_part_001_overlay.jpg"))
    assert overlay.shape == (H, W, 3)
    assert sink.saved == 1 and sink.frames_on_disk == 1 and sink.total_bytes == sum(
        (folder / n).stat().st_size for n in names)


def test_flagged_frames_of_two_sources_with_the_same_frame_id_and_name_are_both_kept(tmp_path: Path) -> None:
    folder = tmp_path / "flagged"
    sink = FlaggedFrameSink(folder)
    a, b = make_result(0, True, name="part.png", seed=1), make_result(0, True, name="part.png", seed=2)
    b.frame.source = "camB"  # every source numbers its frames from 0
    sink.write(a)
    sink.write(b)
    mask = np.zeros((H, W), bool)
    mask[2:5, 3:9] = True
    saved_b = sink.write_refined(0, "part.png", "camB", mask)
    sink.close()
    assert sink.frames_on_disk == 2 and _own_keys(folder) == {"00000000_part", "00000000_part-2"}
    for key, result in (("00000000_part", a), ("00000000_part-2", b)):
        orig = cv2.imread(str(folder / f"{key}_orig.png"))
        assert np.array_equal(orig[..., ::-1], result.frame.image)  # neither overwrote the other
    assert saved_b["mask_file"] is not None and "part-2" in saved_b["mask_file"]  # refined mask: with camB's frame


def test_flagged_folder_keeps_a_live_writers_temporary_file(tmp_path: Path) -> None:
    import subprocess

    folder = tmp_path / "flagged"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a second grad-run
    try:
        live = folder / f".00000001_cam0_orig.png.tmp{other.pid}"
        stale = folder / ".00000002_cam0_orig.png.tmp999999999"
        live.write_bytes(b"being written")
        stale.write_bytes(b"left by a crash")
        FlaggedFrameSink(folder).close()
        assert live.exists() and not stale.exists()
    finally:
        other.kill()
        other.wait()


def test_flagged_frames_bounded_eviction_and_restart(tmp_path: Path) -> None:
    probe = FlaggedFrameSink(tmp_path / "probe")
    probe.write(make_result(0, True))
    one = probe.total_bytes
    assert one > 0

    folder = tmp_path / "flagged"
    folder.mkdir()
    foreign = {
        "notes.txt": b"keep me",
        "00000000_cam0_orig.txt": b"not ours (other suffix)",
        "cam0_orig.png": b"not ours (no frame id)",
        ".foreign.tmp": b"not ours",
    }
    for n, data in foreign.items():
        (folder / n).write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / "00000000_cam0_orig.png").write_bytes(b"in a sub-folder: not ours")
    (folder / ".00000099_cam0_orig.png.tmp").write_bytes(b"our stale temp file")

    sink = FlaggedFrameSink(folder, max_bytes=int(one * 2.5))
    assert not (folder / ".00000099_cam0_orig.png.tmp").exists()  # own stale temp file cleaned
    for i in range(5):
        sink.write(make_result(i, True))
    sink.close()
    assert sink.evicted == 3 and sink.frames_on_disk == 2
    assert _own_keys(folder) == {"00000003_cam0", "00000004_cam0"}
    assert sink.total_bytes <= int(one * 2.5)
    for n, data in foreign.items():
        assert (folder / n).read_bytes() == data
    assert (folder / "sub" / "00000000_cam0_orig.png").exists()

    # restart: the earlier frames are indexed, limits hold across runs, earlier files are not overwritten
    again = FlaggedFrameSink(folder, max_bytes=int(one * 2.5))
    assert again.frames_on_disk == 2 and again.total_bytes == sink.total_bytes
    again.write(make_result(3, True))  # frame ids restart: same id + name as an earlier run's frame
    assert again.evicted == 1 and again.frames_on_disk == 2
    assert _own_keys(folder) == {"00000004_cam0", "00000003_cam0-2"}
    assert not (folder / "00000003_cam0_orig.png").exists()  # the oldest (run 1's frame 3) was evicted
    assert (folder / "00000003_cam0-2_orig.png").exists()
    again.write(make_result(3, True, score=1.9))  # the same frame again in this run (e.g. refined): overwrite
    assert again.frames_on_disk == 2 and again.evicted == 1
    for n, data in foreign.items():
        assert (folder / n).read_bytes() == data
    again.close()


def test_flagged_frames_max_files_normals_and_too_big(tmp_path: Path) -> None:
    sink = FlaggedFrameSink(tmp_path / "f", max_files=2, save_normal_every=2)
    for i in range(4):
        sink.write(make_result(i, False))  # normals 2 and 4 are sampled (frame ids 1, 3)
    assert sink.frames_on_disk == 2 and {n[:8] for n in _own_files(tmp_path / "f")} == {"00000001", "00000003"}
    sink.write(make_result(10, True))
    assert sink.frames_on_disk == 2 and sink.evicted == 1
    tiny = FlaggedFrameSink(tmp_path / "t", max_bytes=100)
    tiny.write(make_result(0, True))
    assert tiny.skipped == 1 and tiny.frames_on_disk == 0 and _own_files(tmp_path / "t") == []


# ---------------------------------------------------------------------------------------------------------------
# webhook


class _Hook:
    """A loopback HTTP server recording POSTed JSON bodies."""

    def __init__(self, fail_first: int = 0, gate: threading.Event | None = None) -> None:
        self.bodies: list[dict] = []
        self.first_request = threading.Event()
        self.fail_left = fail_first
        self.gate = gate
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.first_request.set()
                if hook.gate is not None:
                    hook.gate.wait(10)
                if hook.fail_left > 0:
                    hook.fail_left -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                assert self.headers["Content-Type"] == "application/json"
                hook.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_delivers_every_record_after_close() -> None:
    hook = _Hook(fail_first=1)  # the first POST fails once: retried
    try:
        sink = WebhookSink(hook.url, timeout_s=2.0)
        for i in range(20):
            sink.write(make_result(i, i % 2 == 0))
        sink.write_record({"frame_id": 4, "refined": True})
        sink.close()
        assert sorted(b["frame_id"] for b in hook.bodies if "decision" in b) == list(range(0, 20, 2))
        assert {"frame_id": 4, "refined": True} in hook.bodies
        assert sink.sent == 11 and sink.failed == 0 and sink.dropped == 0

        every = WebhookSink(hook.url, only_anomalous=False)
        for i in range(5):
            every.write(make_result(100 + i, False))
        every.close()
        assert sorted(b["frame_id"] for b in hook.bodies if b["frame_id"] >= 100) == list(range(100, 105))
    finally:
        hook.stop()


def test_webhook_bounded_queue_drops_oldest_without_blocking() -> None:
    gate = threading.Event()
    hook = _Hook(gate=gate)
    try:
        sink = WebhookSink(hook.url, queue_size=3, only_anomalous=False, timeout_s=5.0)
        sink.write_record({"frame_id": 0})
        assert hook.first_request.wait(5)  # record 0 is in flight, the server holds it
        t0 = time.perf_counter()
        for i in range(1, 10):
            sink.write_record({"frame_id": i})
        assert time.perf_counter() - t0 < 0.5  # the camera loop never waits on the network
        assert sink.dropped == 6
        gate.set()
        sink.close()
        assert [b["frame_id"] for b in hook.bodies] == [0, 7, 8, 9]
    finally:
        gate.set()
        hook.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webhook_unreachable_counts_failures() -> None:
    sink = WebhookSink(f"http://127.0.0.1:{_free_port()}/x", timeout_s=0.5, retry_delay_s=0.01,
                       only_anomalous=False)
    for i in range(3):
        sink.write(make_result(i, True))
    t0 = time.perf_counter()
    sink.close()
    assert time.perf_counter() - t0 < 5
    assert sink.failed == 3 and sink.sent == 0
    with pytest.raises(GradError, match="webhook URL"):
        WebhookSink("ftp://example.org/x")


def test_webhook_refuses_redirects_and_never_forwards_credentials() -> None:
    seen: list[tuple[str, str | None]] = []

    class Target(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - urllib turns a redirected POST into a GET
            seen.append(("GET", self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    target_url = f"http://localhost:{target.server_address[1]}/elsewhere"

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(302)
            self.send_header("Location", target_url)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (target, origin):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sink = WebhookSink(f"http://line3:S3cret@127.0.0.1:{origin.server_address[1]}/ng", timeout_s=2.0,
                           retry_delay_s=0.01, only_anomalous=False)
        sink.write_record({"frame_id": 1})
        sink.close()
        assert sink.sent == 0 and sink.failed == 1  # a redirected record is not delivered: not counted as sent
        assert seen == []  # nothing, least of all the credentials, went to the other host
    finally:
        for server in (target, origin):
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("url", ["https://line3:Pa55/w0rd@mes.local/ng", "https://line3:Hun#ter2@mes.local/ng",
                                 "https://line3:1234/x@mes.local/ng"])
def test_webhook_refuses_a_url_whose_credentials_hide_its_host(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(GradError, match="percent-encode") as err:
        WebhookSink(url)
    assert "w0rd" not in str(err.value) and "ter2" not in str(err.value) and "/x@" not in str(err.value)
    assert "Pa55" not in caplog.text and "Hun" not in caplog.text


@pytest.mark.parametrize("options", [{"timeout_s": 0}, {"timeout_s": "2s"}, {"queue_size": "lots"},
                                     {"queue_size": 0}, {"timeout_s": True},
                                     {"timeout_s": 1e300}, {"timeout_s": 300.001},
                                     {"queue_size": 10 ** 12}])  # from a line file
def test_webhook_settings_are_checked(options: dict) -> None:
    with pytest.raises(GradError, match="webhook (timeout_s|queue_size)"):
        WebhookSink("http://127.0.0.1:9/x", **options)


def test_webhook_limits_are_inclusive() -> None:
    WebhookSink("http://127.0.0.1:9/x", timeout_s=300, queue_size=200_000).close()


def test_webhook_reads_a_bounded_part_of_a_huge_reply() -> None:
    """A hostile endpoint answering every POST with an endless body must not fill the station's memory."""
    import gradad.runtime.sinks.network as network

    served = []

    class Endless(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body runs until the connection closes
            chunk = b"x" * 65536
            try:
                for _ in range(4096):  # 256 MiB unless the client stops reading
                    self.wfile.write(chunk)
                    served.append(len(chunk))
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sink = WebhookSink(f"http://127.0.0.1:{server.server_address[1]}/x", timeout_s=5.0, only_anomalous=False)
        sink.write(make_result(0, True))
        sink.close()
        assert sink.sent == 1 and sink.failed == 0
        # it stopped reading long before the 256 MiB (what the sockets' buffers took beside its read is the rest)
        assert network.WEBHOOK_REPLY_BYTES <= sum(served) < 32 * 2 ** 20
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# MQTT


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


@pytest.fixture()
def mqtt_broker(tmp_path: Path):
    """A mosquitto broker on 127.0.0.1 (free port) for this test; skipped when paho-mqtt or mosquitto is missing."""
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (pip install paho-mqtt)")
    exe = _mosquitto()
    if exe is None:
        pytest.skip("no MQTT broker: install mosquitto (apt-get install -y mosquitto) to run the MQTT test")
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    pytest.skip(f"mosquitto did not start: {err.strip()[:200]}")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_mqtt_round_trip(mqtt_broker: int) -> None:
    import paho.mqtt.client as mqtt

    got: list[dict] = []
    subscribed = threading.Event()
    done = threading.Event()

    sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="gradad-test-sub")

    def on_message(client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        got.append(json.loads(msg.payload))
        if len(got) >= 6:
            done.set()

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda client, *a: client.subscribe("gradad/test", qos=1)
    sub.connect("127.0.0.1", mqtt_broker)
    sub.loop_start()
    try:
        assert subscribed.wait(5)
        sink = MqttSink("127.0.0.1", mqtt_broker, topic="gradad/test", qos=1, client_id="gradad-test-pub")
        for i in range(5):
            sink.write(make_result(i, i == 2))
        sink.write_record({"frame_id": 2, "refined": True})
        sink.close()
        assert sink.published == 6 and sink.dropped == 0
        assert done.wait(5)
    finally:
        sub.disconnect()
        sub.loop_stop()
    assert [r["frame_id"] for r in got[:5]] == list(range(5))
    assert got[2]["decision"] == "NG" and got[5] == {"frame_id": 2, "refined": True}


def test_mqtt_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (pip install paho-mqtt)")
    with pytest.raises(GradError, match="cannot connect to MQTT broker 127.0.0.1"):
        MqttSink("127.0.0.1", _free_port(), connect_timeout_s=1.0)
    for mod in ("paho", "paho.mqtt", "paho.mqtt.client"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(GradError, match="pip install paho-mqtt"):
        MqttSink("127.0.0.1")


def test_mqtt_tls_is_used_and_its_failures_are_one_line(tmp_path: Path) -> None:
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed (pip install paho-mqtt)")
    with pytest.raises(GradError, match="CA certificate file not found: .*no-ca.pem"):
        MqttSink("127.0.0.1", _free_port(), ca_certs=str(tmp_path / "no-ca.pem"))
    bad_ca = tmp_path / "bad-ca.pem"
    bad_ca.write_text("not a certificate")
    with pytest.raises(GradError, match="MQTT TLS set-up failed"):
        MqttSink("127.0.0.1", _free_port(), ca_certs=str(bad_ca))
    plain = socket.socket()  # a broker that does not speak TLS: accepts and hangs up
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)

    def hang_up() -> None:
        conn, _ = plain.accept()
        conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with pytest.raises(GradError, match="cannot connect to MQTT broker 127.0.0.1:[0-9]+ over TLS"):
            MqttSink("127.0.0.1", plain.getsockname()[1], tls=True, connect_timeout_s=2.0)
    finally:
        plain.close()


def test_mqtt_cleartext_credentials_rule() -> None:
    from gradad.runtime.sinks.network import cleartext_credentials

    assert cleartext_credentials("broker.local", "line3") and cleartext_credentials("10.0.0.5", "line3")
    assert not cleartext_credentials("127.0.0.1", "line3") and not cleartext_credentials("localhost", "line3")
    assert not cleartext_credentials("broker.local", None)


def test_mqtt_password_without_user_is_refused_not_dropped() -> None:
    with pytest.raises(GradError, match="MQTT password given without a user name"):
        MqttSink("127.0.0.1", _free_port(), password="s3cret", connect_timeout_s=0.5)


# ---------------------------------------------------------------------------------------------------------------
# fan-out


class _Fake(SinkBase):
    def __init__(self, fail_close: bool = False, with_records: bool = True) -> None:
        self.results: list[FrameResult] = []
        self.records: list[dict] = []
        self.fail_close = fail_close
        self.with_records = with_records  # False: keeps the base class's no-op write_record
        self.quit = False

    @property
    def quit_requested(self) -> bool:
        return self.quit

    def write(self, result: FrameResult) -> None:
        self.results.append(result)

    def write_record(self, record: dict) -> None:
        if self.with_records:
            self.records.append(record)

    def close(self) -> None:
        self._closed = True
        if self.fail_close:
            raise OSError("disk gone")


def test_multisink_fans_out_and_closes_all() -> None:
    a, b, c = _Fake(fail_close=True), _Fake(with_records=False), _Fake(fail_close=True)
    multi = MultiSink([a, b, c])
    multi.write(make_result(0, True))
    multi.write_record({"frame_id": 0, "refined": True})
    assert len(a.results) == len(b.results) == len(c.results) == 1
    assert a.records == c.records == [{"frame_id": 0, "refined": True}] and b.records == []
    assert not multi.quit_requested
    b.quit = True
    assert multi.quit_requested
    with pytest.raises(OSError, match="disk gone"):
        multi.close()
    assert a.closed and b.closed and c.closed
    multi.close()  # idempotent
