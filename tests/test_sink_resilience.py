"""Sinks on a production line whose outputs are tampered with or too slow: a JSONL file or flagged folder deleted
mid-run, a read-only flagged folder, 12 MP frames whose encoding must not delay the verdicts, degenerate 1-pixel
frames, and the run summary that says what the record of truth lacks."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import gradad.runtime.sinks.flagged as flagged
import gradad.runtime.sinks.video as video
from gradad.errors import GradError
from gradad.runtime.cli import main as run_main
from gradad.runtime.sinks import FlaggedFrameSink, JsonlSink, MultiSink, VideoSink
from gradad.runtime.sinks.background import BackgroundWriter
from gradad.runtime.sinks.base import SinkBase
from test_sinks import make_result

SINKS_LOG = "gradad.runtime.sinks"


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SINKS_LOG and r.levelno == level]


def _frame_ids(path: Path) -> list[int]:
    return [json.loads(line)["frame_id"] for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# 1. JSONL: a file deleted or moved during the run


def test_jsonl_deleted_with_its_folder_is_created_again_and_the_loss_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "out" / "run.jsonl"
    sink = JsonlSink(path)
    with caplog.at_level(logging.WARNING, logger=SINKS_LOG):
        for i in range(3):
            sink.write(make_result(i, False))
        shutil.rmtree(path.parent)  # an operator's clean-up
        for i in range(3, 5):
            sink.write(make_result(i, False))
        sink.close()
    # checked before every line: frames 0-2 went with the file, none is written twice
    assert _frame_ids(path) == [3, 4]
    assert sink.delivery_report() == {"jsonl": {"target": str(path), "written": 5, "reopened": 1,
                                                "records_lost": 3, "complete": False}}
    (warning,) = _messages(caplog, logging.WARNING)
    assert str(path) in warning and "deleted" in warning and "3 line(s)" in warning


def test_jsonl_deleted_after_the_last_line_is_counted_at_close(tmp_path: Path) -> None:
    path = tmp_path / "out" / "run.jsonl"
    sink = JsonlSink(path)
    for i in range(4):
        sink.write(make_result(i, False))
    shutil.rmtree(path.parent)
    sink.close()
    assert path.is_file() and _frame_ids(path) == []
    assert sink.delivery_report()["jsonl"]["records_lost"] == 4
    assert sink.delivery_report()["jsonl"]["reopened"] == 1


def test_jsonl_moved_away_by_log_rotation_goes_on_in_a_new_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path)
    sink.write(make_result(0, False))
    path.rename(tmp_path / "run.jsonl.1")
    sink.write(make_result(1, False))
    sink.close()
    assert _frame_ids(tmp_path / "run.jsonl.1") == [0] and _frame_ids(path) == [1]  # nothing twice, nothing lost
    assert sink.delivery_report()["jsonl"]["complete"]


def test_jsonl_that_cannot_be_created_again_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out" / "run.jsonl"
    sink = JsonlSink(path)
    sink.write(make_result(0, False))
    shutil.rmtree(path.parent)
    path.parent.write_text("a file where the folder was")
    with pytest.raises(GradError, match=r"run\.jsonl was deleted during the run and cannot be created again"):
        sink.write(make_result(1, False))
    sink.close()


# ---------------------------------------------------------------------------------------------------------------
# 2./3. the flagged folder: deleted mid-run, not writable


def test_flagged_folder_deleted_mid_run_is_created_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "out" / "ng"
    sink = FlaggedFrameSink(folder)
    with caplog.at_level(logging.WARNING, logger=SINKS_LOG):
        sink.write(make_result(0, True))
        shutil.rmtree(folder.parent)
        for i in range(1, 4):
            sink.write(make_result(i, True))
        sink.close()
    assert sorted(p.name[:8] for p in folder.glob("*_orig.png")) == ["00000001", "00000002", "00000003"]
    assert sink.frames_on_disk == 3 and sink.total_bytes == sum(p.stat().st_size for p in folder.iterdir())
    report = sink.delivery_report()["flagged_folder"]
    assert (report["saved"], report["deleted"], report["failed"], report["records_lost"]) == (4, 1, 0, 1)
    assert not report["complete"]
    (warning,) = _messages(caplog, logging.WARNING)
    assert "was removed during the run, with 1 frame(s)" in warning and "created it again" in warning


def test_flagged_folder_that_cannot_be_created_again_logs_once_per_outage(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "out" / "ng"
    sink = FlaggedFrameSink(folder)
    with caplog.at_level(logging.INFO, logger=SINKS_LOG):
        shutil.rmtree(folder.parent)
        folder.parent.write_text("a file where the folder was")
        for i in range(5):
            sink.write(make_result(i, True))
        assert len(_messages(caplog, logging.WARNING)) == 1  # not one per NG frame
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        folder.parent.unlink()
        sink.write(make_result(5, True))
        sink.close()
    assert sink.errors == 5 and sink.saved == 1 and (folder / "00000005_cam0_orig.png").is_file()
    assert any("saving again" in m and "5 frames lost" in m for m in _messages(caplog, logging.INFO))
    assert sink.delivery_report()["flagged_folder"]["records_lost"] == 5


def test_flagged_folder_that_takes_no_file_is_refused_at_start(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(path: Path, data: bytes, fsync: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(flagged, "atomic_write_bytes", read_only)
    with pytest.raises(GradError, match=r"flagged-frame folder .*ng: cannot write there \(Read-only file system\)"):
        FlaggedFrameSink(tmp_path / "ng")


def test_a_failed_frame_warns_about_no_file_it_never_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    sink = FlaggedFrameSink(tmp_path / "ng")

    def refused(path: Path, data: bytes, fsync: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def remove(path: str | os.PathLike[str]) -> None:  # a read-only file system refuses even a missing file
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(flagged, "atomic_write_bytes", refused)
    monkeypatch.setattr(os, "remove", remove)
    with caplog.at_level(logging.WARNING, logger=SINKS_LOG):
        sink.write(make_result(0, True))
        sink.write(make_result(1, True))
    monkeypatch.undo()
    sink.close()
    assert not any("cannot delete" in m for m in _messages(caplog, logging.WARNING))
    assert len(_messages(caplog, logging.WARNING)) == 1 and sink.errors == 2


# ---------------------------------------------------------------------------------------------------------------
# 4. slow file sinks on threads of their own


class _Gate:
    """Wraps a function so that its calls wait until :meth:`open` (``entered`` is set by the first)."""

    def __init__(self, func) -> None:
        self.func, self.entered, self.opened, self.calls = func, threading.Event(), threading.Event(), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        assert self.opened.wait(10)
        return self.func(*args, **kwargs)

    def open(self) -> None:
        self.opened.set()


def test_a_slow_flagged_folder_never_delays_write_and_drops_when_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    gate = _Gate(FlaggedFrameSink._save)
    monkeypatch.setattr(FlaggedFrameSink, "_save", lambda self, result, *key: gate(self, result, *key))
    sink = FlaggedFrameSink(tmp_path / "ng", queue_size=2)
    with caplog.at_level(logging.WARNING, logger=SINKS_LOG):
        sink.write(make_result(0, True))
        assert gate.entered.wait(5)  # the writer thread holds frame 0
        started = time.perf_counter()
        for i in range(1, 6):
            sink.write(make_result(i, True))  # 1 and 2 queued, 3-5 dropped
        assert time.perf_counter() - started < 0.5
        gate.open()
        sink.close()  # writes every queued frame
    assert (sink.saved, sink.dropped) == (3, 3)
    assert sorted(p.name[:8] for p in (tmp_path / "ng").glob("*_orig.png")) == ["00000000", "00000001", "00000002"]
    report = sink.delivery_report()["flagged_folder"]
    assert report["dropped"] == 3 and report["records_lost"] == 3 and not report["complete"]
    (warning,) = _messages(caplog, logging.WARNING)
    assert "dropping new ones" in warning


def test_a_refined_mask_never_waits_for_its_queued_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refined write goes on the writer's FIFO after its frame: the verdict thread gets the file names at once
    (the old code waited up to 10 s for the frame, on the verdict thread)."""
    gate = _Gate(FlaggedFrameSink._save)
    monkeypatch.setattr(FlaggedFrameSink, "_save", lambda self, result, *key: gate(self, result, *key))
    sink = FlaggedFrameSink(tmp_path / "ng", queue_size=2)
    sink.write(make_result(7, True))
    assert gate.entered.wait(5)  # the writer thread holds frame 7
    got: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: got.update(sink.write_refined(
        7, None, "cam0", np.ones((16, 16), np.uint8), np.zeros((16, 16, 3), np.uint8))), daemon=True)
    caller.start()
    caller.join(3.0)  # the frame is still held: old code waited for it (10 s) on the verdict thread
    returned = not caller.is_alive()
    gate.open()
    caller.join(15)
    sink.close()
    files = got
    assert returned
    assert files == {"mask_file": str(tmp_path / "ng" / "00000007_cam0_refined_mask.png"),
                     "repaired_file": str(tmp_path / "ng" / "00000007_cam0_repaired.png")}
    assert Path(files["mask_file"]).is_file() and Path(files["repaired_file"]).is_file()
    assert (sink.refined_failed, sink.refined_skipped) == (0, 0)


def test_video_and_flagged_overlay_draw_a_frame_once_and_the_video_is_capped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[int, int]] = []
    real = video.annotate_frame

    def counting(result, image_rgb=None, alpha=0.5):
        out = real(result, image_rgb, alpha)
        drawn.append(out.shape[:2])
        return out

    monkeypatch.setattr(video, "annotate_frame", counting)
    hw = (120, 160)
    vid = VideoSink(tmp_path / "v.avi", fps=5.0, segment_s=0, max_side=80, queue_size=4)
    ng = FlaggedFrameSink(tmp_path / "ng", overlay_max_side=80, queue_size=4)
    sink = MultiSink([vid, ng])
    for i in range(3):
        sink.write(make_result(i, True, hw=hw))
    sink.close()
    assert drawn == [(60, 80)] * 3  # once per frame, at the capped size
    orig = cv2.imread(str(tmp_path / "ng" / "00000000_cam0_orig.png"))
    assert orig.shape[:2] == hw  # the evidence keeps its full size
    cap = cv2.VideoCapture(str(tmp_path / "v.avi"))
    try:
        ok, frame = cap.read()
    finally:
        cap.release()
    assert ok and frame.shape[:2] == (60, 80) and vid.report()["complete"] and vid.report()["dropped"] == 0


def _video_with_a_held_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue_size: int):
    """A full-size VideoSink whose writer holds frame 0 (until ``gate.open()``) while frames 1-3 are written."""
    gate = _Gate(video.capped_overlay)
    monkeypatch.setattr(video, "capped_overlay", gate)
    vid = VideoSink(tmp_path / "v.avi", fps=5.0, segment_s=0, max_side=0, queue_size=queue_size)
    vid.write(make_result(0, True))
    assert gate.entered.wait(5)
    for i in range(1, 4):
        vid.write(make_result(i, True))
    return vid, gate


def test_video_max_side_0_keeps_the_full_size_and_a_slow_video_drops(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    vid, gate = _video_with_a_held_frame(tmp_path, monkeypatch, queue_size=1)  # frames 1 queued, 2 and 3 dropped
    gate.open()
    vid.close()
    report = vid.report()
    assert report["frames"] == 2 and report["dropped"] == 2 and not report["complete"]
    assert vid.size == (64, 48)


def test_video_frames_left_at_a_signals_deadline_are_not_blamed_on_the_camera(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vid, gate = _video_with_a_held_frame(tmp_path, monkeypatch, queue_size=4)  # 1-3 queued, none dropped
    vid.limit_drain(0.0)  # a stop signal with no drain time left
    gate.open()
    vid.close()
    report = vid.report()
    assert report["dropped"] == 3 and vid.dropped_at_stop == 3 and not report["complete"]
    assert any("stopped by a signal" in p for p in report["problems"])
    assert not any("did not keep up" in p for p in report["problems"])


# ---------------------------------------------------------------------------------------------------------------
# 5. one-pixel, one-row and one-column frames


@pytest.mark.parametrize("hw", [(1, 1), (1, 9), (9, 1)])
def test_a_one_pixel_row_or_column_frame_is_saved(tmp_path: Path, hw: tuple[int, int]) -> None:
    result = make_result(0, True, hw=hw)
    result.anomaly_map = np.full(hw, 2.0, np.float32)  # a map as small as the frame
    sink = FlaggedFrameSink(tmp_path / "ng")
    sink.write(result)
    sink.write(make_result(1, True, hw=hw))  # the model-size map, drawn over the tiny frame
    sink.close()
    assert sink.saved == 2 and sink.errors == 0
    assert np.load(tmp_path / "ng" / "00000000_cam0_map.npy").shape == hw


# ---------------------------------------------------------------------------------------------------------------
# grad-run: the summary's flagged_folder block, the closing line, --benchmark with --jsonl


def _summary(result) -> dict:
    return json.loads(result.stderr.strip().splitlines()[-1])["summary"]


def test_grad_run_summary_counts_flagged_frames_lost(bundle: Path, tiny_demo_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    real = flagged.atomic_write_bytes

    def no_frames(path: Path, data: bytes, fsync: bool = False) -> None:  # the start-up probe passes
        if Path(path).name.startswith("0"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, data, fsync)

    monkeypatch.setattr(flagged, "atomic_write_bytes", no_frames)
    ng = tmp_path / "ng"
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(run_main, [str(bundle), "--source", str(tiny_demo_root / "nut" / "test" / "good"),
                                               "--backend", "onnxruntime", "--threshold", "1e-9", "--jsonl", "",
                                               "--save-flagged", str(ng), "--stats-every", "0"])
    assert result.exit_code == 0, result.output
    summary = _summary(result)
    frames = summary["frames"]
    assert frames > 0 and summary["flagged"] == frames  # the NG count stays where it was
    block = summary["flagged_folder"]
    assert (block["saved"], block["failed"], block["records_lost"], block["complete"]) == (0, frames, frames, False)
    done = [r for r in caplog.records if r.getMessage().startswith("done:")]
    assert len(done) == 1 and done[0].levelno == logging.WARNING
    assert f"flagged_folder {ng} lost {frames} (0 saved, {frames} failed" in done[0].getMessage()


def test_grad_run_benchmark_says_it_does_not_write_the_jsonl(bundle: Path, tiny_demo_root: Path, tmp_path: Path,
                                                             caplog) -> None:
    out = tmp_path / "results.jsonl"
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(run_main, [str(bundle), "--source", str(tiny_demo_root / "nut" / "test" / "good"),
                                               "--backend", "onnxruntime", "--threshold", "1.0", "--benchmark", "2",
                                               "--warmup", "0", "--jsonl", str(out), "--stats-every", "0"])
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "--jsonl" in r.getMessage()]
    assert len(said) == 1 and str(out) in said[0] and "--benchmark" in said[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# review fixes


def test_a_queued_ng_frame_never_waits_for_the_writer_inside_a_frame(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread is inside a frame's disk writes (a slow SD card): write() of the next NG frame returns at
    once (old: it waited on the lock the writer held for the whole frame)."""
    gate = _Gate(flagged.atomic_write_bytes)
    sink = FlaggedFrameSink(tmp_path / "ng", queue_size=4)
    monkeypatch.setattr(flagged, "atomic_write_bytes", gate)
    sink.write(make_result(0, True))
    assert gate.entered.wait(5)  # the writer thread is writing frame 0's first file
    caller = threading.Thread(target=lambda: sink.write(make_result(1, True)), daemon=True)
    caller.start()
    caller.join(3.0)
    returned = not caller.is_alive()
    gate.open()
    caller.join(15)
    sink.close()
    assert returned
    assert sink.saved == 2 and sink.frames_lost == 0


def test_a_refined_mask_without_room_is_not_a_lost_frame(tmp_path: Path) -> None:
    sink = FlaggedFrameSink(tmp_path / "ng")
    sink.write(make_result(0, True))
    sink.max_bytes = sink.total_bytes + 10  # the frame fits, its refined mask does not
    noisy = np.random.default_rng(0).random((64, 64)) > 0.5
    assert sink.write_refined(0, None, "cam0", noisy)["mask_file"] is None
    sink.close()
    report = sink.delivery_report()["flagged_folder"]
    assert report["records_lost"] == 0 and report["complete"]  # old: 1 frame lost, incomplete
    assert (report["skipped"], report["refined_skipped"], report["refined_failed"]) == (0, 1, 0)


def test_jsonl_rotated_compressed_and_removed_between_two_lines_writes_no_line_twice(tmp_path: Path) -> None:
    """logrotate without delaycompress: rename, compress, unlink. Old: the lines since the last check (a second)
    were written again into the new file, beside their copies in the .gz."""
    import gzip

    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path)
    for i in range(3):
        sink.write(make_result(i, False))
    rotated = tmp_path / "run.jsonl.1"
    path.rename(rotated)
    with gzip.open(tmp_path / "run.jsonl.1.gz", "wb") as gz:
        gz.write(rotated.read_bytes())
    rotated.unlink()
    sink.write(make_result(3, False))
    sink.close()
    kept = [json.loads(line)["frame_id"] for line in gzip.open(tmp_path / "run.jsonl.1.gz").read().splitlines()]
    assert sorted(kept + _frame_ids(path)) == [0, 1, 2, 3]  # each line once


def test_over_files_a_full_writer_queue_waits_and_drops_nothing() -> None:
    """A run over files drops no frame anywhere (the loop's queues block): a slow file sink makes it wait too (a
    fast folder run once lost an NG frame, and its refined mask, to a full flagged-folder queue)."""
    written: list[int] = []
    writer = BackgroundWriter("flagged test", lambda i: (time.sleep(0.01), written.append(i)), queue_size=2,
                              drop_when_full=False)
    for i in range(20):
        assert writer.submit(i)
    writer.close()
    assert written == list(range(20)) and writer.dropped == 0
    live = BackgroundWriter("video test", lambda i: time.sleep(0.05), queue_size=1)  # live: drops, never waits
    dropped = [live.submit(i) for i in range(10)].count(0)
    live.close()
    assert dropped > 0 and live.dropped == dropped


def test_a_writer_queue_is_bounded_in_bytes_too() -> None:
    """Eight queued frames at the 100 MP decode cap would hold 2.4 GB per file sink: a live writer drops a frame
    that would take its queue past ``max_bytes``, a writer over files waits for room, and one frame of any size
    is taken into an empty queue."""
    gate = threading.Event()
    done: list[int] = []
    live = BackgroundWriter("video test", lambda i: (gate.wait(5), done.append(i)), queue_size=8, max_bytes=100)
    numbers = [live.submit(i, nbytes=40) for i in range(4)]  # 0 (being written) and 1 hold 80 of 100 bytes
    assert numbers.count(0) >= 1 and live.dropped == numbers.count(0)
    gate.set()
    live.close()
    assert live._bytes == 0 and sorted(done) == [i for i, n in enumerate(numbers) if n]
    huge = BackgroundWriter("video test", lambda i: done.append(i), queue_size=8, max_bytes=100)
    assert huge.submit(99, nbytes=10 ** 9)  # larger than the budget: taken, the queue was empty
    huge.close()
    assert done[-1] == 99

    written: list[int] = []
    files = BackgroundWriter("flagged test", lambda i: (time.sleep(0.01), written.append(i)), queue_size=8,
                             drop_when_full=False, max_bytes=100)
    for i in range(10):
        assert files.submit(i, nbytes=60)  # two never fit together: each waits for the one before
    files.close()
    assert written == list(range(10)) and files.dropped == 0 and files._bytes == 0

    interrupted = BackgroundWriter("flagged test", lambda i: None, queue_size=8, drop_when_full=False, max_bytes=100)

    def second_ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    interrupted._queue.put = second_ctrl_c  # type: ignore[method-assign]  # the blocking put interrupted
    with pytest.raises(KeyboardInterrupt):
        interrupted.submit(0, nbytes=60)
    assert interrupted._bytes == 0  # not queued: its bytes are free (a leak made later submits wait for ever)


def test_a_signal_caps_the_file_writers_drain_and_network_sinks_close_first(tmp_path: Path) -> None:
    order: list[str] = []

    class Network(SinkBase):
        def close(self) -> None:
            order.append("network")

    def slow(item: int) -> None:
        time.sleep(0.3)

    writer = BackgroundWriter("video test", slow, queue_size=20)
    for i in range(20):
        writer.submit(i)  # 6 s of writing

    class Files(SinkBase):
        slow_close = True

        def limit_drain(self, seconds: float) -> None:
            writer.limit(seconds)

        def close(self) -> None:
            writer.close()
            order.append("files")

    sink = MultiSink([Files(), Network()])
    t0 = time.monotonic()
    sink.limit_drain(0.5)
    sink.close()
    assert time.monotonic() - t0 < 3.0 and order == ["network", "files"]
    assert writer.dropped >= 10 and writer.failed == 0
