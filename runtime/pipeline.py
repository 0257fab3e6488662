"""The camera loop: frames -> batches -> backend -> verdicts -> sinks, with per-stage latency statistics.

The same stages run one after another (``--serial``) or pipelined on three threads. The sinks are fanned out by
one :class:`~gradad.runtime.sinks.MultiSink` (every sink gets every call even if one fails). Shutdown (end of input,
Ctrl-C or SIGTERM) always closes every sink, so no JSON line is lost.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np

from gradad.bundle import Bundle, check_bundle_class, check_threshold
from gradad.errors import GradError
from gradad.runtime.backend import Backend
from gradad.runtime.buffered import Buffered
from gradad.runtime.preprocess import INPUT_DTYPE, write_model_input
from gradad.runtime.stats import LatencyStats
from gradad.runtime.sinks.base import MultiSink, SinkBase
from gradad.runtime.types import Frame, FrameResult

if TYPE_CHECKING:
    from gradad.runtime.refine_worker import RefineStage

log = logging.getLogger(__name__)
_T = TypeVar("_T")


SIGNAL_DRAIN_S = 2.0  # refinement drain after SIGINT/SIGTERM (docker stop kills after 10 s)
#: A repeat of the signal that stopped the run this soon after it is the same request, not a second one that
#: insists: `timeout N cmd` and some supervisors signal the process and then its whole group at once.
REPEAT_SIGNAL_S = 1.0
_WAKE_S = 0.1  # how often a wait for the first ready live frame looks again (interrupt() only sets a flag)


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds in force (from the bundle's calibration or --threshold)."""

    image: float
    pixel: float | None = None
    source: str = "calibration"

    def normalise(self, score: float) -> float:
        """0.5 = threshold, for displays."""
        return float(score) / (2.0 * self.image)


def thresholds_from_bundle(bundle: Bundle, override: float | None = None,
                           class_name: str | None = None) -> Thresholds:
    """Thresholds from bundle.json's calibration (``class_name``: that class's own where it was calibrated on
    its own); --threshold overrides the image threshold; neither is a clear error."""
    cal, classes = bundle.calibration, bundle.classes or []
    check_bundle_class(bundle, class_name)
    if cal is None:
        if override is None:
            raise GradError(f"bundle {bundle.name} is not calibrated: run grad-calibrate BUNDLE --good DIR "
                            f"or give --threshold")
        return Thresholds(check_threshold(override, "--threshold"), None, "--threshold")
    image, pixel, source = cal.image_threshold, cal.pixel_threshold, f"calibration {cal.date or ''}".strip()
    own = cal.for_class(class_name) if class_name is not None else None
    if own is not None:
        (image, pixel), source = own, f"{source}, class {class_name}"
    elif class_name is not None and len(classes) > 1:
        log.warning("bundle %s has no thresholds of class %s alone (calibrated before per-class thresholds, or "
                    "without a --good folder of that class): using its one threshold for all classes; re-run "
                    "grad-calibrate with one --good DIR per class", bundle.name, class_name)
    # Bundle.load checked them; a bundle built in Python may not have been
    where = f"bundle {bundle.name}: calibration" + (f".classes.{class_name}" if own is not None else "")
    image = check_threshold(image, f"{where}.image_threshold")
    pixel = None if pixel is None else check_threshold(pixel, f"{where}.pixel_threshold")
    if override is not None:
        return Thresholds(check_threshold(override, "--threshold"), pixel, "--threshold")
    return Thresholds(image, pixel, source)


@dataclass
class RunOptions:
    """How the loop batches, reports and stops."""

    batch_size: int = 1
    max_frames: int | None = None  # frames to score (None = no limit; 0 = none); live: scored, not read
    stats_every_s: float = 10.0
    on_result: Callable[[FrameResult], None] | None = None
    refine: "RefineStage | None" = None  # grad-run --refine: flagged frames go to the refinement worker
    pipelined: bool = True  # capture, inference and sinks on separate threads (False: one after another)
    live: bool = False  # a live source: the capture queue keeps the newest frames (drops the oldest)
    in_flight: int = 2  # batches in flight on backends that run asynchronously (TensorRT: one stream each)
    warmup: bool = True  # blank batches through the backend before the first real frame
    pace_fps: float = 0.0  # pipelined: deliver frames no faster than this (a simulated camera; 0 = unpaced)

    def batch_for(self, backend: Backend) -> int:
        """``batch_size`` within what the backend accepts."""
        return max(1, min(self.batch_size, backend.max_batch))


class StopFlag:
    """Set by SIGINT/SIGTERM (or the quit key, a source given up on); the loop finishes the batch in hand, then
    shuts down cleanly. The first reason stays (``signal_name``: a source given up on during a Ctrl-C drain does
    not turn the run's exit code from 130 into 2); only a signal arms the "second signal stops at once" path."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None  # the first reason the flag was set for
        self.signalled: str | None = None  # the first signal (SIGINT/SIGTERM) received, whatever set the flag first
        self.on_stop: list[Callable[[], None]] = []  # e.g. FrameSource.interrupt, to unblock a waiting source
        self._signalled_at = -float("inf")  # time.monotonic() of that signal

    def set(self, name: str = "stop") -> None:
        if self.signal_name is None:
            self.signal_name = name
        self._event.set()
        for callback in list(self.on_stop):
            callback()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def signal(self, name: str, now: float | None = None) -> None:
        """What the handler does with signal ``name``: set the flag; a repeat of the first signal within
        ``REPEAT_SIGNAL_S`` is ignored, any later signal raises KeyboardInterrupt (stop now)."""
        now = time.monotonic() if now is None else now
        if self.signalled is not None:
            if name == self.signalled and now - self._signalled_at < REPEAT_SIGNAL_S:
                return  # the same request delivered twice (timeout(1): to the process, then to its group)
            raise KeyboardInterrupt  # second signal: the user insists, stop now (sinks still close in `finally`)
        self.signalled, self._signalled_at = name, now
        self.set(name)

    def install(self) -> Callable[[], None]:
        """Route SIGINT and SIGTERM to this flag (main thread only); returns a function restoring the old ones."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum: int, _frame: object) -> None:
            self.signal(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore


def batched(frames: Iterable[_T], size: int) -> Iterator[list[_T]]:
    """Group consecutive items into batches of up to ``size`` (the last one may be smaller). An error of ``frames``
    is raised after the partial batch before it (decoded frames are not lost)."""
    batch: list[_T] = []
    try:
        for frame in frames:
            batch.append(frame)
            if len(batch) >= size:
                yield batch
                batch = []
    except Exception:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def until(frames: Iterable[Frame], stop: StopFlag, limit: int | None) -> Iterator[Frame]:
    """``frames`` until ``limit`` (None: no limit) have been handed out or ``stop`` is set."""
    if stop or (limit is not None and limit <= 0):
        return  # a signal during start-up (a slow refinement worker, a camera opening): not one frame more
    for count, frame in enumerate(frames, 1):
        yield frame
        if stop or (limit is not None and count >= limit):
            return


class LiveFrames(Protocol):
    """What :func:`first_ready` needs of a live source (``gradad.runtime.sources.FrameSource``)."""

    @property
    def finished(self) -> bool: ...

    def poll(self) -> Frame | None: ...

    def watch(self, event: threading.Event) -> None: ...


def interleave(sources: Sequence[Any]) -> Iterator[Frame]:
    """Several sources as one stream (multi-camera), until every one is exhausted. Live sources: the frame of
    whichever has one ready (see :func:`first_ready`); files: round-robin, each frame in turn."""
    if sources and all(getattr(s, "live", False) for s in sources):
        yield from first_ready(sources)
        return
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


def first_ready(sources: Sequence[LiveFrames]) -> Iterator[Frame]:
    """Frames of several live sources as they arrive: never waits on one source while another has a frame ready,
    so a camera that is down (reconnecting) or slower does not hold the others back. The sources take turns going
    first, so under load each still gets its share. Ends when every source has finished."""
    ready = threading.Event()  # set by a source whenever it has a new frame or ends
    for source in sources:
        source.watch(ready)
    turn = 0
    while True:
        ready.clear()  # before polling: a frame stored after this sets it again, so none is slept through
        alive = [s for s in sources if not s.finished]
        if not alive:
            return
        for k in range(len(alive)):
            frame = alive[(turn + k) % len(alive)].poll()
            if frame is not None:
                turn = (turn + k + 1) % len(alive)
                yield frame
                break
        else:
            ready.wait(_WAKE_S)


def warm_up(backend: Backend, batch_size: int, every_size: bool = False) -> float:
    """Run the backend on blank frames before the first real one (ORT arena/thread pool, TensorRT context and
    CUDA-graph capture): the first frame then costs what every frame costs. Returns the seconds it took.

    Batches of 1 and ``batch_size`` go twice through each of the backend's ``in_flight`` slots (TensorRT: calls
    take the slots in turn, and each slot captures a CUDA graph per batch size, then replays it). ``every_size``
    (a live run: a batch holds whatever frames are queued) warms every size 1..batch_size on a backend that
    captures CUDA graphs, so no size is first captured mid-run.
    """
    h, w = backend.input_hw
    dtype = getattr(backend, "input_dtype", INPUT_DTYPE)
    sizes = sorted({1, batch_size})
    if every_size and getattr(backend, "cuda_graphs", False):
        sizes = list(range(1, batch_size + 1))
    rounds = 2 * max(1, int(getattr(backend, "in_flight", 1)))
    started = time.perf_counter()
    for n in sizes:
        blank = np.zeros((n, 3, h, w), dtype)
        for _ in range(rounds):
            backend.infer(blank)
    seconds = time.perf_counter() - started
    log.info("backend warmed up in %.2f s (batch %s)", seconds, "/".join(map(str, sizes)))
    return seconds


@dataclass
class Captured:
    """A frame with its uint8 (3, H, W) model input and the seconds the resize took."""

    frame: Frame
    model_input: np.ndarray
    preprocess_s: float

    @property
    def nbytes(self) -> int:
        """The frame data it holds (a loop queue's byte budget)."""
        return self.frame.nbytes + self.model_input.nbytes


def prepare(frame: Frame, hw: tuple[int, int]) -> Captured:
    """Resize a frame by the training rule into its own model input."""
    t0 = time.perf_counter()
    slot = np.empty((3, *hw), INPUT_DTYPE)
    write_model_input(slot, frame.image)
    return Captured(frame, slot, time.perf_counter() - t0)


@dataclass
class Scored:
    """A batch's results on its way to the sinks, with its inputs (the refinement stage needs the model image)."""

    results: list[FrameResult]
    inputs: np.ndarray

    @property
    def nbytes(self) -> int:
        """The frame data it holds (a loop queue's byte budget)."""
        return self.inputs.nbytes + sum(r.frame.nbytes + r.anomaly_map.nbytes for r in self.results)


def scored_batches(batches: Iterable[list[Captured]], backend: Backend, thresholds: Thresholds,
                   in_flight: int = 1) -> Iterator[Scored]:
    """Run each batch through the backend and yield its verdicts, in order. Backends with ``submit``/``collect``
    (TensorRT) keep up to ``in_flight`` batches on the device, others run one ``infer`` at a time. An empty batch
    (an idle camera) finishes what is in flight, so no verdict waits for the next frame; an error of ``batches`` is
    raised after the verdicts of the batches already submitted."""
    asynchronous = callable(getattr(backend, "submit", None)) and callable(getattr(backend, "collect", None))
    depth = max(1, min(in_flight, getattr(backend, "in_flight", 1))) if asynchronous else 1
    pending: deque[tuple[list[Captured], np.ndarray, Any, float]] = deque()
    upstream, error = iter(batches), None
    try:
        while True:
            try:
                batch = next(upstream)
            except StopIteration:
                batch = None  # the end: finish what is in flight
            except Exception as exc:
                batch, error = None, exc
            if batch:
                inputs = np.stack([c.model_input for c in batch])
                t0 = time.perf_counter()
                pending.append((batch, inputs, backend.submit(inputs) if asynchronous else backend.infer(inputs), t0))
            while pending and (not batch or len(pending) >= depth):
                batch_done, inputs, handle, t0 = pending.popleft()
                scores, maps = backend.collect(handle) if asynchronous else handle  # type: ignore[attr-defined]
                yield _verdicts(batch_done, inputs, scores, maps, thresholds, t0)
            if batch is None:
                if error is not None:
                    raise error
                return
    finally:  # the loop ended early (an error downstream): free the slots of the batches still on the device
        while asynchronous and pending:
            try:
                backend.collect(pending.popleft()[2])  # type: ignore[attr-defined]
            except Exception as exc:  # the error that ended the loop is the one to report
                log.debug("collecting an abandoned batch failed: %s", exc)


def _verdicts(batch: list[Captured], inputs: np.ndarray, scores: np.ndarray, maps: np.ndarray,
              th: Thresholds, t0: float) -> Scored:
    """One FrameResult per frame; each carries the batch's stage times divided by its size (inference = submit ->
    outputs on the host)."""
    t1 = time.perf_counter()
    # fail safe: a NaN / inf score (a broken engine, an FP16 overflow) flags the part instead of passing it
    # (nan > threshold is False)
    finite = np.isfinite(scores)
    results = [FrameResult(frame=c.frame, score=float(score), normalised_score=th.normalise(score),
                           is_anomalous=bool(not ok or score > th.image), threshold=th.image,
                           anomaly_map=amap, pixel_threshold=th.pixel)
               for c, score, ok, amap in zip(batch, scores, finite, maps)]
    if not finite.all():
        bad = [c.frame.frame_id for c, ok in zip(batch, finite) if not ok]
        log.warning("frame(s) %s: the model returned a non-finite score (NaN / inf), flagged as anomalous; "
                    "check the engine with grad-export build's parity check", bad)
    t2 = time.perf_counter()
    n = len(batch)
    for captured, result in zip(batch, results):
        result.latency_ms = {"decode": captured.frame.decode_ms, "preprocess": captured.preprocess_s * 1e3,
                             "inference": (t1 - t0) * 1e3 / n, "postprocess": (t2 - t1) * 1e3 / n}
    return Scored(results, inputs)


def write(scored: Scored, sink: SinkBase, stats: LatencyStats, options: RunOptions, stop: StopFlag) -> int:
    """Refinement (if on), then each result to the sink (the fan-out) and its latency to ``stats`` (logged every
    ``stats_every_s``); returns the frames written.

    ``end_to_end`` (capture -> record handed to the sinks, queue waits included) is set before the write, so the
    JSON line carries it; ``sink`` and ``total`` (the sum of the stages) are known after it (statistics only)."""
    results = scored.results
    if options.refine is not None:
        t0 = time.perf_counter()
        options.refine.step(results, scored.inputs, sink)
        for result in results:
            result.latency_ms["refine"] = (time.perf_counter() - t0) * 1e3 / len(results)
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
    stats.log_every(options.stats_every_s)
    return len(results)


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

    ``options.pipelined`` (default) runs capture/preprocess, inference and sinks on separate threads; otherwise
    they run one after another in this thread. The backend is warmed up first unless ``options.warmup`` is off.
    """
    stop = stop if stop is not None else StopFlag()  # StopFlag is falsy until set: no `or` here
    stats = stats if stats is not None else LatencyStats()
    sink = MultiSink(sinks)
    before = stats.frames  # frames done = those added since: the count survives a second signal's exception
    try:
        if options.warmup:
            # live + pipelined: batches take what is queued, so any size up to the batch size comes up
            warm_up(backend, options.batch_for(backend), every_size=options.live and options.pipelined)
            stats.restart_clock()
        sink.started()
        run = _run_pipelined if options.pipelined else _run_serial
        run(frames, backend, thresholds, sink, options, stop, stats)
    finally:
        _shutdown(sink, options, stop, stats, stats.frames - before)
    return stats


def _run_serial(frames: Iterable[Frame], backend: Backend, thresholds: Thresholds, sink: SinkBase,
                options: RunOptions, stop: StopFlag, stats: LatencyStats) -> None:
    """Decode, preprocess, inference and sinks one after another in this thread (``stats`` counts the frames)."""
    hw = backend.input_hw
    captured = (prepare(f, hw) for f in until(frames, stop, options.max_frames))  # nothing drops: read = scored
    for scored in scored_batches(batched(captured, options.batch_for(backend)), backend, thresholds):
        write(scored, sink, stats, options, stop)


def _paced(frames: Iterable[Frame], fps: float) -> Iterator[Frame]:
    """``fps`` > 0: hand out file frames no faster than a camera at that rate would, each stamped as captured
    when handed out (the source decodes ahead; a camera's frame is new when it arrives). Benchmarks use it to
    measure end-to-end latency below saturation; 0 = as fast as the stages go."""
    if fps <= 0:
        yield from frames
        return
    interval, due = 1.0 / fps, time.perf_counter()
    for frame in frames:
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        due = max(due + interval, time.perf_counter() - interval)
        frame.created = time.perf_counter()
        yield frame


def _batches(captured: Buffered[Captured], size: int, live: bool) -> Iterator[list[Captured]]:
    """Batches of up to ``size``: files wait for a full batch; live sources take what is queued once the first
    frame is there (a batch never waits for a camera), and an empty batch says the camera has nothing queued, so
    batches in flight finish before the wait for its next frame. An error is raised after the partial batch."""
    if not live:
        yield from batched(captured, size)
        return
    while True:
        batch: list[Captured] = []
        try:
            item = captured.get_nowait()
            if item is None:
                if captured.ended:
                    return
                yield batch  # empty: the camera is idle
                item = next(captured, None)
                if item is None:
                    return
            batch.append(item)
            while len(batch) < size and (item := captured.get_nowait()) is not None:
                batch.append(item)
        except Exception:
            if batch:
                yield batch
            raise
        yield batch


def _run_pipelined(frames: Iterable[Frame], backend: Backend, thresholds: Thresholds, sink: SinkBase,
                   options: RunOptions, stop: StopFlag, stats: LatencyStats) -> None:
    """Capture + preprocess, inference and sinks on three threads with bounded queues (``stats`` counts the frames).

    The frame rate approaches 1 / the slowest stage. Files never drop (a full queue blocks the stage before it) and
    keep capture order; live sources drop the oldest queued frame instead (``LatencyStats.dropped``). An error in
    any stage ends the others and is raised here; the sinks run in this thread (signal handling and GUI windows
    stay on the main thread under grad-run).
    """
    size, hw = options.batch_for(backend), backend.input_hw
    abort = threading.Event()  # set when the calling thread leaves: releases a stage blocked on a queue
    # live: the capture queue drops frames, so max_frames counts the frames scored (below), not those read
    limit = options.max_frames if options.live and options.max_frames else None
    read_limit = None if limit else options.max_frames
    captured = Buffered((prepare(f, hw) for f in _paced(until(frames, stop, read_limit), options.pace_fps)),
                        size if options.live else max(2, 2 * size), "grad-capture",
                        drop_oldest=options.live, stop=abort, size_of=attrgetter("nbytes"))
    scored = Buffered(scored_batches(_batches(captured, size, options.live), backend, thresholds, options.in_flight),
                      max(2, options.in_flight + 1), "grad-inference", stop=abort, size_of=attrgetter("nbytes"))
    done, dropped_before, finished = 0, stats.dropped, False
    try:
        for item in scored:
            stats.dropped = dropped_before + captured.dropped  # live drops, visible while the loop runs
            done += write(_first(item, limit - done) if limit else item, sink, stats, options, stop)
            if limit and done >= limit:
                break
        else:
            finished = True  # the frames ended (or the stop flag): the capture thread is not waiting for one
    finally:
        if not finished:  # --max-frames or an error: unblock a source waiting for a frame a camera never sends
            _interrupt_sources(frames, stop)
        abort.set()
        for stage in (scored, captured):
            if not stage.close(5.0):
                log.warning("the %s thread did not stop within 5 s (a source read that does not return?)",
                            stage.name)
        stats.dropped = dropped_before + captured.dropped


def _interrupt_sources(frames: Iterable[Frame], stop: StopFlag) -> None:
    """End the reads of the live sources of a loop that ends before they do: grad-run registers every source in
    ``stop.on_stop``; a lone source handed in directly (``iter(source)``) is interrupted itself."""
    for interrupt in [*stop.on_stop, getattr(frames, "interrupt", None)]:
        if callable(interrupt):
            interrupt()


def _first(scored: Scored, n: int) -> Scored:
    """The first ``n`` results of a batch (the rest was scored past ``max_frames``)."""
    return scored if len(scored.results) <= n else Scored(scored.results[:n], scored.inputs[:n])


def _shutdown(sink: SinkBase, options: RunOptions, stop: StopFlag, stats: LatencyStats, done: int) -> None:
    """Stop the FPS clock, drain the refinement worker, close every sink (even when one fails). After a signal
    (also one arriving during the drain) the file sinks' writer threads get ``SIGNAL_DRAIN_S`` for their queued
    frames, so the network sinks and the summary still go out before a supervisor kills the process."""
    stats.mark_end()  # frame rate of the loop itself, without the refinement drain
    try:
        sink.stopping()  # before the drains, which may take longer than a service watchdog's period
    except Exception as exc:  # noqa: BLE001 - the sinks must still be closed
        log.error("telling the sinks the run stops failed: %s", exc)

    def cap_drain() -> None:
        if stop.signalled:
            sink.limit_drain(SIGNAL_DRAIN_S)

    stop.on_stop.append(cap_drain)
    cap_drain()
    errors: list[Exception] = []
    try:
        if options.refine is not None:
            # last follow-ups go out before the sinks close; a signal (SIGTERM from a supervisor that kills
            # soon after) gets a short drain so every sink is still flushed in time
            options.refine.close(sink, stopping=stop.__bool__, stop_drain_s=SIGNAL_DRAIN_S)
    except Exception as exc:
        errors.append(exc)
        log.error("closing the refinement worker failed: %s", exc)
    finally:
        try:
            sink.close()  # every sink, even when one fails (MultiSink logs each failure)
        except Exception as exc:
            errors.append(exc)
        finally:
            stop.on_stop.remove(cap_drain)
    if stop.signal_name:
        log.info("stopped by %s after %d frames", stop.signal_name, done)
    if errors:
        raise errors[0]
