"""Damaged video files keep each frame's index in the file as its name; unreadable frames and skipped folder files
are reported (runtime/sources.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from gradad.runtime.sources import SourceConfig, open_source

N = 32
LOGGER = "gradad.runtime.sources"


def _grey(i: int) -> float:
    return 40.0 + 5.0 * i  # frame i's marker: its mean grey level


def _write(path: Path, fourcc: str, n: int = N) -> None:
    """n distinct 64x48 frames; noise around the marker makes JPEG frames ~1.5 KB so a damaged span covers a few."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        noise = rng.integers(-30, 31, (48, 64, 3))
        writer.write(np.clip(_grey(i) + noise, 0, 255).astype(np.uint8))
    writer.release()


def _zero(path: Path, at: float, nbytes: int) -> None:
    """Overwrite ``nbytes`` at ``at`` (a fraction of the size) with zeros, as a bad disk sector would."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + nbytes] = bytes(nbytes)
    path.write_bytes(bytes(data))


def _read(path: Path, **cfg: Any) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """(index in the name, index read back from the content) of every frame, and the source's stats."""
    with open_source(str(path), SourceConfig(**cfg)) as src:
        frames = [(int(f.name.rsplit("#", 1)[1]), round((float(f.image.mean()) - 40.0) / 5.0)) for f in src]
        return frames, src.stats()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_names_after_a_zeroed_span_in_an_mjpg_avi_are_the_file_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, prefetch: int
) -> None:
    video = tmp_path / "line.avi"
    _write(video, "MJPG")
    _zero(video, 1 / 3, 6000)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        frames, stats = _read(video, prefetch=prefetch)
    names = [i for i, _ in frames]
    missing = sorted(set(range(N)) - set(names))
    assert 3 <= len(missing) <= 8 and missing == list(range(missing[0], missing[-1] + 1))  # one span in the middle
    assert 0 < missing[0] and missing[-1] < N - 1
    assert frames == [(i, i) for i in names]  # every name, before and after the span, is the frame's true index
    assert names[-1] == N - 1
    assert stats["skipped"] == len(missing) and stats["delivered"] == N - len(missing)
    text = caplog.text
    assert f"{len(missing)} of {N} frames unreadable (#{missing[0]}-#{missing[-1]}" in text
    assert "the rest is missing" not in text


def test_a_clean_video_is_named_0_to_n_minus_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name, fourcc in (("clean.avi", "MJPG"), ("clean.mp4", "mp4v")):
        video = tmp_path / name
        _write(video, fourcc)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            frames, stats = _read(video)
        assert frames == [(i, i) for i in range(N)], name
        assert stats["skipped"] == 0 and stats["delivered"] == N
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_truncated_avi_still_says_the_rest_is_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    video = tmp_path / "cut.avi"
    _write(video, "MJPG")
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        frames, _ = _read(video)
    n = len(frames)
    assert 0 < n < N and frames == [(i, i) for i in range(n)]
    assert f"ended after {n} of the {N} frames its container announces (truncated or corrupt): the rest is " \
           "missing" in caplog.text
    assert "unreadable" not in caplog.text


# ------------------------------------------------------------------------------------ captures without positions


class _Cap:
    """A video capture without get(): frames 0..n-1 (blue = index); ``fail`` ones cannot be decoded."""

    def __init__(self, n: int, fail: set[int], positions: str | None = None) -> None:
        self.n, self.fail, self.next, self.positions = n, fail, 0, positions

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        i = self.next
        if i >= self.n:
            return False, None
        self.next += 1
        if i in self.fail:
            return False, None
        return True, np.full((4, 4, 3), i, dtype=np.uint8)

    def release(self) -> None:
        pass


class _PosCap(_Cap):
    """With get(): CAP_PROP_POS_FRAMES after a read is the next frame's index (``positions="index"``, an
    index-based reader) or always 0 (``"zero"``, a backend that does not know)."""

    backend = "CV_MJPEG"  # OpenCV's index-based AVI reader: the only backend whose positions are trusted

    def getBackendName(self) -> str:  # noqa: N802 - OpenCV's name
        return self.backend

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FRAME_COUNT:
            return float(self.n)
        return float(self.next) if self.positions == "index" else 0.0


def _names(cap: _Cap, path: Path) -> list[tuple[str, int]]:
    with open_source(str(path), capture_factory=lambda kind, value, config: cap) as src:
        return [(f.name, int(f.image[0, 0, 2])) for f in src]


def test_an_index_reader_steps_over_damaged_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "x.avi"
    path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = _names(_PosCap(10, {0, 3, 4, 9}, "index"), path)
    assert got == [(f"x.avi#{i}", i) for i in (1, 2, 5, 6, 7, 8)]
    assert "4 of 10 frames unreadable (#0, #3-#4, #9" in caplog.text and "the rest is missing" not in caplog.text


@pytest.mark.parametrize("positions", [None, "zero"])
def test_without_usable_positions_names_count_decoded_frames(tmp_path: Path, positions: str | None) -> None:
    path = tmp_path / "x.avi"
    path.write_bytes(b"")
    kind = _Cap if positions is None else _PosCap
    assert _names(kind(5, set(), positions), path) == [(f"x.avi#{i}", i) for i in range(5)]
    # past a damaged frame, reading goes on while the container announces more frames (no frame count: it ends);
    # names count decoded frames, so those after the damage are early by one
    after_damage = ["x.avi#0", "x.avi#1"] + (["x.avi#2", "x.avi#3"] if positions else [])
    assert [n for n, _ in _names(kind(5, {2}, positions), path)] == after_damage


def test_positions_of_other_backends_are_not_taken_for_file_indices(tmp_path: Path) -> None:
    """FFmpeg, GStreamer or MSMF positions may count decoded frames or come from timestamps: names count decoded
    frames there (a damaged frame is passed over while the container announces more frames)."""
    path = tmp_path / "x.avi"
    path.write_bytes(b"")
    cap = _PosCap(10, {3}, "index")
    cap.backend = "GSTREAMER"
    assert [n for n, _ in _names(cap, path)] == [f"x.avi#{i}" for i in range(9)]


# ------------------------------------------------------------------------------------------------ image folders


def test_folder_logs_files_it_does_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img = np.full((8, 8, 3), 100, dtype=np.uint8)
    for name in ("a.png", "c.jpg"):
        assert cv2.imwrite(str(tmp_path / name), img)
    assert cv2.imwrite(str(tmp_path / "b.webp"), img)  # OpenCV reads it; not a known type here
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "README").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"x")  # hidden: passed over by design, not counted
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with open_source(str(tmp_path)) as src:
            names = [f.name for f in src]
            stats = src.stats()
    assert names == ["a.png", "c.jpg"]  # which files are read is unchanged
    assert stats["ignored"] == 3 and stats["skipped"] == 0
    lines = [r.getMessage() for r in caplog.records if "not images of a known type" in r.getMessage()]
    assert len(lines) == 1
    assert "ignored 3 file(s) that are not images of a known type ((no extension), .txt, .webp" in lines[0]

    with caplog.at_level(logging.INFO, logger=LOGGER), open_source(str(tmp_path / "*")) as src:
        assert [f.name for f in src] == ["a.png", "c.jpg"] and src.stats()["ignored"] == 3


def test_folder_of_known_images_logs_nothing_extra(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    with caplog.at_level(logging.INFO, logger=LOGGER), open_source(str(tmp_path)) as src:
        list(src)
        assert src.stats()["ignored"] == 0
    assert "not images of a known type" not in caplog.text
