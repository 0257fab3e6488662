"""The camera process's side of ``grad-run --refine``: F2PAD refinement of flagged frames in a worker process.

The camera loop keeps its frame rate and never imports torch: :class:`RefineWorker` spawns a process running
:data:`WORKER_MODULE` (imported only there), ships it ``(image, anomaly map)`` jobs through a bounded queue (a full
queue drops the job, never waits) and receives numpy-only :class:`~gradad.runtime.refine_result.RefineResult`
objects. A worker that cannot start raises :class:`RefineWorkerError` with its own one-line reason; one that dies
mid-run fails its pending jobs and the loop goes on without refinement. :class:`RefineStage` writes one follow-up
record per submitted frame to the sinks (``"type": "refine"``, the frame's ``frame_id``, the result summary or a
``dropped``/``failed``/``unfinished`` status with a ``reason``, and the mask / repaired image files a
:class:`~gradad.runtime.sinks.FlaggedFrameSink` saved).
"""

from __future__ import annotations

import collections
import importlib
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from gradad.data.images import resize_hw
from gradad.errors import GradError
from gradad.imaging import map_2d
from gradad.runtime.refine_result import STATUS_COARSE_KEPT, RefineResult

if TYPE_CHECKING:
    from gradad.runtime.types import FrameResult
    from gradad.runtime.sinks import SinkBase

log = logging.getLogger(__name__)

# The worker process side and the F2PAD refiner (torch), named by string: only the worker process imports them.
WORKER_MODULE = "gradad.refine.worker"
DEFAULT_FACTORY = "gradad.refine.refiner:build_worker_refiner"
DEVICES = ("auto", "cpu", "cuda")

# Outcome statuses besides RefineResult's own (converged, max_iterations, time_budget, empty_region).
STATUS_DROPPED = "dropped"  # not queued: the queue was full or the worker is not running
STATUS_FAILED = "failed"  # the refiner raised for this job's batch, or the worker died with it pending
STATUS_UNFINISHED = "unfinished"  # still pending when close() gave up waiting

RECORD_TYPE = "refine"  # "type" of the follow-up records

# Worker protocol. Jobs: (seq, image, map), then JOB_STOP. Messages back: ("ready", pid) | ("error", reason) |
# ("done", seq, RefineResult) | ("failed", [seq, ...], reason).
JOB_STOP = None
_RECEIVER_STOP = ("receiver-stop",)


class RefineWorkerError(GradError):
    """The refinement worker could not start (one line, the worker's own reason)."""


@dataclass(frozen=True)
class RefineWorkerConfig:
    """Settings of the refinement worker (``grad-run --refine-*``)."""

    bundle_dir: str
    time_budget_s: float | None = None  # per-frame refinement budget; None = the bundle's refine config
    max_batch: int = 4  # waiting jobs refined together per refine() call
    queue_size: int = 8  # jobs waiting for the worker; more are dropped, never waited for
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # torch CPU threads in the worker (0 = torch's default: all cores)
    nice: int = 19  # os.nice increment of the worker unless device="cuda" (0 = keep priority)
    start_timeout_s: float = 300.0  # ready handshake (importing torch and loading the model)
    class_name: str | None = None  # tuned class whose settings refine every frame (None: the only tuned class, else none)
    factory: str | Callable[["RefineWorkerConfig"], Any] = DEFAULT_FACTORY  # -> a Refiner

    def __post_init__(self) -> None:
        problems = []
        if self.time_budget_s is not None and self.time_budget_s < 0:
            problems.append(f"--refine-budget {self.time_budget_s} (must be >= 0 seconds; 0 = no budget)")
        if self.max_batch < 1:
            problems.append(f"--refine-batch {self.max_batch} (must be >= 1)")
        if self.queue_size < 1:
            problems.append(f"--refine-queue {self.queue_size} (must be >= 1)")
        if self.device not in DEVICES:
            problems.append(f"--refine-device {self.device!r} (choose {', '.join(DEVICES)})")
        if self.threads < 0:
            problems.append(f"--refine-threads {self.threads} (must be >= 0)")
        if not 0 <= self.nice <= 19:
            problems.append(f"refine nice {self.nice} (must be 0..19)")
        if problems:
            raise GradError("invalid refinement setting: " + "; ".join(problems))


@dataclass
class RefineOutcome:
    """What became of one submitted frame: a refined result, or why there is none."""

    frame_id: int
    meta: dict[str, Any]  # the caller's data about the frame (kept in this process, never sent to the worker)
    status: str  # RefineResult.status when refined, else dropped / failed / unfinished
    result: RefineResult | None = None
    reason: str | None = None
    latency_s: float | None = None  # submit -> result, wall time

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields of the follow-up record (no arrays)."""
        if self.result is not None:
            out = self.result.summary()
        else:
            out = {"status": self.status, "reason": self.reason}
        if self.latency_s is not None:
            out["latency_s"] = round(self.latency_s, 4)
        return out


@dataclass
class RefineCounts:
    """Running totals of a worker's jobs, for the run summary."""

    submitted: int = 0
    done: int = 0  # jobs with a result (a refined mask, or the coarse mask a class keeps)
    statuses: dict[str, int] = field(default_factory=dict)  # every outcome by status
    seconds_total: float = 0.0
    iterations_total: int = 0
    latency_total_s: float = 0.0

    @property
    def dropped(self) -> int:
        return self.statuses.get(STATUS_DROPPED, 0)

    @property
    def coarse_kept(self) -> int:
        """Results of classes whose tuning kept the coarse mask: no solver ran, so they are not in the means."""
        return self.statuses.get(STATUS_COARSE_KEPT, 0)

    @property
    def unfinished(self) -> int:
        return self.statuses.get(STATUS_UNFINISHED, 0)

    @property
    def failed(self) -> int:
        """Jobs that ended without a result for another reason (the refiner raised, the worker died)."""
        return sum(self.statuses.values()) - self.done - self.dropped - self.unfinished

    def add(self, outcome: RefineOutcome) -> None:
        """Count one outcome."""
        self.statuses[outcome.status] = self.statuses.get(outcome.status, 0) + 1
        if outcome.result is None:
            return
        self.done += 1
        if outcome.result.status == STATUS_COARSE_KEPT:
            return
        self.seconds_total += float(outcome.result.seconds)
        self.iterations_total += int(outcome.result.iterations)
        self.latency_total_s += outcome.latency_s or 0.0

    def summary(self) -> dict[str, Any]:
        """Counts and means (seconds and iterations per refined frame, submit-to-result latency)."""
        solved = self.done - self.coarse_kept
        mean = (lambda total: round(total / solved, 4) if solved else None)
        return {"submitted": self.submitted, "done": self.done, "coarse_kept": self.coarse_kept,
                "dropped": self.dropped, "failed": self.failed,
                "unfinished": self.unfinished, "statuses": dict(sorted(self.statuses.items())),
                "mean_seconds": mean(self.seconds_total), "mean_iterations": mean(self.iterations_total),
                "mean_latency_s": mean(self.latency_total_s)}


@dataclass
class _Pending:
    frame_id: int
    meta: dict[str, Any]
    submitted_at: float


def _spawned(module: str, cfg: RefineWorkerConfig, jobs: Any, results: Any, stop: Any) -> None:
    """Entry point of the spawned process: run the worker module named by string (torch stays out of this one)."""
    try:
        serve = importlib.import_module(module).serve
    except BaseException as exc:  # noqa: BLE001 - reported to the main process as a start-up failure
        results.put(("error", f"cannot load the refinement worker {module}: {type(exc).__name__}: {exc}"))
        return
    serve(cfg, jobs, results, stop)


class RefineWorker:
    """Runs a refiner in a separate (spawned) process: :meth:`start`, :meth:`submit` per flagged frame,
    :meth:`poll` every loop iteration, :meth:`close` at the end (or use it as a context manager)."""

    def __init__(self, config: RefineWorkerConfig) -> None:
        self.config = config
        self.counts = RefineCounts()
        self.failure: str | None = None  # why the worker is not running (after a crash)
        self._seq = 0
        self._drops = 0
        self._pending: dict[int, _Pending] = {}
        self._outbox: collections.deque[RefineOutcome] = collections.deque()  # dropped at submit
        self._inbox: collections.deque[tuple] = collections.deque()  # messages from the receiver thread
        self._process: Any = None
        self._receiver: threading.Thread | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, stopping: Callable[[], bool] | None = None) -> "RefineWorker":
        """Spawn the worker and wait for its ready handshake; :class:`RefineWorkerError` if it cannot start.

        When ``stopping()`` turns true during the wait (Ctrl-C while a slow model loads), the worker is stopped
        and ``failure`` says so: the caller goes on to its clean shutdown instead of waiting up to the start
        time-out."""
        ctx = multiprocessing.get_context("spawn")
        self._jobs = ctx.Queue(maxsize=self.config.queue_size)
        self._results = ctx.Queue()
        self._stop = ctx.Event()
        self._process = ctx.Process(target=_spawned, name="gradad-refine", daemon=True,
                                    args=(WORKER_MODULE, self.config, self._jobs, self._results, self._stop))
        started = time.perf_counter()
        self._process.start()
        try:
            pid = self._await_ready(stopping)
        except BaseException:
            self._shutdown(0.0)
            raise
        if pid is None:
            self._closed = True
            self.failure = "stopped during start-up"
            self._shutdown(0.0)
            return self
        self._receiver = threading.Thread(target=self._receive, name="gradad-refine-results", daemon=True)
        self._receiver.start()
        log.info("refinement worker pid %d ready in %.1f s (device %s, batch %d, queue %d, budget %s)", pid,
                 time.perf_counter() - started, self.config.device, self.config.max_batch, self.config.queue_size,
                 "bundle default" if self.config.time_budget_s is None else f"{self.config.time_budget_s:g} s")
        return self

    def _await_ready(self, stopping: Callable[[], bool] | None) -> int | None:
        """The worker's pid once it says ready; None when ``stopping()`` turned true first."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            try:
                message = self._results.get(timeout=0.2)
            except queue.Empty:
                if stopping is not None and stopping():
                    return None
                if self._process.is_alive():
                    continue
                try:  # it may have said why just before exiting
                    message = self._results.get(timeout=0.5)
                except queue.Empty:
                    raise RefineWorkerError(f"refinement worker exited during start-up (exit code "
                                            f"{self._process.exitcode})") from None
            if message[0] == "ready":
                return int(message[1])
            raise RefineWorkerError(f"refinement worker failed to start: {message[1]}")
        raise RefineWorkerError(f"refinement worker not ready within {self.config.start_timeout_s:g} s")

    def _receive(self) -> None:
        """Receiver thread: moves result messages into the inbox, so poll() never reads the pipe itself."""
        while True:
            try:
                message = self._results.get()
            except (EOFError, OSError, ValueError):  # queue closed
                return
            if message == _RECEIVER_STOP:
                return
            self._inbox.append(message)

    def __enter__(self) -> "RefineWorker":
        return self.start() if self._process is None else self

    def __exit__(self, *exc: object) -> None:
        self.close(0.0)

    @property
    def alive(self) -> bool:
        """True while the worker process runs."""
        return self._process is not None and self._process.is_alive()

    # -- jobs ----------------------------------------------------------------------------------------------------

    def submit(self, frame_id: int, image: np.ndarray, coarse_map: np.ndarray,
               meta: dict[str, Any] | None = None) -> bool:
        """Queue one frame (model-size RGB uint8 image + its float32 anomaly map); never blocks.

        Returns False when the job was dropped (queue full, worker not running, closed); the dropped outcome is
        reported by the next :meth:`poll`.
        """
        self.counts.submitted += 1
        meta = dict(meta or {})
        reason = self._refusal()
        if reason is None:
            self._seq += 1
            job = (self._seq, np.array(image, dtype=np.uint8, copy=True),
                   np.array(coarse_map, dtype=np.float32, copy=True))
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                reason = f"refinement queue full ({self.config.queue_size} jobs waiting)"
            else:
                self._pending[self._seq] = _Pending(frame_id, meta, time.perf_counter())
                return True
        self._outbox.append(RefineOutcome(frame_id, meta, STATUS_DROPPED, reason=reason))
        self._drops += 1
        if self._drops == 1 or self._drops % 100 == 0:
            log.warning("frame %s not refined (%d dropped so far): %s", frame_id, self._drops, reason)
        return False

    def _refusal(self) -> str | None:
        if self._closed:
            return "refinement worker closed"
        if self.failure is not None:
            return f"refinement worker not running ({self.failure})"
        return None

    def poll(self) -> list[RefineOutcome]:
        """Outcomes available now (dropped, refined, failed), without blocking."""
        out: list[RefineOutcome] = []
        while self._outbox:
            out.append(self._outbox.popleft())
        out.extend(self._drain_inbox())
        if self.failure is None and self._process is not None and not self._closed and not self._process.is_alive():
            out.extend(self._on_crash())
        return self._counted(out)

    def _handle(self, message: tuple) -> list[RefineOutcome]:
        kind = message[0]
        if kind == "done":
            _, seq, result = message
            job = self._pending.pop(seq, None)
            if job is None:
                return []
            return [RefineOutcome(job.frame_id, job.meta, result.status, result=result,
                                  latency_s=time.perf_counter() - job.submitted_at)]
        if kind == "failed":
            _, seqs, reason = message
            log.error("refinement of %d frame(s) failed: %s", len(seqs), reason)
            return self._take(seqs, STATUS_FAILED, reason)
        log.debug("refinement worker message ignored: %r", message[:1])
        return []

    def _take(self, seqs: Sequence[int], status: str, reason: str) -> list[RefineOutcome]:
        out = []
        for seq in seqs:
            job = self._pending.pop(seq, None)
            if job is not None:
                out.append(RefineOutcome(job.frame_id, job.meta, status, reason=reason))
        return out

    def _on_crash(self) -> list[RefineOutcome]:
        time.sleep(0.05)  # let the receiver thread pass on what the worker sent before dying
        out = self._drain_inbox()
        self.failure = f"refinement worker died (exit code {self._process.exitcode})"
        log.error("%s: %d pending frame(s) lost; the camera loop goes on without refinement", self.failure,
                  len(self._pending))
        return out + self._take(list(self._pending), STATUS_FAILED, self.failure)

    def close(self, drain_timeout_s: float = 30.0, stopping: Callable[[], bool] | None = None,
              stop_drain_s: float = 2.0) -> list[RefineOutcome]:
        """Wait up to ``drain_timeout_s`` for pending jobs, stop the worker; returns the last outcomes.

        When ``stopping()`` turns true during the wait (SIGTERM from a supervisor that kills soon after), at most
        ``stop_drain_s`` more. Jobs still pending then are returned as ``unfinished``. Idempotent (later calls
        return []).
        """
        if self._closed:
            return []
        out: list[RefineOutcome] = []
        started = time.monotonic()
        shortened = False
        try:
            limit = max(0.0, drain_timeout_s)
            shortened = stopping is not None and stopping()  # stopped already: the short drain from the start
            deadline = time.monotonic() + (min(limit, stop_drain_s) if shortened else limit)
            if self._pending:
                log.info("waiting up to %.1f s for %d refinement job(s)", deadline - time.monotonic(),
                         len(self._pending))
            while self._pending and self.failure is None and time.monotonic() < deadline:
                if stopping is not None and not shortened and stopping():
                    deadline, shortened = min(deadline, time.monotonic() + stop_drain_s), True
                out.extend(self.poll())
                time.sleep(0.02)
            out.extend(self.poll())
        finally:
            self._closed = True
            self._shutdown(1.0 if not self._pending else 0.0)
        out.extend(self._counted(self._drain_inbox()))
        waited = f"{time.monotonic() - started:.1f} s, cut short by a stop signal" if shortened \
            else f"{drain_timeout_s:g} s"
        left = self._take(list(self._pending), STATUS_UNFINISHED, f"not refined within the drain time ({waited})")
        if left:
            log.warning("%d refinement job(s) unfinished at shutdown", len(left))
        self._counted(left)
        log.info("refinement: %s", self.counts.summary())
        return out + left

    def _drain_inbox(self) -> list[RefineOutcome]:
        out: list[RefineOutcome] = []
        while self._inbox:
            out.extend(self._handle(self._inbox.popleft()))
        return out

    def _counted(self, outcomes: list[RefineOutcome]) -> list[RefineOutcome]:
        for outcome in outcomes:
            self.counts.add(outcome)
        return outcomes

    def _shutdown(self, grace_s: float) -> None:
        """Stop the worker (sentinel, then terminate after ``grace_s``), the receiver thread and the queues."""
        if self._process is None:
            return
        self._stop.set()
        try:
            self._jobs.put_nowait(JOB_STOP)
        except (queue.Full, ValueError, OSError):
            pass
        self._process.join(grace_s)
        if self._process.is_alive():  # it ignores SIGTERM (see gradad.refine.worker) and holds nothing to save
            self._process.kill()
            self._process.join(5.0)
        if self._receiver is not None:
            self._results.put(_RECEIVER_STOP)
            self._receiver.join(1.0)
        for q in (self._jobs, self._results):
            q.cancel_join_thread()  # never hang at exit on jobs nobody will read
            q.close()


# ----------------------------------------------------------------------------------------------------------------
# the loop's side


def model_image(model_input: np.ndarray, frame_image: np.ndarray, map_hw: tuple[int, int]) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image the refiner needs, at the anomaly map's size: the frame's (3, h, w) model input
    (resized by the training rule), or, for a graph that resizes inside (``--input-size``), the frame resized."""
    if tuple(model_input.shape[1:]) == tuple(map_hw):
        return model_input.transpose(1, 2, 0).astype(np.uint8)
    return np.ascontiguousarray(resize_hw(frame_image, *map_hw))


class RefineStage:
    """Connects a started :class:`RefineWorker` to the loop's sinks."""

    def __init__(self, worker: RefineWorker, drain_timeout_s: float = 30.0, settings: str | None = None) -> None:
        self.worker = worker
        self.drain_timeout_s = float(drain_timeout_s)
        self.settings = settings  # the tuned class whose F2PAD settings apply, or "defaults": named in each record
        self.records_written = 0
        self.drain_seconds: float | None = None

    def step(self, results: Sequence["FrameResult"], inputs: np.ndarray, sink: "SinkBase") -> None:
        """Write the follow-ups available now, then send this batch's NG frames (model-size image + anomaly map) and
        mark their records "queued" or "dropped"; never blocks. In this order every follow-up comes after its
        frame's own line."""
        self._emit(self.worker.poll(), sink)
        for model_input, result in zip(inputs, results):
            if result.is_anomalous:
                frame, amap = result.frame, map_2d(result.anomaly_map)  # a 1x1 frame's map stays 2-D
                queued = self.worker.submit(frame.frame_id, model_image(model_input, frame.image, amap.shape), amap,
                                            {"source": frame.source, "name": frame.name})
                result.extra["refine"] = "queued" if queued else "dropped"

    def close(self, sink: "SinkBase", stopping: Callable[[], bool] | None = None, stop_drain_s: float = 2.0) -> None:
        """Wait up to ``drain_timeout_s`` (at most ``stop_drain_s`` more once ``stopping()``, also when it already
        is) for pending frames, stop the worker, write the last follow-ups."""
        started = time.perf_counter()
        try:
            outcomes = self.worker.close(self.drain_timeout_s, stopping, stop_drain_s)
        finally:
            self.drain_seconds = time.perf_counter() - started
        self._emit(outcomes, sink)

    def summary(self) -> dict[str, Any]:
        """Refinement counts for the run summary / --benchmark JSON."""
        out = self.worker.counts.summary()
        out["follow_up_records"] = self.records_written
        out["drain_seconds"] = None if self.drain_seconds is None else round(self.drain_seconds, 3)
        if self.worker.failure:
            out["worker_failure"] = self.worker.failure
        return out

    def _emit(self, outcomes: Sequence[RefineOutcome], sink: "SinkBase") -> None:
        for outcome in outcomes:
            meta = outcome.meta
            record: dict[str, Any] = {"type": RECORD_TYPE, "frame_id": outcome.frame_id, "source": meta.get("source"),
                                      "name": meta.get("name"), **outcome.summary(), "mask_file": None,
                                      "repaired_file": None}
            if self.settings is not None:
                record["settings"] = self.settings
            if outcome.result is not None:
                result = outcome.result
                saved = sink.write_refined(outcome.frame_id, meta.get("name"), meta.get("source"), result.mask,
                                           result.repaired if result.repaired_anything else None)
                record.update({k: v for k, v in saved.items() if v is not None})
            sink.write_record(record)
            self.records_written += 1
