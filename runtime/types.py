"""Data passed between the runtime's stages: frames from sources, results to sinks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Frame:
    """One captured image. ``image`` is RGB uint8 at the source's own resolution."""

    frame_id: int  # 0, 1, 2, ... per run, in capture order (dropped live frames leave gaps)
    timestamp: float  # time.time() at capture
    source: str  # which source (camera index, URL, file path)
    image: np.ndarray  # (H, W, 3) uint8 RGB
    name: str | None = None  # file name for folder/video sources (video: "<file>#<index>")
    decode_ms: float = 0.0  # time spent reading/decoding this frame
    created: float = field(default_factory=time.perf_counter)  # perf_counter when decoded (capture end)

    @property
    def nbytes(self) -> int:
        """The decoded image's bytes (what a queue of frames holds: the byte budgets of runtime/buffered.py and the
        file sinks' writers)."""
        return self.image.nbytes

    def age_ms(self) -> float:
        """Milliseconds since capture began (decode included): the end-to-end latency when a record is written."""
        return (time.perf_counter() - self.created) * 1e3 + self.decode_ms


@dataclass
class FrameResult:
    """The verdict on one frame plus everything a sink may want to show or store."""

    frame: Frame
    score: float
    normalised_score: float  # 0.5 = threshold (score / (2 * threshold)), for displays
    is_anomalous: bool
    threshold: float
    anomaly_map: np.ndarray  # (h, w) float32 at the model's input size
    pixel_threshold: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # per stage: decode, preprocess, inference, ...
    refined: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decision(self) -> str:
        return "NG" if self.is_anomalous else "OK"

    def to_record(self) -> dict[str, Any]:
        """The JSON line of this frame."""
        return {
            "frame_id": self.frame.frame_id,
            "timestamp": round(self.frame.timestamp, 6),
            "source": self.frame.source,
            "name": self.frame.name,
            "score": round(float(self.score), 6),
            "normalised_score": round(float(self.normalised_score), 6),
            "decision": self.decision,
            "threshold": round(float(self.threshold), 6),
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "refined": self.refined,
            **self.extra,
        }

