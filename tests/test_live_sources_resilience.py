"""Live sources on a production line: one camera down does not stop the others, a corrupt frame is passed over on
the same connection, a damaged video reads on, latency counts no wait for the next frame, Ctrl-C while a stream
opens is prompt, a lost source gives up when told and logs its outage once, a repeated signal is one request, and
--max-frames counts the records written (simulated cameras and a loopback MJPEG server; no hardware)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import gradad.runtime.cli as cli
import gradad.runtime.pipeline as pipeline
from gradad.runtime.pipeline import RunOptions, StopFlag, Thresholds, interleave, run_pipeline
from gradad.runtime.sources import OpenInterrupted, SourceConfig, SourceError, open_source
from gradad.runtime.types import Frame
from test_runtime_stops import _DRIVER, _Backend, _Sink

SOURCES_LOG = "gradad.runtime.sources"


# ------------------------------------------------------------------------------------------ simulated cameras


class _Camera:
    """A ``capture_factory``: each capture's ``grab()`` waits ``interval`` for the next frame and fails for frame
    numbers where ``bad(n)`` holds (a corrupt JPEG) and while ``up`` is False (the camera is gone: opens fail too).
    ``read()`` is grab + retrieve, as in OpenCV."""

    def __init__(self, interval: float = 0.005, bad: Callable[[int], bool] = lambda n: False,
                 grab_wait: float = 0.0) -> None:
        self.interval, self.bad, self.grab_wait = interval, bad, grab_wait
        self.up, self.opens, self.grabs = True, 0, 0
        self.lock = threading.Lock()

    def __call__(self, kind: str, value: Any, config: SourceConfig) -> _Capture:
        self.opens += 1
        return _Capture(self, self.up)


class _Capture:
    def __init__(self, camera: _Camera, opened: bool) -> None:
        self.camera, self.opened, self.n = camera, opened, 0

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def grab(self) -> bool:
        time.sleep(self.camera.interval)
        with self.camera.lock:
            self.n = self.camera.grabs
            self.camera.grabs += 1
        return self.camera.up and not self.camera.bad(self.n)

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, np.full((8, 8, 3), self.n % 256, np.uint8)

    def read(self) -> tuple[bool, np.ndarray | None]:
        return self.retrieve() if self.grab() else (False, None)

    def release(self) -> None:
        pass


def _fast(**kw: Any) -> SourceConfig:
    return SourceConfig(**{"reconnect_initial_s": 0.02, "reconnect_max_s": 0.1, "open_timeout_s": 2.0, **kw})


def _collect(frames: Any, seconds: float) -> list[Frame]:
    """The frames an iterator yields within ``seconds`` (read on a thread: a blocked next() cannot hang the test)."""
    got: list[Frame] = []
    threading.Thread(target=lambda: [got.append(f) for f in frames], daemon=True).start()
    time.sleep(seconds)
    return list(got)


# -------------------------------------------------------------------------------- 1. several live sources


def test_a_camera_that_goes_down_does_not_stop_the_others() -> None:
    healthy, failing = _Camera(interval=0.01), _Camera(interval=0.01)
    a = open_source(0, _fast(), capture_factory=healthy)
    b = open_source(1, _fast(), capture_factory=failing)
    try:
        failing.up = False  # down from its second frame on, reconnecting for ever
        got = _collect(interleave([a, b]), 1.5)
    finally:
        for src in (a, b):
            src.interrupt()
            src.close()
    from_a = [f for f in got if f.source == "camera 0"]
    assert len(from_a) >= 40, len(from_a)  # ~100 at 10 ms; old round-robin: stuck after B's first frame
    assert b.stats()["connected"] is False and b.stats()["outages"] == 1


def test_a_slow_camera_does_not_hold_a_fast_one_to_its_rate() -> None:
    fast, slow = _Camera(interval=0.01), _Camera(interval=0.25)
    a = open_source(0, _fast(), capture_factory=fast)
    b = open_source(1, _fast(), capture_factory=slow)
    try:
        got = _collect(interleave([a, b]), 1.5)
    finally:
        for src in (a, b):
            src.interrupt()
            src.close()
    n_fast = sum(f.source == "camera 0" for f in got)
    n_slow = sum(f.source == "camera 1" for f in got)
    assert n_slow >= 3 and n_fast >= 5 * n_slow, (n_fast, n_slow)  # old: one fast frame per slow one


# -------------------------------------------------------------------------------- 2. corrupt live frames


def test_a_corrupt_frame_is_skipped_on_the_same_connection() -> None:
    camera = _Camera(bad=lambda n: n % 3 == 2)  # every third frame cannot be decoded
    with open_source(0, _fast(), capture_factory=camera) as src:
        frames = [next(src) for _ in range(20)]
        time.sleep(0.05)
        stats = src.stats()
    assert len(frames) == 20 and camera.opens == 1  # old: a reconnect per corrupt frame
    assert stats["reconnects"] == 0 and stats["outages"] == 0 and stats["skipped"] >= 9


def test_only_failed_reads_in_a_row_count_as_a_lost_source(caplog: pytest.LogCaptureFixture) -> None:
    camera = _Camera(bad=lambda n: 5 <= n < 14 or 20 <= n < 30)  # 9 unreadable frames in a row, later 10
    with caplog.at_level(logging.INFO, logger=SOURCES_LOG):
        with open_source(0, _fast(), capture_factory=camera) as src:  # read_failures: 10 in a row
            frames = [next(src) for _ in range(15)]
            stats = src.stats()
    assert len(frames) == 15 and stats["outages"] == 1 and stats["reconnects"] == 1 and camera.opens == 2
    assert stats["skipped"] == 9  # the 10 in a row were a lost connection, not frames passed over
    assert any("10 read(s) in a row gave no frame" in r.getMessage() for r in caplog.records)


def test_a_stream_whose_frames_never_decode_says_so() -> None:
    with pytest.raises(SourceError, match="could not be decoded") as info:
        open_source("rtsp://cam.local/live", _fast(), capture_factory=_Camera(bad=lambda n: True))
    assert "unreachable" not in str(info.value)  # not the message of a stream that cannot be reached


class _MjpegHandler(BaseHTTPRequestHandler):
    """multipart MJPEG at 50 fps; every ``server.corrupt``-th frame (1: all) is random bytes between JPEG markers;
    ``server.streaming`` cleared ends every stream."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        good = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))[1].tobytes()
        rng, i = np.random.default_rng(0), 0
        try:
            while self.server.streaming.is_set():  # type: ignore[attr-defined]
                every = self.server.corrupt  # type: ignore[attr-defined]
                bad = every and i % every == every - 1
                data = b"\xff\xd8" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + b"\xff\xd9" if bad else good
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data))
                self.wfile.write(data + b"\r\n")
                i += 1
                time.sleep(0.02)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def mjpeg() -> Any:
    """A loopback MJPEG server (``.url``; ``.corrupt``, ``.stop()``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MjpegHandler)
    server.daemon_threads = True
    server.corrupt, server.streaming = 0, threading.Event()  # type: ignore[attr-defined]
    server.streaming.set()  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}/s.mjpg"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.streaming.clear()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()

    server.stop = stop  # type: ignore[attr-defined]
    yield server
    if server.streaming.is_set():  # type: ignore[attr-defined]
        stop()


def test_a_corrupt_jpeg_in_a_real_mjpeg_stream_is_skipped_without_reconnecting(mjpeg: Any) -> None:
    mjpeg.corrupt = 3
    with open_source(mjpeg.url, _fast(open_timeout_s=5.0)) as src:
        frames = [next(src) for _ in range(15)]
        stats = src.stats()
    assert len(frames) == 15 and stats["reconnects"] == 0 and stats["outages"] == 0 and stats["skipped"] >= 3


def test_a_real_stream_of_undecodable_frames_is_told_from_a_stalled_one(mjpeg: Any) -> None:
    mjpeg.corrupt = 1
    with pytest.raises(SourceError, match="could not be decoded"):
        open_source(mjpeg.url, _fast(open_timeout_s=1.5))
    server, url = _stalled_server()
    try:
        with pytest.raises(SourceError, match="unreachable or stalled"):
            open_source(url, _fast(open_timeout_s=1.5))
    finally:
        server.close()


# -------------------------------------------------------------------------------- 3. damaged video files


class _DamagedVideo:
    """An FFmpeg-like video capture (positions count decoded frames): frames in ``bad`` fail their read alone;
    reads past ``length`` fail (a truncated file announcing ``announced`` frames)."""

    def __init__(self, length: int, bad: set[int], announced: int) -> None:
        self.length, self.bad, self.announced, self.next = length, bad, announced, 0

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def getBackendName(self) -> str:  # noqa: N802
        return "FFMPEG"

    def get(self, prop: int) -> float:
        return float(self.announced) if prop == cv2.CAP_PROP_FRAME_COUNT else 0.0

    def read(self) -> tuple[bool, np.ndarray | None]:
        i, self.next = self.next, self.next + 1
        if i >= self.length or i in self.bad:
            return False, None
        return True, np.full((4, 4, 3), i, np.uint8)

    def release(self) -> None:
        pass


def _read_video(tmp_path: Path, cap: _DamagedVideo) -> tuple[list[int], dict[str, Any]]:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    with open_source(str(path), capture_factory=lambda *a: cap) as src:
        return [int(f.image[0, 0, 0]) for f in src], src.stats()


def test_a_damaged_mp4_reads_on_past_the_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        frames, stats = _read_video(tmp_path, _DamagedVideo(30, {11, 12}, 30))
    assert frames == [i for i in range(30) if i not in (11, 12)]  # old: frames 0-10 only
    assert stats["skipped"] == 2 and "2 of 30 frames unreadable (after #10" in caplog.text
    assert "the rest is missing" not in caplog.text


def test_a_truncated_mp4_stops_after_failures_in_a_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cap = _DamagedVideo(5, set(), 1000)
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        frames, stats = _read_video(tmp_path, cap)
    assert frames == list(range(5)) and stats["skipped"] == 0 and cap.next < 40  # not 1000 reads
    assert "ended after 5 of the 1000 frames" in caplog.text


# -------------------------------------------------------------------------------- 4. latency of live frames


def test_live_latency_does_not_count_the_wait_for_the_next_frame() -> None:
    camera = _Camera(interval=0.5)  # grab() waits 500 ms for each frame; retrieve() is quick
    decodes, ages = [], []
    with open_source(0, _fast(), capture_factory=camera) as src:
        next(src)
        for _ in range(3):
            frame = next(src)  # taken as soon as it arrives
            decodes.append(frame.decode_ms)
            ages.append(frame.age_ms())
    assert all(ms < 250 for ms in decodes), decodes  # old: ~500 ms, the wait for the frame
    assert all(ms < 250 for ms in ages), ages


# -------------------------------------------------------------------------------- 5. Ctrl-C while opening


def test_the_stop_flag_ends_an_open_at_once() -> None:
    camera = _Camera(interval=5.0)  # a stream that connects, then sends nothing
    stop = StopFlag()
    threading.Timer(0.2, stop.set, ("SIGINT",)).start()
    t0 = time.monotonic()
    with pytest.raises(OpenInterrupted):
        open_source("http://cam.local/s.mjpg", _fast(open_timeout_s=10.0), capture_factory=camera,
                    stopping=stop.__bool__)
    assert time.monotonic() - t0 < 3.0  # old: 5 s, the first frame's wait


def _stalled_server() -> tuple[socket.socket, str]:
    """A TCP server that accepts and never answers (a stream that hangs while opening)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    return server, f"http://127.0.0.1:{server.getsockname()[1]}/s.mjpg"


def _grad_run(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """grad-run with a stand-in backend (test_runtime_stops' driver) in a subprocess."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    return subprocess.Popen([sys.executable, str(driver), str(tmp_path / "bundle"), "--jsonl",
                             str(tmp_path / "run.jsonl"), "--stats-every", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_while_a_stream_opens_exits_130_at_once(tmp_path: Path) -> None:
    server, url = _stalled_server()
    server.settimeout(30)
    proc = _grad_run(tmp_path, "--source", url)
    try:
        conn, _ = server.accept()  # grad-run is opening the stream, which never answers
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - t0
        conn.close()
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 130 and took < 6.0, (proc.returncode, took, err)  # old: ~10 s, then exit 2
    assert "error:" not in err, err


# -------------------------------------------------------------------------------- 6. outages and giving up


def test_an_outage_is_logged_once_and_counted_in_the_stats(caplog: pytest.LogCaptureFixture) -> None:
    camera = _Camera()
    with caplog.at_level(logging.INFO, logger=SOURCES_LOG):
        with open_source(0, _fast(), capture_factory=camera) as src:
            next(src)
            camera.up = False
            time.sleep(0.8)  # ~16 failed reconnect attempts at 50 ms
            down = src.stats()
            camera.up = True
            time.sleep(0.3)
            back = src.stats()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == SOURCES_LOG]
    assert len(warnings) == 1 and "lost" in warnings[0], warnings  # old: one per attempt
    assert any("reconnected after" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert down["connected"] is False and down["outages"] == 1 and down["down_seconds"] >= 0.5
    assert back["connected"] is True and back["reconnects"] == 1 and back["down_seconds"] < 2.0


def test_a_source_down_longer_than_the_give_up_time_ends(caplog: pytest.LogCaptureFixture) -> None:
    camera = _Camera()
    gave_up = threading.Event()
    with caplog.at_level(logging.ERROR, logger=SOURCES_LOG):
        src = open_source(0, _fast(reconnect_give_up_s=0.5), capture_factory=camera, on_give_up=gave_up.set)
        next(src)
        camera.up = False
        t0 = time.monotonic()
        rest = list(src)  # ends by itself
        took = time.monotonic() - t0
        src.close()
    stats = src.stats()
    assert len(rest) <= 1 and 0.4 < took < 2.0 and gave_up.is_set()
    assert stats["gave_up"] is True and stats["connected"] is False and stats["down_seconds"] >= 0.5
    assert any("giving up" in r.getMessage() for r in caplog.records)


def test_reconnect_settings_are_flags_and_line_file_keys(tmp_path: Path) -> None:
    line = tmp_path / "line.yaml"
    line.write_text("sources: ['http://cam.local/s.mjpg']\nreconnect: {give_up_s: 30, backoff_max_s: 1.5}\n")
    result = CliRunner().invoke(cli.main, [str(tmp_path), "--config", str(line), "--reconnect-give-up", "45",
                                           "--print-config"])
    assert result.exit_code == 0, result.output
    assert "reconnect:\n  give_up_s: 45.0\n  backoff_max_s: 1.5\n" in result.output


def test_grad_run_gives_up_on_a_lost_stream_with_exit_2_and_no_ffmpeg_noise(tmp_path: Path, mjpeg: Any) -> None:
    proc = _grad_run(tmp_path, "--source", mjpeg.url, "--reconnect-give-up", "1")
    try:
        out = tmp_path / "run.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
            time.sleep(0.05)
        mjpeg.stop()  # the stream ends and the port refuses connections
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost for good" in errors[0] and "--reconnect-give-up 1 s" in errors[0], err
    summary = json.loads(next(line for line in err.splitlines() if line.startswith('{"summary"')))["summary"]
    assert summary["source_stats"][mjpeg.url]["gave_up"] is True
    assert "[tcp @" not in err and "Connection refused" not in err, err  # FFmpeg's own lines are quiet


# -------------------------------------------------------------------------------- 7. a repeated signal


def test_a_repeat_of_the_stopping_signal_at_once_is_the_same_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "REPEAT_SIGNAL_S", 30.0)  # a loaded machine may take long between the two
    stop = StopFlag()
    restore = stop.install()
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # timeout(1): the process, then its group
            time.sleep(0.05)  # the handlers run
        except KeyboardInterrupt:  # old: the repeat stopped the run at once, losing its summary
            pytest.fail("a repeat of the stopping signal within REPEAT_SIGNAL_S stopped the run at once")
        assert stop and stop.signal_name == "SIGTERM"
        monkeypatch.setattr(pipeline, "REPEAT_SIGNAL_S", 0.0)  # "later": past the window
        with pytest.raises(KeyboardInterrupt):  # later, a second signal still stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        restore()


def test_the_frame_count_survives_a_stop_at_once(caplog: pytest.LogCaptureFixture) -> None:
    stop = StopFlag()

    class Interrupting(_Sink):
        def write(self, result: Any) -> None:
            if len(self.results) == 3:
                stop.set("SIGTERM")
                raise KeyboardInterrupt  # the second signal's handler
            super().write(result)

    frames = (Frame(i, time.time(), "camera 0", np.zeros((16, 16, 3), np.uint8)) for i in range(10))
    with caplog.at_level(logging.INFO, logger="gradad.runtime.pipeline"), pytest.raises(KeyboardInterrupt):
        run_pipeline(frames, _Backend(), Thresholds(1.0), [Interrupting()], RunOptions(stats_every_s=0), stop)
    assert "stopped by SIGTERM after 3 frames" in caplog.text  # old: after 0 frames


# -------------------------------------------------------------------------------- 8. --max-frames


class _SlowBackend(_Backend):
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.03)
        return super().infer(images)


def test_max_frames_on_a_live_source_counts_frames_scored() -> None:
    camera = _Camera(interval=0.002)  # much faster than the backend: the loop drops frames
    sink = _Sink()
    with open_source(0, _fast(), capture_factory=camera) as src:
        stats = run_pipeline(iter(src), _SlowBackend(), Thresholds(1.0), [sink],
                             RunOptions(max_frames=10, live=True, stats_every_s=0, warmup=False))
    assert len(sink.results) == 10 and stats.dropped > 0  # old: fewer records than asked for


def test_max_frames_0_is_no_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((16, 16, 3), 60 * i, np.uint8))
    monkeypatch.setattr(cli, "load_engine", lambda settings: (_Backend(), type("B", (), {"name": "fake"})(),
                                                              Thresholds(1.0)))
    out = tmp_path / "run.jsonl"
    result = CliRunner().invoke(cli.main, [str(tmp_path / "bundle"), "--source", str(tmp_path), "--max-frames", "0",
                                           "--jsonl", str(out), "--stats-every", "0"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 4  # old: none


# -------------------------------------------------------------------------------- review fixes


def test_max_frames_on_a_camera_that_then_sends_nothing_ends_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """The loop stops at --max-frames while the capture thread waits for a frame that never comes: the source is
    interrupted, not waited for (old: 5 s, then 'the grad-capture thread did not stop within 5 s')."""
    camera = _Camera(interval=0.01)
    sink = _Sink()

    def on_result(result: Any) -> None:
        if len(sink.results) >= 10:
            camera.up = False  # the line stops as the 10th record is written

    with caplog.at_level(logging.WARNING, logger="gradad.runtime.pipeline"):
        with open_source(0, _fast(), capture_factory=camera) as src:
            t0 = time.monotonic()
            run_pipeline(iter(src), _Backend(), Thresholds(1.0), [sink],
                         RunOptions(max_frames=10, live=True, stats_every_s=0, warmup=False, on_result=on_result))
            took = time.monotonic() - t0
    assert len(sink.results) == 10
    assert took < 4.0 and "did not stop" not in caplog.text, (took, caplog.text)


def test_a_source_given_up_during_a_ctrl_c_drain_keeps_the_signal_as_the_reason() -> None:
    """First reason wins: SIGINT, then a source gives up: still SIGINT (exit 130, not 2); no second-signal path."""
    stop = StopFlag()
    restore = stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        stop.set("a lost source")  # from the capture thread, during the drain
        assert stop.signal_name == "SIGINT" and stop.signalled == "SIGINT"  # old: "a lost source"
    finally:
        restore()


def test_the_first_signal_after_a_source_gave_up_is_not_a_second_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "REPEAT_SIGNAL_S", 0.0)
    stop = StopFlag()
    restore = stop.install()
    try:
        stop.set("a lost source")
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the operator's first SIGTERM during the shutdown
            time.sleep(0.05)
        except KeyboardInterrupt:  # old: counted as a second signal, stopped at once
            pytest.fail("the first signal after a give-up was taken as a second signal")
        assert stop.signal_name == "a lost source" and stop.signalled == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal still stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        restore()


def test_a_reconnect_back_off_of_0_is_refused_everywhere(tmp_path: Path) -> None:
    """0 s reopened a lost camera hundreds of times a second (old: accepted by the flag, the file and the config)."""
    with pytest.raises(SourceError, match="at least|>= 0.1"):
        SourceConfig(reconnect_max_s=0.0)
    runner = CliRunner()
    flag = runner.invoke(cli.main, [str(tmp_path), "--source", "0", "--reconnect-backoff-max", "0",
                                    "--print-config"])
    assert flag.exit_code == 2 and "--reconnect-backoff-max" in flag.output, flag.output
    line = tmp_path / "line.yaml"
    line.write_text("sources: ['0']\nreconnect: {backoff_max_s: 0}\n")
    from_file = runner.invoke(cli.main, [str(tmp_path), "--config", str(line), "--print-config"])
    assert from_file.exit_code == 2 and "0.1" in from_file.output, from_file.output
    ok = runner.invoke(cli.main, [str(tmp_path), "--source", "0", "--reconnect-backoff-max", "0.1",
                                  "--print-config"])
    assert ok.exit_code == 0, ok.output


def test_a_crashed_capture_thread_is_named_as_the_reason_the_run_stopped() -> None:
    """Old: 'no frame for longer than --reconnect-give-up 30 s' for a capture thread that failed at once."""
    gave_up = threading.Event()
    src = open_source(0, _fast(), capture_factory=_Camera(), on_give_up=gave_up.set)

    def crash(cap: Any) -> bool:
        raise RuntimeError("a bug in the capture code")

    try:
        src._read_next = crash  # type: ignore[attr-defined]  # the capture thread's next read fails
        assert gave_up.wait(10)
    finally:
        src.close()
    stats = src.stats()
    assert stats["gave_up"] and "capture thread failed" in stats["gave_up_reason"], stats
    with pytest.raises(cli.GradError) as err:
        cli._refuse_lost_sources({src.label: stats}, 30.0)
    assert "a bug in the capture code" in str(err.value) and "--reconnect-give-up" not in str(err.value)


def test_a_stream_that_times_out_in_ffmpeg_says_how_long_it_waited() -> None:
    """FFmpeg gives up opening a silent stream at 70 % of open_timeout_s; the message said the full timeout (old code:
    "no frame within 1s" after 0.75 s). A watchdog timeout still names the full time."""

    def silent(kind: str, value: Any, config: SourceConfig) -> _Capture:
        time.sleep(0.75)  # what FFmpeg's own open timeout (0.7 x open_timeout_s) does before it returns
        return _Capture(_Camera(), opened=False)

    with pytest.raises(SourceError, match=r"stream gave no frame within 0\.[78]s \(unreachable or stalled\)"):
        open_source("rtsp://127.0.0.1:9/x", _fast(open_timeout_s=1.0), capture_factory=silent)

    def hung(kind: str, value: Any, config: SourceConfig) -> _Capture:
        time.sleep(1.5)
        return _Capture(_Camera(), opened=False)

    with pytest.raises(SourceError, match=r"stream gave no frame within 1s"):
        open_source("rtsp://127.0.0.1:9/x", _fast(open_timeout_s=1.0), capture_factory=hung)
