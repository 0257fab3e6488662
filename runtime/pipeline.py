"""The camera loop: frames -> batches -> backend -> verdicts -> sinks, with per-stage latency statistics.

The sinks are fanned out by one :class:`~gradad.runtime.sinks.MultiSink` (every sink gets every call even if one
fails). Shutdown (end of input, Ctrl-C or SIGTERM) always closes every sink, so no JSON line is lost.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from gradad.bundle import Bundle, check_threshold
from gradad.errors import GradError
from gradad.runtime.backend import Backend
from gradad.runtime.preprocess import INPUT_DTYPE, to_model_input
from gradad.runtime.stats import LatencyStats
from gradad.runtime.sinks.base import MultiSink, SinkBase
from gradad.runtime.types import Frame, FrameResult

if TYPE_CHECKING:
    from gradad.runtime.refine_worker import RefineStage

log = logging.getLogger(__name__)


SIGNAL_DRAIN_S = 2.0  # refinement drain after SIGINT/SIGTERM (docker stop kills after 10 s)


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds in force (from the bundle's calibration or --threshold)."""

    image: float
    pixel: float | None = None
    source: str = "calibration"

    def normalise(self, score: float) -> float:
        """0.5 = threshold, for displays."""
        return float(score) / (2.0 * self.image)


def thresholds_from_bundle(bundle: Bundle, override: float | None = None) -> Thresholds:
    """Thresholds from bundle.json's calibration; --threshold overrides; neither is a clear error."""
    cal = bundle.calibration
    if cal is not None:  # Bundle.load checked them; a bundle built in Python may not have been
        check_threshold(cal.image_threshold, f"bundle {bundle.name}: calibration.image_threshold")
    pixel = (check_threshold(cal.pixel_threshold, f"bundle {bundle.name}: calibration.pixel_threshold")
             if cal is not None and cal.pixel_threshold is not None else None)
    if override is not None:
        return Thresholds(check_threshold(override, "--threshold"), pixel, "--threshold")
    if cal is None:
        raise GradError(f"bundle {bundle.name} is not calibrated: run grad-calibrate BUNDLE --good DIR "
                        f"or give --threshold")
    return Thresholds(float(cal.image_threshold), pixel, f"calibration {cal.date or ''}".strip())


@dataclass
class RunOptions:
    """How the loop batches, reports and stops."""

    batch_size: int = 1
    max_frames: int | None = None
    stats_every_s: float = 10.0
    on_result: Callable[[FrameResult], None] | None = None
    refine: "RefineStage | None" = None  # grad-run --refine: flagged frames go to the refinement worker
    pipelined: bool = True  # capture, inference and sinks on separate threads (False: one after another)
    live: bool = False  # a live source: the capture queue keeps the newest frames (drops the oldest)
    queue_frames: int = 0  # frames between capture and inference (0 = 2 batches, at least 2; live: 1 batch)
    in_flight: int = 2  # batches in flight on backends that run asynchronously (TensorRT: one stream each)
    warmup: bool = True  # blank batches through the backend before the first real frame
    pace_fps: float = 0.0  # pipelined: deliver frames no faster than this (a simulated camera; 0 = unpaced)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes the batch in hand, then shuts down cleanly."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.on_stop: list[Callable[[], None]] = []  # e.g. FrameSource.interrupt, to unblock a waiting source

    def set(self, name: str = "stop") -> None:
        self.signal_name = name
        self._event.set()
        for callback in self.on_stop:
            callback()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def install(self) -> Callable[[], None]:
        """Route SIGINT and SIGTERM to this flag (main thread only); returns a function restoring the old ones."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum: int, _frame: object) -> None:
            if self:  # second signal: the user insists, stop now (sinks still close in `finally` blocks)
                raise KeyboardInterrupt
            self.set(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore


def batched(frames: Iterable[Frame], size: int, stop: StopFlag) -> Iterator[list[Frame]]:
    """Group consecutive frames into batches of up to ``size`` (the last one may be smaller)."""
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) >= size:
            yield batch
            batch = []
        if stop:
            break
    if batch:
        yield batch


def interleave(sources: Sequence[Iterable[Frame]]) -> Iterator[Frame]:
    """Round-robin over several sources (multi-camera), until every one is exhausted."""
    iterators = [iter(s) for s in sources]
    while iterators:
        alive = []
        for it in iterators:
            try:
                yield next(it)
                alive.append(it)
            except StopIteration:
                pass
        iterators = alive


def warm_up(backend: Backend, batch_size: int, rounds: int = 2) -> float:
    """Run the backend on blank frames before the first real one (ORT arena/thread pool, TensorRT context and
    CUDA-graph capture): the first frame then costs what every frame costs. Returns the seconds it took."""
    h, w = backend.input_hw
    dtype = getattr(backend, "input_dtype", INPUT_DTYPE)
    started = time.perf_counter()
    for n in sorted({1, batch_size}):
        blank = np.zeros((n, 3, h, w), dtype)
        for _ in range(rounds):
            backend.infer(blank)
    seconds = time.perf_counter() - started
    log.info("backend warmed up in %.2f s (batch %s)", seconds, "/".join(map(str, sorted({1, batch_size}))))
    return seconds


def verdicts(batch: Sequence[Frame], scores: np.ndarray, maps: np.ndarray, thresholds: Thresholds) -> list[FrameResult]:
    """One FrameResult per frame of a batch."""
    return [FrameResult(frame=frame, score=float(score), normalised_score=thresholds.normalise(score),
                        is_anomalous=bool(score > thresholds.image), threshold=thresholds.image, anomaly_map=amap,
                        pixel_threshold=thresholds.pixel)
            for frame, score, amap in zip(batch, scores, maps)]


def batch_latency(result: FrameResult, stages: dict[str, float], n: int) -> None:
    """Give a frame its per-stage latency: its own decode, and each batch stage's seconds divided by ``n``."""
    result.latency_ms = {"decode": result.frame.decode_ms, **{k: v * 1e3 / n for k, v in stages.items()}}


def deliver(results: Sequence[FrameResult], sink: SinkBase, stats: LatencyStats, options: RunOptions,
            stop: StopFlag) -> None:
    """Write each result to the sink (the fan-out), then record its sink and total latency.

    ``end_to_end`` (capture -> record handed to the sinks, queue waits included) is set before the write, so the
    JSON line carries it; ``sink`` and ``total`` (the sum of the stages) are known after it (statistics only)."""
    for result in results:
        ts = time.perf_counter()
        result.latency_ms["end_to_end"] = result.frame.age_ms()
        sink.write(result)
        result.latency_ms["sink"] = (time.perf_counter() - ts) * 1e3
        result.latency_ms["total"] = sum(v for k, v in result.latency_ms.items() if k != "end_to_end")
        stats.add(result.latency_ms, result.is_anomalous)
        if options.on_result:
            options.on_result(result)
    if sink.quit_requested:
        stop.set("quit key")


class Reporter:
    """Logs the rolling statistics line every ``every_s`` seconds."""

    def __init__(self, stats: LatencyStats, every_s: float) -> None:
        self.stats, self.every_s, self.last = stats, every_s, time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        if self.every_s > 0 and now - self.last >= self.every_s:
            log.info("%s", self.stats.format_line())
            self.last = now


def run_pipeline(
    frames: Iterable[Frame],
    backend: Backend,
    thresholds: Thresholds,
    sinks: Sequence[SinkBase],
    options: RunOptions = RunOptions(),
    stop: StopFlag | None = None,
    stats: LatencyStats | None = None,
) -> LatencyStats:
    """Run until the frames end, ``max_frames`` is reached or ``stop`` is set; always closes the sinks.

    ``options.pipelined`` (default) runs capture/preprocess, inference and sinks on separate threads
    (:mod:`gradad.runtime.pipelined`); otherwise the stages run one after another in this thread. The backend is
    warmed up first unless ``options.warmup`` is off.
    """
    stop = stop if stop is not None else StopFlag()  # StopFlag is falsy until set: no `or` here
    stats = stats if stats is not None else LatencyStats()
    sink = MultiSink(sinks)
    done = 0
    try:
        if options.warmup:
            warm_up(backend, max(1, min(options.batch_size, backend.max_batch)))
            stats.started = time.perf_counter()
        if options.pipelined:
            from gradad.runtime.pipelined import run_stages

            done = run_stages(frames, backend, thresholds, sink, options, stop, stats)
        else:
            done = _run_serial(frames, backend, thresholds, sink, options, stop, stats)
    finally:
        _shutdown(sink, options, stop, stats, done)
    return stats


def _run_serial(frames: Iterable[Frame], backend: Backend, thresholds: Thresholds, sink: SinkBase,
                options: RunOptions, stop: StopFlag, stats: LatencyStats) -> int:
    """Today's loop: decode, preprocess, inference and sinks one after another. Returns the frames done."""
    h, w = backend.input_hw
    batch_size = max(1, min(options.batch_size, backend.max_batch))
    reporter = Reporter(stats, options.stats_every_s)
    done = 0
    for batch in batched(frames, batch_size, stop):
        if options.max_frames is not None:
            batch = batch[: options.max_frames - done]
        t0 = time.perf_counter()
        inputs = to_model_input([f.image for f in batch], h, w)
        t1 = time.perf_counter()
        scores, maps = backend.infer(inputs)
        t2 = time.perf_counter()
        results = verdicts(batch, scores, maps, thresholds)
        t3 = time.perf_counter()
        if options.refine is not None:
            _refine_step(options.refine, results, inputs, sink)
        t4 = time.perf_counter()
        stages = {"preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2}
        if options.refine is not None:
            stages["refine"] = t4 - t3
        for result in results:  # batch stages are shared: each frame carries the batch's time per frame
            batch_latency(result, stages, len(batch))
        deliver(results, sink, stats, options, stop)
        done += len(batch)
        reporter.tick()
        if stop or (options.max_frames is not None and done >= options.max_frames):
            break
    return done


def _shutdown(sink: SinkBase, options: RunOptions, stop: StopFlag, stats: LatencyStats, done: int) -> None:
    """Stop the FPS clock, drain the refinement worker, close every sink (even when one fails)."""
    stats.mark_end()  # frame rate of the loop itself, without the refinement drain
    errors: list[Exception] = []
    try:
        if options.refine is not None:
            # last follow-ups go out before the sinks close; a signal (SIGTERM from a supervisor that kills
            # soon after) gets a short drain so every sink is still flushed in time
            options.refine.close(sink, SIGNAL_DRAIN_S if stop.signal_name else None)
    except Exception as exc:
        errors.append(exc)
        log.error("closing the refinement worker failed: %s", exc)
    finally:
        try:
            sink.close()  # every sink, even when one fails (MultiSink logs each failure)
        except Exception as exc:
            errors.append(exc)
    if stop.signal_name:
        log.info("stopped by %s after %d frames", stop.signal_name, done)
    if errors:
        raise errors[0]


def _refine_step(stage: "RefineStage", results: Sequence[FrameResult], inputs: Any, sink: SinkBase) -> None:
    """Follow-ups of frames refined so far (their lines were written earlier), then submit this batch's NG frames.

    In this order every follow-up, a "dropped" one included, comes after its frame's own line.
    """
    from gradad.runtime.refine_worker import model_image

    stage.emit(sink)
    for i, result in enumerate(results):
        if result.is_anomalous:
            map_hw = np.squeeze(result.anomaly_map).shape
            stage.submit(result, model_image(inputs[i], result.frame.image, map_hw))
