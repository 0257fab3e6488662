"""FlaggedFrameSink on a disk that fills up: the oldest frames make room, no half-written frame stays."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

import gradad.runtime.sinks.flagged as flagged
from gradad.runtime.sinks import FlaggedFrameSink
from test_sinks import make_result

_SUFFIXES = ("_orig.png", "_overlay.jpg", "_map.npy", "_map.png")


def _frames(folder: Path) -> dict[str, set[str]]:
    """Own frame files directly in ``folder``: key -> the suffixes present."""
    out: dict[str, set[str]] = {}
    for p in folder.iterdir():
        for s in _SUFFIXES:
            if p.is_file() and p.name[:8].isdigit() and p.name.endswith(s):
                out.setdefault(p.name[: -len(s)], set()).add(s)
    return out


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


class _SmallDisk:
    """Replaces the sink's atomic write: fails like a full disk when the folder would hold more than ``capacity``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path, capacity: int, err: int = errno.ENOSPC) -> None:
        self.folder, self.capacity, self.err = folder, capacity, err
        self.refusals = 0
        self.refusals_with_partial_frame = 0  # refused after some of the same frame's files were written
        real = flagged.atomic_write_bytes

        def write(path: Path, data: bytes, fsync: bool = False) -> None:
            path = Path(path)
            used = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file() and p != path)
            if used + len(data) > self.capacity:
                self.refusals += 1
                key = next((path.name[: -len(s)] for s in _SUFFIXES if path.name.endswith(s)), None)
                self.refusals_with_partial_frame += bool(key and _frames(self.folder).get(key))
                raise OSError(self.err, "simulated full disk", str(path))
            real(path, data, fsync)

        monkeypatch.setattr(flagged, "atomic_write_bytes", write)


def _one_frame_bytes(tmp_path: Path) -> tuple[int, int]:
    """The size of one saved frame, and of its first file (orig.png): a disk with room for a bit more than that
    is full in the middle of the next frame."""
    probe = FlaggedFrameSink(tmp_path / "probe")
    probe.write(make_result(0, True))
    probe.close()
    (files,) = probe._index.values()
    return probe.total_bytes, files["orig.png"]


def _sink_with_frame_0(tmp_path: Path) -> tuple[int, Path, FlaggedFrameSink]:
    """(one frame's size, the folder, a sink that saved frame 0 there)."""
    one, _ = _one_frame_bytes(tmp_path)
    folder = tmp_path / "flagged"
    sink = FlaggedFrameSink(folder)
    sink.write(make_result(0, True))
    return one, folder, sink


def _assert_index_matches_disk(sink: FlaggedFrameSink, folder: Path) -> None:
    frames = _frames(folder)
    assert all(kinds == set(_SUFFIXES) for kinds in frames.values()), frames  # only complete frames
    assert sink.frames_on_disk == len(frames)
    assert sink.total_bytes == sum((folder / f"{k}{s}").stat().st_size for k in frames for s in _SUFFIXES)
    assert _temporaries(folder) == []


@pytest.mark.parametrize("err", sorted(flagged._DISK_FULL), ids=lambda e: errno.errorcode[e])
def test_flagged_full_disk_evicts_oldest_and_keeps_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         err: int) -> None:
    one, orig = _one_frame_bytes(tmp_path)
    folder = tmp_path / "flagged"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(b"not ours: never evicted")
    disk = _SmallDisk(monkeypatch, folder, capacity=2 * one + orig + 200, err=err)
    sink = FlaggedFrameSink(folder)  # default 1 GB budget: only the disk limits it
    for i in range(6):
        sink.write(make_result(i, True))
        _assert_index_matches_disk(sink, folder)
    sink.close()
    assert disk.refusals >= 4 and disk.refusals_with_partial_frame >= 1  # half-written frames did occur
    assert sink.saved == 6 and sink.errors == 0 and sink.skipped == 0
    assert set(_frames(folder)) == {"00000004_cam0", "00000005_cam0"}  # the newest survive, not the oldest
    assert sink.evicted == 4 and sink.frames_on_disk == 2
    assert (folder / "notes.txt").read_bytes() == b"not ours: never evicted"


def test_flagged_full_disk_evicts_an_earlier_run_s_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, orig = _one_frame_bytes(tmp_path)
    folder = tmp_path / "flagged"
    first = FlaggedFrameSink(folder)
    for i in range(3):
        first.write(make_result(i, True))
    first.close()
    _SmallDisk(monkeypatch, folder, capacity=int(one * 3.5))
    again = FlaggedFrameSink(folder)
    again.write(make_result(0, True))  # ids restart: a "-2" name, and the disk holds 3 frames
    again.write(make_result(1, True))
    again.close()
    assert set(_frames(folder)) == {"00000002_cam0", "00000000_cam0-2", "00000001_cam0-2"}  # the oldest went
    assert again.saved == 2 and again.evicted == 2 and again.errors == 0
    _assert_index_matches_disk(again, folder)


def test_flagged_full_disk_with_nothing_to_evict_loses_the_frame_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    one, orig = _one_frame_bytes(tmp_path)
    folder = tmp_path / "flagged"
    folder.mkdir()
    disk = _SmallDisk(monkeypatch, folder, capacity=orig + 200)  # a single frame is larger than the "disk"
    sink = FlaggedFrameSink(folder)
    with caplog.at_level(logging.WARNING, logger="gradad.runtime.sinks"):
        for i in range(4):
            sink.write(make_result(i, True))
    assert disk.refusals_with_partial_frame >= 1  # some files of each frame fit before the disk was full
    assert sink.errors == 4 and sink.saved == 0 and sink.evicted == 0
    assert _frames(folder) == {} and _temporaries(folder) == [] and sink.total_bytes == 0
    lost = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1 and str(folder) in lost[0].getMessage()  # one line for the streak, not one per frame

    caplog.clear()
    disk.capacity = one * 10  # space freed: frames are saved again, and that is said once
    with caplog.at_level(logging.WARNING, logger="gradad.runtime.sinks"):
        sink.write(make_result(4, True))
        sink.write(make_result(5, True))
    sink.close()
    assert sink.saved == 2 and sink.errors == 4 and set(_frames(folder)) == {"00000004_cam0", "00000005_cam0"}
    assert [r.getMessage() for r in caplog.records] == [
        f"flagged-frame folder {folder}: saving again after 4 frames lost to a full disk"]
    _assert_index_matches_disk(sink, folder)


def test_flagged_full_disk_keeps_foreign_files_and_loses_the_frame_when_only_they_remain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, folder, sink = _sink_with_frame_0(tmp_path)
    (folder / "other.bin").write_bytes(b"x" * int(one * 1.5))  # someone else's file fills the disk
    _SmallDisk(monkeypatch, folder, capacity=int(one * 2.2))
    sink.write(make_result(1, True))  # frame 0 is evicted, then frame 1 still does not fit
    sink.close()
    assert sink.evicted == 1 and sink.errors == 1 and sink.saved == 1
    assert _frames(folder) == {} and (folder / "other.bin").stat().st_size == int(one * 1.5)
    _assert_index_matches_disk(sink, folder)


def test_flagged_other_write_errors_do_not_evict_and_leave_no_partial_frame(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "flagged"
    sink = FlaggedFrameSink(folder)
    sink.write(make_result(0, True))
    real = flagged.atomic_write_bytes

    def write(path: Path, data: bytes, fsync: bool = False) -> None:
        if str(path).endswith("_map.npy"):  # orig and overlay are written first
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, data, fsync)

    monkeypatch.setattr(flagged, "atomic_write_bytes", write)
    with caplog.at_level(logging.WARNING, logger="gradad.runtime.sinks"):
        sink.write(make_result(1, True))
        sink.write(make_result(2, True))
    sink.close()
    assert sink.errors == 2 and sink.evicted == 0 and sink.saved == 1  # no eviction: it would not help
    assert set(_frames(folder)) == {"00000000_cam0"}
    # one line per streak of failures (a camera loop would log every NG frame), not one per frame
    assert [r.getMessage() for r in caplog.records] == [
        f"flagged-frame folder {folder}: NG frames are not saved (frame 1: Permission denied) (logged again at most "
        f"every 60 s while it lasts; the run goes on)"]
    _assert_index_matches_disk(sink, folder)


def test_flagged_frame_written_again_on_a_full_disk_leaves_no_stale_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, folder, sink = _sink_with_frame_0(tmp_path)
    disk = _SmallDisk(monkeypatch, folder, capacity=one // 2)
    sink.write(make_result(0, True, score=1.9))  # the same frame again (e.g. refined); nothing else to evict
    sink.close()
    assert disk.refusals >= 1 and sink.errors == 1 and sink.saved == 1
    assert _frames(folder) == {}  # neither a mix of old and new files nor unindexed old ones
    _assert_index_matches_disk(sink, folder)


def test_a_refined_mask_on_a_full_disk_evicts_an_older_frame_not_its_own(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    one, _ = _one_frame_bytes(tmp_path)
    folder = tmp_path / "flagged"
    folder.mkdir()
    disk = _SmallDisk(monkeypatch, folder, capacity=10 * one)
    sink = FlaggedFrameSink(folder)
    sink.write(make_result(0, True, seed=1))
    sink.write(make_result(1, True, seed=2))
    assert sink.frames_on_disk == 2 and sink.evicted == 0
    disk.capacity = sink.total_bytes + 10  # now full: no refined file fits beside both frames
    mask = np.zeros((16, 16), bool)
    mask[3:9, 2:7] = True
    saved = sink.write_refined(1, None, make_result(1, True).frame.source, mask)
    assert disk.refusals >= 1 and saved["mask_file"] is not None and Path(saved["mask_file"]).is_file()
    assert sink.evicted == 1 and sink.errors == 0 and sink.frames_on_disk == 1
    assert sorted(_frames(folder)) == [Path(saved["mask_file"]).name[: -len("_refined_mask.png")]]
    assert _temporaries(folder) == []
    # its own frame is never evicted for its refined file: with nothing older left, the write fails and counts
    disk.capacity = sink.total_bytes + 10
    noisy = np.random.default_rng(0).random((16, 16)) > 0.5  # a larger PNG than the first mask
    saved = sink.write_refined(1, None, make_result(1, True).frame.source, noisy)
    sink.close()
    assert saved["mask_file"] is None and (sink.errors, sink.refined_failed) == (0, 1)  # a mask, not a lost frame
    assert sink.frames_on_disk == 1 and sink.evicted == 1 and _temporaries(folder) == []


def test_a_disk_filled_by_someone_else_does_not_cost_the_whole_archive(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """When evicting does not make room (another writer, deleted files held open), the sink stops after freeing
    twice the frame's size: the frame is lost, the archive is not."""
    folder = tmp_path / "flagged"
    sink = FlaggedFrameSink(folder)
    for i in range(20):
        sink.write(make_result(i, True, seed=i))

    def always_full(path: Path, data: bytes, fsync: bool = False) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(flagged, "atomic_write_bytes", always_full)
    sink.write(make_result(20, True, seed=20))
    assert sink.errors == 1 and 1 <= sink.evicted <= 3 and sink.frames_on_disk == 20 - sink.evicted
    _assert_index_matches_disk(sink, folder)
