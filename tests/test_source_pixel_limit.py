"""Video and stream frames get the still-image pixel limit (gradad.MAX_IMAGE_PIXELS / OPENCV_IO_MAX_IMAGE_PIXELS):
OpenCV caps imread/imdecode but not VideoCapture, so a tiny hostile .mp4 or camera stream could hand over frames of
hundreds of megabytes. A source announcing larger frames is refused at open; a larger decoded frame is skipped."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import gradad
from gradad.data import images
from gradad.runtime.sources import SourceConfig, SourceError, open_source

LIMIT = 64 * 64
SOURCES_LOG = "gradad.runtime.sources"


@pytest.fixture()
def low_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 64x64-pixel limit for the sources. OpenCV read OPENCV_IO_MAX_IMAGE_PIXELS when it loaded, so its own image
    decoder keeps the real cap: only the sources' check sees this one."""
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", str(LIMIT))
    return LIMIT


def _write_video(path: Path, fourcc: str, size: int, n: int = 3) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (size, size))
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build cannot write {fourcc} {path.suffix}")
    for i in range(n):
        writer.write(np.full((size, size, 3), 40 * i, np.uint8))
    writer.release()


# ------------------------------------------------------------------------------------------------ the limit


def test_the_limit_is_the_decode_cap_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(images.PIXEL_LIMIT_ENV, "4096")
    assert images.pixel_cap() == 4096
    monkeypatch.setenv(images.PIXEL_LIMIT_ENV, "2MB")  # OpenCV's own suffixes
    assert images.pixel_cap() == 2 * 1024 * 1024
    monkeypatch.delenv(images.PIXEL_LIMIT_ENV)
    assert images.pixel_cap() == gradad.MAX_IMAGE_PIXELS == 100_000_000
    monkeypatch.setattr(gradad, "MAX_IMAGE_PIXELS", 1234)
    assert images.pixel_cap() == 1234


# ------------------------------------------------------------------------------------------ real video files


@pytest.mark.parametrize(("name", "fourcc"), [("big.mp4", "mp4v"), ("big.mkv", "MJPG"), ("big.avi", "MJPG")])
def test_a_video_announcing_frames_over_the_limit_is_refused_at_open(
    tmp_path: Path, low_limit: int, name: str, fourcc: str
) -> None:
    video = tmp_path / name
    _write_video(video, fourcc, 128)
    with pytest.raises(SourceError) as info:
        open_source(str(video))
    msg = str(info.value)
    assert msg == (f"refusing video file {video}: it announces 128x128 frames (16384 pixels), over the limit of "
                   f"4096 pixels a frame (set OPENCV_IO_MAX_IMAGE_PIXELS higher before starting to allow larger "
                   f"frames)")


@pytest.mark.parametrize(("name", "fourcc"), [("small.mp4", "mp4v"), ("small.mkv", "MJPG")])
def test_a_video_under_the_limit_still_yields_its_frames(
    tmp_path: Path, low_limit: int, name: str, fourcc: str
) -> None:
    video = tmp_path / name
    _write_video(video, fourcc, 32)
    with open_source(str(video)) as src:
        frames = list(src)
        stats = src.stats()
    assert [f.image.shape for f in frames] == [(32, 32, 3)] * 3
    assert stats["delivered"] == 3 and stats["skipped"] == 0


# ---------------------------------------------------------------- frames growing mid-way (simulated captures)


class _SizedCapture:
    """A capture whose frames have the sizes in ``sizes`` (then it ends, or repeats the last with ``forever``);
    ``announce``: the frame size it reports through get() (None: it does not say)."""

    def __init__(self, sizes: list[int], announce: int | None, forever: bool = False) -> None:
        self.sizes, self.announce, self.forever, self.n, self.released = sizes, announce, forever, 0, False

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return not self.released

    def get(self, prop: int) -> float:
        if prop in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT) and self.announce is not None:
            return float(self.announce)
        if prop == cv2.CAP_PROP_FRAME_COUNT and not self.forever:
            return float(len(self.sizes))
        return -1.0

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.forever:
            time.sleep(0.001)
        if self.released or (self.n >= len(self.sizes) and not self.forever):
            return False, None
        size = self.sizes[min(self.n, len(self.sizes) - 1)]
        self.n += 1
        return True, np.full((size, size, 3), self.n % 256, np.uint8)

    def release(self) -> None:
        self.released = True


@pytest.mark.parametrize("prefetch", [0, 2])
def test_video_frames_over_the_limit_are_skipped_counted_and_logged_once(
    tmp_path: Path, low_limit: int, prefetch: int, caplog: pytest.LogCaptureFixture
) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"read by the fake capture")
    caps: list[_SizedCapture] = []

    def factory(kind: str, value: Any, config: SourceConfig) -> _SizedCapture:
        caps.append(_SizedCapture([16, 128, 16, 128, 16], announce=16))
        return caps[-1]

    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        with open_source(str(video), SourceConfig(prefetch=prefetch), capture_factory=factory) as src:
            frames = list(src)
            stats = src.stats()
    assert [f.name for f in frames] == ["clip.mp4#0", "clip.mp4#2", "clip.mp4#4"]  # names keep the file's index
    assert all(f.image.shape == (16, 16, 3) for f in frames)
    assert stats["skipped"] == 2 and stats["captured"] == 3
    warned = [r.getMessage() for r in caplog.records if "over the limit" in r.getMessage()]
    assert len(warned) == 1 and "128x128" in warned[0] and str(video) in warned[0]
    assert caps[0].released


def test_a_video_of_only_frames_over_the_limit_says_so(tmp_path: Path, low_limit: int) -> None:
    video = tmp_path / "clip.mkv"
    video.write_bytes(b"read by the fake capture")
    factory = lambda kind, value, config: _SizedCapture([128, 128], announce=None)  # noqa: E731
    with pytest.raises(SourceError, match=r"^refusing video file .*clip\.mkv: it sends 128x128 frames .*4096"):
        with open_source(str(video), capture_factory=factory) as src:
            list(src)


def _live(**kw: Any) -> SourceConfig:
    base: dict[str, Any] = {"reconnect_initial_s": 0.01, "reconnect_max_s": 0.1, "open_timeout_s": 2.0}
    return SourceConfig(**{**base, **kw})


def test_a_camera_announcing_frames_over_the_limit_is_refused_at_open(low_limit: int) -> None:
    cap = _SizedCapture([16], announce=128, forever=True)
    with pytest.raises(SourceError) as info:
        open_source(0, _live(), capture_factory=lambda kind, value, config: cap)
    assert str(info.value).startswith("refusing camera 0: it announces 128x128 frames (16384 pixels), over the "
                                      "limit of 4096 pixels")
    assert cap.n == 0 and cap.released  # not one frame read


def test_a_stream_sending_only_frames_over_the_limit_is_refused_at_open(low_limit: int) -> None:
    factory = lambda kind, value, config: _SizedCapture([128], announce=None, forever=True)  # noqa: E731
    with pytest.raises(SourceError) as info:
        open_source("rtsp://user:pw@10.0.0.5/live", _live(), capture_factory=factory)
    msg = str(info.value)
    assert msg.startswith("refusing rtsp://user:***@10.0.0.5/live: it sends 128x128 frames") and "pw@" not in msg


def test_live_frames_over_the_limit_are_passed_over_on_the_same_connection(low_limit: int) -> None:
    opens: list[_SizedCapture] = []

    def factory(kind: str, value: Any, config: SourceConfig) -> _SizedCapture:
        opens.append(_SizedCapture([16, 128, 128] * 50, announce=16))
        return opens[-1]

    with open_source(0, _live(reconnect=False), capture_factory=factory) as src:
        shapes = [f.image.shape for f in src]  # 150 reads, then the fake camera is gone
        stats = src.stats()
    assert shapes and set(shapes) == {(16, 16, 3)}
    assert stats["skipped"] >= 90 and stats["outages"] >= 1  # the end of the fake's frames is the only loss
    assert opens[0].n == 150  # read on past the large frames, never reconnected for them


def test_a_camera_that_switches_to_frames_over_the_limit_is_lost_and_reconnects_are_refused(
    low_limit: int, caplog: pytest.LogCaptureFixture
) -> None:
    opens: list[_SizedCapture] = []

    def factory(kind: str, value: Any, config: SourceConfig) -> _SizedCapture:
        opens.append(_SizedCapture([16, 16, 16, 128], announce=16 if not opens else 128, forever=True))
        return opens[-1]

    with caplog.at_level(logging.INFO, logger=SOURCES_LOG):
        with open_source(0, _live(read_failures=3, reconnect_attempts=2), capture_factory=factory) as src:
            frames = list(itertools.islice(src, 50))  # bounded: without the limit the camera never ends
            stats = src.stats()
    assert 1 <= len(frames) <= 3 and all(f.image.shape == (16, 16, 3) for f in frames)
    assert stats["gave_up"] and len(opens) == 3 and all(cap.released for cap in opens)
    assert any("refusing camera 0: it announces 128x128 frames" in r.getMessage() for r in caplog.records)
