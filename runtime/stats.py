"""Rolling per-stage latency percentiles and throughput."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class NgRateWatch:
    """Warns once when most recent frames are NG: on a running line that is rarely the parts. A camera, lighting,
    framing or part that differs from the calibration images (a grey camera on a colour model, a moved camera)
    makes every frame NG, and without this line an operator only sees a reject bin filling up.

    Warns when at least ``share`` of the last ``window`` verdicts (after ``window`` frames) are NG; re-arms once
    the share falls below half of that, so a second episode is reported too."""

    def __init__(self, window: int = 50, share: float = 0.8) -> None:
        self.window = window
        self.share = share
        self._recent: deque[bool] = deque(maxlen=window)
        self._armed = True
        self.warnings = 0

    def add(self, flagged: bool) -> None:
        """Record one verdict; log the warning when the recent NG share crosses ``share``."""
        self._recent.append(flagged)
        if len(self._recent) < self.window:
            return
        ng = sum(self._recent)
        if self._armed and ng >= self.share * self.window:
            self._armed = False
            self.warnings += 1
            log.warning("%d of the last %d frames are NG: if these parts are good, the camera, lighting, framing "
                        "or part differs from the images the thresholds were calibrated on (e.g. a grey camera on "
                        "a colour model, a moved or refocused camera); check the view, then recalibrate with "
                        "grad-calibrate if the line has changed", ng, self.window)
        elif not self._armed and ng < self.share * self.window / 2:
            self._armed = True


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
        self.ng_watch = NgRateWatch()

    def add(self, latency_ms: dict[str, float], flagged: bool = False) -> None:
        """Record one frame's per-stage latencies."""
        for stage, value in latency_ms.items():
            self.samples.setdefault(stage, deque(maxlen=self.window)).append(value)
            self.all_samples.setdefault(stage, deque(maxlen=self.history)).append(value)
        self.frames += 1
        self.flagged += int(flagged)
        self.ng_watch.add(flagged)
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
