"""Frame sources: classification, image folders/globs, video files, and live cameras (simulated; no hardware)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from gradad.errors import GradError
from gradad.runtime.sources import (
    FrameSource,
    SourceConfig,
    SourceError,
    open_source,
    parse_source,
)

JETSON_CSI = (
    "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 ! nvvidconv ! "
    "video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1"
)


def _write_png(path: Path, value: int, size: int = 16) -> None:
    img = np.full((size, size, 3), value, dtype=np.uint8)  # grey: BGR == RGB
    assert cv2.imwrite(str(path), img)


# ------------------------------------------------------------------------------------------ parse_source


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "imgs").mkdir()
    _write_png(tmp_path / "imgs" / "a.png", 10)
    video = tmp_path / "clip.MP4"
    video.write_bytes(b"not really a video")
    image = tmp_path / "one.jpg"
    image.write_bytes(b"x")
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    return {"dir": tmp_path / "imgs", "video": video, "image": image, "other": other, "root": tmp_path}


@pytest.mark.parametrize(
    ("spec", "kind", "live"),
    [
        (0, "camera", True),
        (3, "camera", True),
        ("1", "camera", True),
        (" 2 ", "camera", True),
        ("/dev/video0", "camera", True),
        (JETSON_CSI, "gstreamer", True),
        ("rtsp://user:pw@10.0.0.5:554/stream1", "stream", True),
        ("RTSPS://cam.local/live", "stream", True),
        ("http://cam.local/mjpg/video.mjpg", "stream", True),
        ("https://example.com/live.m3u8", "stream", True),
        ("udp://0.0.0.0:5000", "stream", True),
        ("{dir}", "folder", False),
        ("{video}", "video", False),
        ("{image}", "image", False),
        ("{dir}/*.png", "glob", False),
        ("{root}/**/[ab].png", "glob", False),
    ],
)
def test_parse_source_classification(files: dict[str, Path], spec: Any, kind: str, live: bool) -> None:
    if isinstance(spec, str):
        spec = spec.format(**{k: str(v) for k, v in files.items()})
    parsed = parse_source(spec)
    assert parsed.kind == kind
    assert parsed.live is live
    if kind == "camera" and not str(spec).startswith("/dev"):
        assert parsed.value == int(spec)


def test_parse_source_errors(files: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match="source not found: .*nope.mp4"):
        parse_source(str(files["root"] / "nope.mp4"))
    with pytest.raises(SourceError, match="unsupported source file type"):
        parse_source(str(files["other"]))
    with pytest.raises(SourceError, match="camera index"):
        parse_source(-1)
    with pytest.raises(SourceError):
        parse_source("")
    assert issubclass(SourceError, GradError)


def test_stream_label_masks_password() -> None:
    spec = parse_source("rtsp://admin:s3cret@10.0.0.5/stream")
    assert "s3cret" not in spec.label
    assert spec.label == "rtsp://admin:***@10.0.0.5/stream"


# ---------------------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("prefetch", [0, 3])
def test_folder_skips_corrupt_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, prefetch: int
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    _write_png(folder / "a.png", 10)
    (folder / "b.png").write_bytes(b"\x89PNG garbage, not an image")
    _write_png(folder / "c.png", 30)
    _write_png(folder / "d.png", 40)
    (folder / "readme.txt").write_text("ignored")
    (folder / "sub").mkdir()
    _write_png(folder / "sub" / "e.png", 50)  # not recursive

    with caplog.at_level(logging.ERROR, logger="gradad.runtime.sources"):
        with open_source(str(folder), SourceConfig(prefetch=prefetch)) as src:
            frames = list(src)
            stats = src.stats()
    assert [f.name for f in frames] == ["a.png", "c.png", "d.png"]
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 30, 40]
    assert [f.frame_id for f in frames] == [0, 1, 2]
    assert all(f.image.dtype == np.uint8 and f.image.shape == (16, 16, 3) for f in frames)
    assert all(f.source == str(folder) for f in frames)
    assert stats["skipped"] == 1 and stats["delivered"] == 3 and stats["dropped"] == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "b.png" in errors[0].getMessage()


def test_folder_all_corrupt_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"junk")
    with open_source(str(tmp_path)) as src, pytest.raises(SourceError, match="no readable image"):
        list(src)


def test_glob_and_single_image(tmp_path: Path) -> None:
    for i, name in enumerate(["b.png", "a.png", "c.jpg"]):
        _write_png(tmp_path / name, 20 * (i + 1))
    with open_source(str(tmp_path / "*.png")) as src:
        assert [f.name for f in src] == ["a.png", "b.png"]
    with open_source(str(tmp_path / "c.jpg")) as src:
        frames = list(src)
    assert len(frames) == 1 and frames[0].name == "c.jpg"


def test_empty_folder_and_glob_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no image files.*empty"):
        open_source(str(empty))
    with pytest.raises(SourceError, match=r"match the glob: .*\*\.png"):
        open_source(str(empty / "*.png"))


def test_folder_loop_and_max_frames(tmp_path: Path) -> None:
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", i)
    with open_source(str(tmp_path), SourceConfig(loop=True)) as src:
        frames = list(itertools.islice(src, 7))  # the frame limit is the loop's (RunOptions.max_frames)
    assert [f.frame_id for f in frames] == list(range(7))
    assert [f.name for f in frames] == ["0.png", "1.png", "2.png"] * 2 + ["0.png"]


# -------------------------------------------------------------------------------------------- video files


def _write_video(path: Path, n: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        img = np.zeros((48, 64, 3), dtype=np.uint8)
        img[:, :, 2] = 200  # BGR red
        img[:, :, 1] = 20 * i  # green encodes the index
        writer.write(img)
    writer.release()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_video_file_all_frames_in_order(tmp_path: Path, prefetch: int) -> None:
    video = tmp_path / "clip.avi"
    _write_video(video, 10)
    with open_source(str(video), SourceConfig(prefetch=prefetch)) as src:
        frames = []
        for frame in src:
            time.sleep(0.002)  # a slow consumer must not cause drops for files
            frames.append(frame)
        stats = src.stats()
    assert len(frames) == 10
    assert [f.frame_id for f in frames] == list(range(10))
    assert [f.name for f in frames] == [f"clip.avi#{i}" for i in range(10)]
    greens = [float(f.image[..., 1].mean()) for f in frames]
    assert all(abs(g - 20 * i) < 8 for i, g in enumerate(greens))
    assert all(f.image[..., 0].mean() > 150 and f.image[..., 2].mean() < 50 for f in frames)  # RGB order
    assert stats["dropped"] == 0 and stats["captured"] == 10 and stats["delivered"] == 10


def test_video_loop(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    _write_video(video, 4)
    with open_source(str(video), SourceConfig(loop=True)) as src:
        names = [f.name for f in itertools.islice(src, 10)]
    assert names == [f"clip.avi#{i % 4}" for i in range(10)]


def test_unopenable_video_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    with pytest.raises(SourceError, match="broken.mp4"):
        with open_source(str(bad)) as src:
            list(src)


# ---------------------------------------------------------------------------------- live sources (real cv2)


def test_missing_camera_is_one_clear_line() -> None:
    t0 = time.monotonic()
    with pytest.raises(SourceError) as info:
        open_source(99, SourceConfig(open_timeout_s=5.0))
    msg = str(info.value)
    assert time.monotonic() - t0 < 5.0
    assert "\n" not in msg
    assert msg.startswith("cannot open camera 99")
    assert "/dev/video" in msg


def test_gstreamer_pipeline_error_is_one_line() -> None:
    with pytest.raises(SourceError) as info:
        open_source(JETSON_CSI, SourceConfig(open_timeout_s=2.0))
    msg = str(info.value)
    assert "\n" not in msg and "GStreamer" in msg and "nvarguscamerasrc" in msg


# ------------------------------------------------------------------------------- live sources (simulated)


class FakeCamera:
    """A camera for ``capture_factory``: each open is a session delivering frames until ``fail_after``.

    Frames are BGR 8x8 images whose blue channel holds a running counter (mod 256).
    """

    def __init__(
        self,
        interval: float = 0.001,
        fail_after: list[int | None] | None = None,
        open_ok: list[bool] | None = None,
        block_first_read: float = 0.0,
    ) -> None:
        self.interval = interval
        self.fail_after = fail_after or [None]  # per session; last value repeats
        self.open_ok = open_ok or [True]
        self.block_first_read = block_first_read
        self.opens = 0
        self.counter = 0
        self.caps: list[_FakeCap] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, value: Any, config: SourceConfig) -> _FakeCap:
        assert kind == "camera"
        with self.lock:
            session = self.opens
            self.opens += 1
        ok = self.open_ok[min(session, len(self.open_ok) - 1)]
        limit = self.fail_after[min(session, len(self.fail_after) - 1)]
        cap = _FakeCap(self, ok, limit)
        self.caps.append(cap)
        return cap


class _FakeCap:
    def __init__(self, cam: FakeCamera, opened: bool, limit: int | None) -> None:
        self.cam, self.opened, self.limit, self.reads, self.released = cam, opened, limit, 0, False

    def isOpened(self) -> bool:  # noqa: N802
        return self.opened and not self.released

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.cam.block_first_read and self.reads == 0:
            time.sleep(self.cam.block_first_read)
        time.sleep(self.cam.interval)
        if self.released or (self.limit is not None and self.reads >= self.limit):
            return False, None
        self.reads += 1
        with self.cam.lock:
            value = self.cam.counter % 256
            self.cam.counter += 1
        img = np.zeros((8, 8, 3), dtype=np.uint8)
        img[:, :, 0] = value  # blue in BGR
        return True, img

    def release(self) -> None:
        self.released = True


def _fast(**kw: Any) -> SourceConfig:
    base: dict[str, Any] = {"reconnect_initial_s": 0.01, "reconnect_max_s": 0.1, "open_timeout_s": 2.0}
    base.update(kw)
    return SourceConfig(**base)


def test_live_drops_old_frames_when_consumer_is_slow() -> None:
    cam = FakeCamera(interval=0.001)
    with open_source(0, _fast(), capture_factory=cam) as src:
        assert src.live
        frames = []
        for frame in itertools.islice(src, 8):
            frames.append(frame)
            time.sleep(0.02)
        stats = src.stats()
    ids = [f.frame_id for f in frames]
    assert len(frames) == 8
    assert all(b > a for a, b in zip(ids, ids[1:]))
    assert any(b - a > 1 for a, b in zip(ids, ids[1:]))  # gaps = drops
    assert stats["dropped"] > 0 and stats["delivered"] == 8
    assert stats["captured"] >= stats["delivered"] + stats["dropped"]
    # BGR -> RGB: the blue counter ends up in the last channel
    assert all(f.image.shape == (8, 8, 3) and f.image[..., 0].max() == 0 for f in frames)
    assert all(f.source == "camera 0" for f in frames)


def test_live_reconnects_after_camera_loss(caplog: pytest.LogCaptureFixture) -> None:
    cam = FakeCamera(interval=0.002, fail_after=[5, None], open_ok=[True, False, True])
    with caplog.at_level(logging.WARNING, logger="gradad.runtime.sources"):
        with open_source(0, _fast(), capture_factory=cam) as src:
            frames = list(itertools.islice(src, 12))
            stats = src.stats()
    assert len(frames) == 12
    ids = [f.frame_id for f in frames]
    assert all(b > a for a, b in zip(ids, ids[1:]))
    assert stats["reconnects"] == 1 and stats["gave_up"] is False
    assert cam.opens == 3  # first open, one failed retry, successful reopen
    assert cam.caps[0].released
    assert any("reconnect" in r.getMessage() for r in caplog.records)


def test_live_gives_up_after_reconnect_attempts(caplog: pytest.LogCaptureFixture) -> None:
    cam = FakeCamera(interval=0.001, fail_after=[3], open_ok=[True, False])
    with caplog.at_level(logging.ERROR, logger="gradad.runtime.sources"):
        src = open_source(0, _fast(reconnect_attempts=2), capture_factory=cam)
        t0 = time.monotonic()
        frames = list(src)  # ends by itself
        assert time.monotonic() - t0 < 3.0
        stats = src.stats()
        src.close()
    assert 1 <= len(frames) <= 3
    assert stats["gave_up"] is True and stats["reconnects"] == 0
    assert cam.opens == 3  # the first open + 2 failed attempts
    assert any("giving up" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_live_without_reconnect_ends_on_loss() -> None:
    cam = FakeCamera(interval=0.001, fail_after=[2])
    with open_source(0, _fast(reconnect=False), capture_factory=cam) as src:
        frames = list(src)
        assert src.stats()["gave_up"] is True
    assert 1 <= len(frames) <= 2 and cam.opens == 1


def test_live_close_stops_thread_and_releases() -> None:
    cam = FakeCamera(interval=0.001)
    src = open_source(0, _fast(), capture_factory=cam)
    assert isinstance(src, FrameSource)
    next(src)
    thread = src._thread  # type: ignore[attr-defined]
    assert thread.is_alive()
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 1.0
    assert not thread.is_alive()
    assert all(cap.released for cap in cam.caps)
    assert src.closed
    with pytest.raises(StopIteration):
        next(src)
    src.close()  # idempotent


def test_live_close_during_reconnect_backoff_is_prompt() -> None:
    cam = FakeCamera(interval=0.001, fail_after=[1], open_ok=[True, False])
    src = open_source(0, _fast(reconnect_initial_s=5.0, reconnect_max_s=5.0), capture_factory=cam)
    next(src)
    time.sleep(0.05)  # the thread is now waiting to retry
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 1.0
    assert not src._thread.is_alive()  # type: ignore[attr-defined]


def test_live_open_failures_raise_from_open_source() -> None:
    with pytest.raises(SourceError, match=r"^cannot open camera 0 \(no device or busy\)"):
        open_source(0, _fast(), capture_factory=FakeCamera(open_ok=[False]))
    with pytest.raises(SourceError, match="delivered no frame"):
        open_source("1", _fast(), capture_factory=FakeCamera(fail_after=[0]))
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="within 0.2s"):
        open_source(0, _fast(open_timeout_s=0.2), capture_factory=FakeCamera(block_first_read=1.0))
    assert time.monotonic() - t0 < 0.9


def test_stream_errors_mask_password() -> None:
    def factory(kind: str, value: Any, config: SourceConfig) -> _FakeCap:
        assert kind == "stream"
        return _FakeCap(FakeCamera(), False, None)

    with pytest.raises(SourceError) as info:
        open_source("rtsp://admin:s3cret@10.0.0.5/stream", _fast(), capture_factory=factory)
    assert "s3cret" not in str(info.value) and "cannot open stream" in str(info.value)


def test_a_bool_is_not_a_camera_index() -> None:
    with pytest.raises(SourceError, match="invalid source: True"):
        parse_source(True)


def test_an_exception_while_opening_is_named_once_and_masked() -> None:
    def raising(kind: str, value: Any, config: SourceConfig) -> _FakeCap:
        raise RuntimeError(f"backend refused {value}")

    with pytest.raises(SourceError) as info:
        open_source(0, _fast(), capture_factory=raising)
    assert str(info.value) == "cannot open camera 0 (RuntimeError: backend refused 0)"
    with pytest.raises(SourceError) as info:
        open_source("rtsp://admin:s3cret@10.0.0.5/stream", _fast(), capture_factory=raising)
    assert "s3cret" not in str(info.value) and "backend refused rtsp://admin:***@10.0.0.5/stream" in str(info.value)


def test_sources_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gradad.runtime.sources\n"
        "bad = [m for m in ('torch', 'timm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interrupt_unblocks_a_consumer_waiting_for_a_lost_camera() -> None:
    """Ctrl-C/SIGTERM while an unplugged camera delivers nothing: interrupt() ends the wait (no kill -9)."""
    cam = FakeCamera(fail_after=[1], open_ok=[True, False])  # one frame, then gone for good
    src = open_source(0, _fast(), capture_factory=cam)
    try:
        assert next(src).frame_id == 0
        timer = threading.Timer(0.3, src.interrupt)
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(StopIteration):
            next(src)
        assert time.perf_counter() - t0 < 2.0
    finally:
        src.close()
    assert src.closed
