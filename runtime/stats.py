"""Rolling per-stage latency percentiles and throughput."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class LatencyStats:
    """Keeps the last ``window`` samples of each stage (ms) and counts frames for FPS.

    Stages are decode, preprocess, inference, postprocess and sink; ``total`` is their sum (the work spent on the
    frame), ``end_to_end`` the time from capture to its record written (queue waits of the pipelined loop included).
    """

    def __init__(self, window: int = 1000, history: int = 100_000) -> None:
        self.window = window
        self.history = history  # the exit summary covers the last `history` frames: bounded memory on 24/7 lines
        self.samples: dict[str, deque[float]] = {}
        self.all_samples: dict[str, deque[float]] = {}
        self.frames = 0
        self.flagged = 0
        self.dropped = 0  # live frames the pipelined loop replaced by newer ones before inference
        self.started = time.perf_counter()
        self.ended: float | None = None  # set by mark_end(): overall FPS stops counting there
        self._recent: deque[float] = deque(maxlen=window)  # completion times for rolling FPS
        self._logged = time.perf_counter()

    def add(self, latency_ms: dict[str, float], flagged: bool = False) -> None:
        """Record one frame's per-stage latencies."""
        for stage, value in latency_ms.items():
            self.samples.setdefault(stage, deque(maxlen=self.window)).append(value)
            self.all_samples.setdefault(stage, deque(maxlen=self.history)).append(value)
        self.frames += 1
        self.flagged += int(flagged)
        self._recent.append(time.perf_counter())

    def restart_clock(self) -> None:
        """Start the FPS clock and the periodic log line now (after the backend's warm-up)."""
        self.started = self._logged = time.perf_counter()

    def rolling_fps(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1] - self._recent[0]
        return (len(self._recent) - 1) / span if span > 0 else 0.0

    def mark_end(self) -> None:
        """Freeze the overall FPS clock (e.g. before waiting for the refinement worker at the end of a run)."""
        self.ended = time.perf_counter()

    def overall_fps(self) -> float:
        elapsed = (self.ended if self.ended is not None else time.perf_counter()) - self.started
        return self.frames / elapsed if elapsed > 0 else 0.0

    @staticmethod
    def _percentiles(values: Any) -> dict[str, float]:
        arr = np.asarray(values, dtype=np.float64)
        p50, p95, p99 = np.percentile(arr, [50, 95, 99])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                "mean": round(float(arr.mean()), 3), "n": int(arr.size)}

    def summary(self, rolling: bool = False) -> dict[str, Any]:
        """Percentiles per stage (the last ``history`` frames, or only the rolling window), FPS and counts."""
        source = self.samples if rolling else self.all_samples
        stages = {k: self._percentiles(v) for k, v in source.items() if len(v)}
        return {"frames": self.frames, "flagged": self.flagged, "dropped_in_loop": self.dropped,
                "fps": round(self.rolling_fps() if rolling else self.overall_fps(), 2), "latency_ms": stages}

    def log_every(self, every_s: float) -> None:
        """Log :meth:`format_line` when ``every_s`` (> 0) seconds have passed since the last time."""
        now = time.perf_counter()
        if every_s > 0 and now - self._logged >= every_s:
            log.info("%s", self.format_line())
            self._logged = now

    def format_line(self, rolling: bool = True) -> str:
        """One log line: FPS and p50/p95 of each stage over the rolling window (``rolling=False``: over the whole
        run, as in :meth:`summary`)."""
        s = self.summary(rolling=rolling)
        parts = [f"{k} {v['p50']:.1f}/{v['p95']:.1f}" for k, v in s["latency_ms"].items()]
        return f"{s['frames']} frames, {s['flagged']} NG, {s['fps']:.1f} FPS | p50/p95 ms: " + ", ".join(parts)
