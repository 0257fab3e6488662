"""The pipelined grad-run loop (capture, inference, sinks on three threads) on a real ONNX Runtime session of the
tiny bundle: order and completeness for files, newest-frame drops for live sources, overlap of the stages,
warm-up before the first frame, errors and shutdown."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from gradad.data.datasets import load_samples
from gradad.data.images import read_image_rgb
from gradad.runtime.loader import load_backend
from gradad.runtime.pipeline import RunOptions, StopFlag, Thresholds, run_pipeline
from gradad.runtime.sinks import JsonlSink, SinkBase
from gradad.runtime.stats import LatencyStats
from gradad.runtime.types import Frame, FrameResult

THRESHOLDS = Thresholds(1.0)


class ListSink(SinkBase):
    """Collects results; optionally slow (a sink stage that costs ``delay_s`` per frame)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.results: list[FrameResult] = []
        self.delay_s = delay_s

    def write(self, result: FrameResult) -> None:
        time.sleep(self.delay_s)
        self.results.append(result)


class SlowBackend:
    """A real backend plus a fixed delay per call; records every input it was given."""

    def __init__(self, backend, delay_s: float = 0.0, fail_after: int | None = None) -> None:
        self.backend, self.delay_s, self.fail_after = backend, delay_s, fail_after
        self.name, self.max_batch, self.input_hw = backend.name, backend.max_batch, backend.input_hw
        self.input_dtype = backend.input_dtype
        self.calls: list[np.ndarray] = []

    def infer(self, images: np.ndarray):
        self.calls.append(images.copy())
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise RuntimeError("engine lost")
        time.sleep(self.delay_s)
        return self.backend.infer(images)

    def close(self) -> None:
        pass


class AsyncSlowBackend(SlowBackend):
    """``submit``/``collect`` like the TensorRT backend (up to ``in_flight`` batches on the device, collected in
    order); the work happens at ``collect``."""

    in_flight = 2

    def __init__(self, backend, delay_s: float = 0.0) -> None:
        super().__init__(backend, delay_s)
        self.pending: list[np.ndarray] = []

    def submit(self, images: np.ndarray) -> int:
        assert len(self.pending) < self.in_flight, "more batches in flight than the backend has slots"
        self.pending.append(images.copy())
        return len(self.calls) + len(self.pending)

    def collect(self, _handle: int):
        return self.infer(self.pending.pop(0))


def failing_frames(images: list[np.ndarray], fail_at: int) -> Iterator[Frame]:
    yield from frames(images, fail_at)
    raise ValueError(f"frame {fail_at}: corrupt file")


@pytest.fixture(scope="module")
def images(tiny_demo_root: Path) -> list[np.ndarray]:
    return [read_image_rgb(s.image_path) for s in load_samples(tiny_demo_root, "test")[:6]]


@pytest.fixture(scope="module")
def ort(bundle: Path):
    backend, _ = load_backend(bundle, "onnxruntime", threads=1)
    return backend


def frames(images: list[np.ndarray], n: int, delay_s: float = 0.0, source: str = "files") -> Iterator[Frame]:
    for i in range(n):
        time.sleep(delay_s)
        yield Frame(i, time.time(), source, images[i % len(images)], name=f"{i:03d}.png", decode_ms=delay_s * 1e3)


@pytest.mark.parametrize("batch", [1, 3])
def test_files_keep_every_frame_in_order_in_the_jsonl(ort, images, tmp_path: Path, batch: int) -> None:
    out = tmp_path / "run.jsonl"
    sink = ListSink(delay_s=0.002)  # a slow sink: the queues fill up, nothing may be dropped
    stats = run_pipeline(frames(images, 20), SlowBackend(ort, 0.01), THRESHOLDS, [JsonlSink(str(out)), sink],
                         RunOptions(batch_size=batch, stats_every_s=0), stats=LatencyStats())
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame_id"] for r in records] == list(range(20)) and stats.dropped == 0 and sink.closed
    for r in records:  # the line carries every stage up to the sinks and the end-to-end time
        lat = r["latency_ms"]
        assert {"decode", "preprocess", "inference", "postprocess", "end_to_end"} <= set(lat)
        assert lat["end_to_end"] >= lat["inference"] > 0
    for result in sink.results:  # statistics also get the sink time and the sum of the stages
        assert result.latency_ms["total"] >= result.latency_ms["sink"] >= 2.0
    # The same verdicts as running the backend directly on each frame.
    from gradad.runtime.preprocess import to_model_input

    direct, _ = ort.infer(to_model_input([images[i % len(images)] for i in range(20)], *ort.input_hw))
    np.testing.assert_allclose([r["score"] for r in records], direct, rtol=1e-5)
    assert stats.summary()["latency_ms"]["end_to_end"]["n"] == 20


class NanScoreBackend(SlowBackend):
    """A broken engine: the second frame of every batch scores NaN."""

    def infer(self, images: np.ndarray):
        scores, maps = super().infer(images)
        scores = np.array(scores, dtype=np.float32)
        scores[1::2] = np.nan
        return scores, maps


def test_a_nan_score_flags_the_part_never_passes_it(ort, images, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    sink, out = ListSink(), tmp_path / "run.jsonl"
    run_pipeline(frames(images, 4), NanScoreBackend(ort), Thresholds(1e9), [JsonlSink(str(out)), sink],
                 RunOptions(batch_size=2, stats_every_s=0), stats=LatencyStats())
    verdicts = [r.is_anomalous for r in sink.results]
    assert verdicts == [False, True, False, True]  # the threshold passes every finite score
    assert "non-finite score" in caplog.text and "[1]" in caplog.text and "[3]" in caplog.text
    records = [json.loads(line) for line in out.read_text().splitlines()]  # strict JSON: the NaN is written null
    assert [r["score"] for r in records][1::2] == [None, None] and [r["decision"] for r in records] == ["OK", "NG", "OK", "NG"]


def test_live_source_drops_oldest_frames_only_when_inference_lags(ort, images) -> None:
    slow = SlowBackend(ort, delay_s=0.03)
    live = ListSink()
    stats = LatencyStats()
    seen: list[int] = []  # drops counted while the loop runs, not only at its end
    run_pipeline(frames(images, 40, delay_s=0.002, source="camera"), slow, THRESHOLDS, [live],
                 RunOptions(stats_every_s=0, live=True, on_result=lambda _: seen.append(stats.dropped)),
                 stats=stats)
    ids = [r.frame.frame_id for r in live.results]
    assert stats.dropped > 0 and len(ids) + stats.dropped == 40 and max(seen) > 0
    assert ids == sorted(ids) and ids[-1] == 39  # newest frames win, order kept
    files = ListSink()
    stats = LatencyStats()
    run_pipeline(frames(images, 40, delay_s=0.002), SlowBackend(ort, delay_s=0.03), THRESHOLDS, [files],
                 RunOptions(stats_every_s=0), stats=stats)
    assert [r.frame.frame_id for r in files.results] == list(range(40)) and stats.dropped == 0


def test_stages_overlap_fps_approaches_the_slowest_stage(ort, images) -> None:
    """Capture, inference and sink each cost 15 ms: one after another ~45 ms per frame, pipelined ~15 ms."""
    def timed(pipelined: bool) -> float:
        sink = ListSink(delay_s=0.015)
        stats = run_pipeline(frames(images, 30, delay_s=0.015), SlowBackend(ort, 0.015), THRESHOLDS, [sink],
                             RunOptions(stats_every_s=0, pipelined=pipelined), stats=LatencyStats())
        assert len(sink.results) == 30
        return stats.overall_fps()

    serial, pipelined = timed(False), timed(True)
    assert pipelined > 1.8 * serial, (serial, pipelined)


def test_backend_is_warmed_up_before_the_first_frame(ort, images) -> None:
    backend = SlowBackend(ort)
    run_pipeline(frames(images, 2), backend, THRESHOLDS, [ListSink()], RunOptions(batch_size=2, stats_every_s=0))
    assert not backend.calls[0].any()  # blank frames first
    assert {len(c) for c in backend.calls[:4]} == {1, 2}  # batch 1 and the run's batch size
    assert backend.calls[-1].any()


def test_error_in_the_inference_stage_is_raised_and_sinks_are_closed(ort, images) -> None:
    sink = ListSink()
    backend = SlowBackend(ort, fail_after=2 + 3)  # 2 warm-up calls (batch 1), then 3 frames
    with pytest.raises(RuntimeError, match="engine lost"):
        run_pipeline(frames(images, 50), backend, THRESHOLDS, [sink], RunOptions(stats_every_s=0))
    assert sink.closed and [r.frame.frame_id for r in sink.results] == [0, 1, 2]


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_frames_decoded_before_a_source_error_are_all_written(ort, images, pipelined: bool, batch: int) -> None:
    """A corrupt file ends the run with its error, after every frame before it was scored and written: the
    batch in hand and the batches in flight on the backend included."""
    sink = ListSink()
    with pytest.raises(ValueError, match="frame 10: corrupt file"):
        run_pipeline(failing_frames(images, 10), AsyncSlowBackend(ort), THRESHOLDS, [sink],
                     RunOptions(batch_size=batch, stats_every_s=0, in_flight=2, pipelined=pipelined))
    assert sink.closed and [r.frame.frame_id for r in sink.results] == list(range(10))


class FailingSink(ListSink):
    def write(self, result: FrameResult) -> None:
        if len(self.results) == 3:
            raise RuntimeError("disk full")
        super().write(result)


@pytest.mark.parametrize("pipelined", [False, True])
def test_batches_in_flight_are_collected_when_the_loop_ends_on_an_error(ort, images, pipelined: bool) -> None:
    """A sink error ends the run; the batches still on the device are collected (their TensorRT slots freed), so
    the backend can run again."""
    backend = AsyncSlowBackend(ort)
    with pytest.raises(RuntimeError, match="disk full"):
        run_pipeline(frames(images, 30), backend, THRESHOLDS, [FailingSink()],
                     RunOptions(stats_every_s=0, in_flight=2, pipelined=pipelined))
    assert backend.pending == []


@pytest.mark.parametrize("pipelined", [False, True])
def test_max_frames_zero_writes_nothing(ort, images, pipelined: bool) -> None:
    sink = ListSink()
    run_pipeline(frames(images, 5), SlowBackend(ort), THRESHOLDS, [sink],
                 RunOptions(stats_every_s=0, max_frames=0, pipelined=pipelined))
    assert sink.results == []


def test_a_live_verdict_does_not_wait_for_the_next_camera_frame(ort, images) -> None:
    """With batches in flight (TensorRT), a slow or triggered camera's frame is collected while the camera is
    idle, not when its next frame arrives (which would add a whole frame period to every verdict)."""
    sink = ListSink()
    run_pipeline(frames(images, 3, delay_s=0.4, source="camera"), AsyncSlowBackend(ort), THRESHOLDS, [sink],
                 RunOptions(stats_every_s=0, live=True, in_flight=2))
    assert [r.frame.frame_id for r in sink.results] == [0, 1, 2]
    for r in sink.results:  # the frames helper dates each frame decode_ms before it is handed out
        assert r.latency_ms["inference"] < 200 and r.latency_ms["end_to_end"] - r.latency_ms["decode"] < 200, \
            r.latency_ms


def test_stop_flag_ends_the_stream_and_flushes_what_was_captured(ort, images) -> None:
    stop = StopFlag()
    sink = ListSink()

    def on_result(result: FrameResult) -> None:
        if result.frame.frame_id == 4:
            stop.set("SIGTERM")

    run_pipeline(frames(images, 10_000, delay_s=0.001), SlowBackend(ort, 0.005), THRESHOLDS, [sink],
                 RunOptions(stats_every_s=0, on_result=on_result), stop=stop)
    ids = [r.frame.frame_id for r in sink.results]
    assert sink.closed and ids == list(range(len(ids))) and 5 <= len(ids) < 50


def test_pipelined_grad_run_stops_ort_threads_spinning(bundle: Path) -> None:
    """Idle ONNX Runtime threads sleep in the pipelined loop (its other threads need the cores); --serial spins."""
    quiet, _ = load_backend(bundle, "onnxruntime", threads=1, spin=False)
    spinning, _ = load_backend(bundle, "onnxruntime", threads=1)
    key = "session.intra_op.allow_spinning"
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # no entry: ORT's default, spinning
        spinning.session.get_session_options().get_session_config_entry(key)


def test_the_final_log_line_reports_the_summary_fps_not_the_rolling_one() -> None:
    stats = LatencyStats()
    stats.restart_clock()
    for _ in range(3):
        stats.add({"inference": 5.0})
    stats.started -= 10.0  # 3 frames over ~10 s: overall 0.3 FPS, the rolling window saw them back to back
    stats.mark_end()
    summary = stats.summary()
    assert summary["fps"] < 0.31 and stats.rolling_fps() > 1.0
    assert f"{summary['fps']:.1f} FPS" in stats.format_line(rolling=False)
    assert f"{stats.summary(rolling=True)['fps']:.1f} FPS" in stats.format_line()  # the rolling window's, rounded


def test_a_line_where_most_frames_are_ng_is_warned_about_once(ort, images, caplog: pytest.LogCaptureFixture) -> None:
    """A grey or moved camera makes every frame NG: one warning says what to check (not one per frame), none when
    the share stays low."""
    import logging

    def run(threshold: float) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gradad.runtime.stats"):
            run_pipeline(frames(images, 120), ort, Thresholds(threshold, None), [ListSink()],
                         RunOptions(stats_every_s=0))
        return [r.getMessage() for r in caplog.records if "frames are NG" in r.getMessage()]

    warned = run(1e-9)  # every frame NG
    assert len(warned) == 1 and "50 of the last 50 frames are NG" in warned[0] and "grad-calibrate" in warned[0]
    assert run(1e9) == []  # every frame OK


def test_the_ng_rate_watch_rearms_after_the_share_falls() -> None:
    from gradad.runtime.stats import NgRateWatch

    watch = NgRateWatch(window=10, share=0.8)
    for flagged in [True] * 9:
        watch.add(flagged)
    assert watch.warnings == 0  # fewer verdicts than the window: no judgement yet
    for flagged in [True] * 20 + [False] * 10 + [True] * 10:
        watch.add(flagged)
    assert watch.warnings == 2  # once per episode: the OK run in between re-armed it
