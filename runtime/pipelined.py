"""The pipelined camera loop: capture + preprocess, inference and sinks on three threads with bounded queues.

    source --(capture thread: decode, resize into a uint8 (3, H, W) slot)--> [frames queue]
           --(inference thread: batch, backend, verdicts)--> [results queue]
           --(calling thread: sinks, refinement, statistics)

The frame rate approaches 1 / slowest stage instead of 1 / sum of the stages. Ordering and drops:

* files, folders and videos never drop: a full queue blocks the stage before it, so every frame reaches the
  sinks, in capture order (one thread per stage, FIFO queues);
* live sources (camera, GStreamer, stream) keep the newest frames: a full frames queue drops its oldest frame
  (counted in ``LatencyStats.dropped`` / the summary's ``dropped_in_loop``), on top of the source's own
  newest-frame policy.

Shutdown (end of input, ``max_frames``, Ctrl-C/SIGTERM, a quit key or an error in any stage): capture stops, the
frames already captured are still inferred and written, then the caller closes the sinks. An exception in a
worker thread is re-raised in the calling thread. Sinks run in the calling thread (the main thread under
``grad-run``), so signal handling and GUI windows stay where they were.

Backends that run asynchronously (``submit``/``collect``, e.g. TensorRT with one CUDA stream per in-flight
batch) keep ``RunOptions.in_flight`` batches queued on the device; others run one ``infer`` at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from gradad.runtime.backend import Backend
from gradad.runtime.pipeline import Reporter, RunOptions, StopFlag, Thresholds, _refine_step, deliver, verdicts
from gradad.runtime.preprocess import INPUT_DTYPE, write_model_input
from gradad.runtime.stats import LatencyStats
from gradad.runtime.sinks.base import SinkBase
from gradad.runtime.types import Frame, FrameResult

log = logging.getLogger(__name__)

_END = object()  # end of stream marker, passed down the queues
_POLL_S = 0.05  # how often a blocked put/get looks at the abort flag


@dataclass
class _Captured:
    """A frame with its model input, made on the capture thread."""

    frame: Frame
    model_input: np.ndarray  # (3, H, W) uint8
    preprocess_s: float


@dataclass
class _Done:
    """A batch's results on its way to the sinks."""

    results: list[FrameResult]
    inputs: np.ndarray  # (n, 3, H, W): the refinement stage needs the model-size image


@dataclass
class _Shared:
    """State every stage sees: the stop flag, an abort event for errors, the first error, counters."""

    stop: StopFlag
    stats: LatencyStats
    abort: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.abort.set()


def _put(q: "queue.Queue[Any]", item: Any, shared: _Shared) -> bool:
    """Blocking put that gives up (False) when another stage failed."""
    while not shared.abort.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _put_newest(q: "queue.Queue[Any]", item: Any, shared: _Shared) -> None:
    """Live sources: make room by dropping the oldest queued frame, never wait for the inference stage."""
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            try:
                q.get_nowait()
                shared.stats.dropped += 1
            except queue.Empty:
                pass


def _get(q: "queue.Queue[Any]", shared: _Shared, block: bool = True) -> Any:
    """Next item, ``_END`` after an abort, or None when ``block`` is False and nothing is queued."""
    while not shared.abort.is_set():
        try:
            return q.get(timeout=_POLL_S) if block else q.get_nowait()
        except queue.Empty:
            if not block:
                return None
    return _END


def _capture(frames: Iterable[Frame], hw: tuple[int, int], out: "queue.Queue[Any]", options: RunOptions,
             shared: _Shared) -> None:
    """Capture thread: read frames, resize each into its uint8 model input, queue it; then the end marker."""
    count = 0
    pace = _Pacer(options.pace_fps)
    try:
        for frame in pace.frames(frames):
            t0 = time.perf_counter()
            slot = np.empty((3, *hw), INPUT_DTYPE)
            write_model_input(slot, frame.image)
            item = _Captured(frame, slot, time.perf_counter() - t0)
            if options.live:
                _put_newest(out, item, shared)
            elif not _put(out, item, shared):
                return
            count += 1
            if shared.stop or (options.max_frames is not None and count >= options.max_frames):
                break
    except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
        shared.fail(exc)
    finally:
        _put(out, _END, shared)


class _Pacer:
    """``pace_fps`` > 0: hand out file frames no faster than a camera at that rate would, each stamped as captured
    when handed out (the source decodes ahead; a camera's frame is new when it arrives). Benchmarks use it to
    measure end-to-end latency below saturation; 0 = as fast as the stages go."""

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps if fps > 0 else 0.0

    def frames(self, frames: Iterable[Frame]) -> Iterator[Frame]:
        if not self.interval:
            yield from frames
            return
        due = time.perf_counter()
        for frame in frames:
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            due = max(due + self.interval, time.perf_counter() - self.interval)
            frame.created = time.perf_counter()
            yield frame


def _next_batch(q: "queue.Queue[Any]", size: int, live: bool, shared: _Shared) -> tuple[list[_Captured], bool]:
    """Up to ``size`` captured frames and whether the stream ended. Files wait for a full batch; live sources
    take what is queued once the first frame is there (a batch never waits for a camera)."""
    batch: list[_Captured] = []
    while len(batch) < size:
        item = _get(q, shared, block=not (live and batch))
        if item is None:
            break
        if item is _END:
            return batch, True
        batch.append(item)
    return batch, False


class _Inference:
    """Inference thread: batches -> backend -> verdicts, with up to ``in_flight`` batches on async backends."""

    def __init__(self, backend: Backend, thresholds: Thresholds, options: RunOptions, shared: _Shared,
                 out: "queue.Queue[Any]") -> None:
        self.backend, self.thresholds, self.options, self.shared, self.out = backend, thresholds, options, shared, out
        self.asynchronous = callable(getattr(backend, "submit", None)) and callable(getattr(backend, "collect", None))
        self.pending: deque[tuple[list[_Captured], np.ndarray, Any, float]] = deque()

    def run(self, q: "queue.Queue[Any]") -> None:
        size = max(1, min(self.options.batch_size, self.backend.max_batch))
        try:
            ended = False
            while not ended:
                batch, ended = _next_batch(q, size, self.options.live, self.shared)
                if batch:
                    self._start(batch)
                while self.pending and (ended or len(self.pending) >= self._depth()):
                    self._finish()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            self.shared.fail(exc)
        finally:
            _put(self.out, _END, self.shared)

    def _depth(self) -> int:
        return max(1, min(self.options.in_flight, getattr(self.backend, "in_flight", 1))) if self.asynchronous else 1

    def _start(self, batch: list[_Captured]) -> None:
        inputs = np.stack([c.model_input for c in batch])
        t0 = time.perf_counter()
        handle = self.backend.submit(inputs) if self.asynchronous else self.backend.infer(inputs)
        self.pending.append((batch, inputs, handle, t0))

    def _finish(self) -> None:
        batch, inputs, handle, t0 = self.pending.popleft()
        scores, maps = self.backend.collect(handle) if self.asynchronous else handle
        t1 = time.perf_counter()
        results = verdicts([c.frame for c in batch], scores, maps, self.thresholds)
        t2 = time.perf_counter()
        n = len(batch)
        for captured, result in zip(batch, results):  # inference = submit -> outputs on the host, per frame
            result.latency_ms = {"decode": result.frame.decode_ms, "preprocess": captured.preprocess_s * 1e3,
                                 "inference": (t1 - t0) * 1e3 / n, "postprocess": (t2 - t1) * 1e3 / n}
        _put(self.out, _Done(results, inputs), self.shared)


def _sink_loop(q: "queue.Queue[Any]", sink: SinkBase, options: RunOptions, stop: StopFlag,
               stats: LatencyStats, shared: _Shared) -> int:
    """Calling thread: write every result (refinement follow-ups first), log statistics. Returns frames done."""
    reporter = Reporter(stats, options.stats_every_s)
    done = 0
    while True:
        item = _get(q, shared)
        if item is _END:
            return done
        if options.refine is not None:
            t0 = time.perf_counter()
            _refine_step(options.refine, item.results, item.inputs, sink)
            for result in item.results:
                result.latency_ms["refine"] = (time.perf_counter() - t0) * 1e3 / len(item.results)
        deliver(item.results, sink, stats, options, stop)
        done += len(item.results)
        reporter.tick()


def _stop_iterating(frames: Iterable[Frame], stop: StopFlag) -> Iterator[Frame]:
    for frame in frames:
        yield frame
        if stop:
            return


def run_stages(frames: Iterable[Frame], backend: Backend, thresholds: Thresholds, sink: SinkBase,
               options: RunOptions, stop: StopFlag, stats: LatencyStats) -> int:
    """Run the three stages until the stream ends or ``stop`` is set; returns the frames written.

    The caller closes the sink (``run_pipeline``); an error in any stage stops the others and is raised here.
    """
    batch = max(1, min(options.batch_size, backend.max_batch))
    depth = options.queue_frames or (batch if options.live else max(2, 2 * batch))
    frames_q: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
    results_q: "queue.Queue[Any]" = queue.Queue(maxsize=max(2, options.in_flight + 1))
    shared = _Shared(stop, stats)
    inference = _Inference(backend, thresholds, options, shared, results_q)
    threads = [
        threading.Thread(target=_capture, args=(_stop_iterating(frames, stop), backend.input_hw, frames_q, options,
                                                shared), name="grad-capture", daemon=True),
        threading.Thread(target=inference.run, args=(frames_q,), name="grad-inference", daemon=True),
    ]
    for thread in threads:
        thread.start()
    done = 0
    try:
        done = _sink_loop(results_q, sink, options, stop, stats, shared)
    except BaseException as exc:
        shared.fail(exc)
        raise
    finally:
        if not shared.errors:
            shared.abort.set()  # nothing left to write: release a stage still blocked on a queue
        for thread in threads:
            thread.join(timeout=5.0)
    if shared.errors:
        raise shared.errors[0]
    return done
