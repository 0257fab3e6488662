"""The camera loop's side of ``grad-run --refine``: flagged frames to the refinement worker, outcomes to the sinks.

Per flagged frame the loop calls :meth:`RefineStage.submit` (the frame's own JSON line then says
``"refine": "queued"`` or ``"dropped"``); every iteration it calls :meth:`RefineStage.emit`, which writes one
follow-up record per finished frame to every sink that takes records::

    {"type": "refine", "frame_id": <the frame line's id>, "source": ..., "name": ..., "status": ...,
     <RefineResult.summary() fields>, "latency_s": ..., "mask_file": ..., "repaired_file": ...}

and, before that, lets a :class:`~gradad.runtime.sinks.FlaggedFrameSink` save the refined mask and repaired image
next to the frame it saved (``mask_file`` / ``repaired_file`` are their paths, or null). Frames that are not
refined get a follow-up too, with ``status`` ``dropped``, ``failed`` or ``unfinished`` and a ``reason``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from gradad.data.images import resize_hw
from gradad.runtime.refine_worker import RefineOutcome, RefineWorker
from gradad.runtime.types import FrameResult

log = logging.getLogger(__name__)

RECORD_TYPE = "refine"


def model_image(model_input: np.ndarray, frame_image: np.ndarray, map_hw: tuple[int, int]) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image the refiner needs, at the anomaly map's size.

    ``model_input`` is the frame's (3, h, w) float32 0..255 backend input (exact uint8 values, resized by the
    training rule); a graph that resizes inside (``--input-size`` bundles) gets the frame resized to the map.
    """
    if tuple(model_input.shape[1:]) == tuple(map_hw):
        return model_input.transpose(1, 2, 0).astype(np.uint8)
    return np.ascontiguousarray(resize_hw(frame_image, *map_hw))


class RefineStage:
    """Connects a started :class:`RefineWorker` to the loop's sinks."""

    def __init__(self, worker: RefineWorker, drain_timeout_s: float = 30.0) -> None:
        self.worker = worker
        self.drain_timeout_s = float(drain_timeout_s)
        self.records_written = 0
        self.drain_seconds: float | None = None

    def submit(self, result: FrameResult, image: np.ndarray) -> bool:
        """Send a flagged frame (model-size RGB image + its anomaly map); never blocks. Marks the frame's record."""
        frame = result.frame
        meta = {"source": frame.source, "name": frame.name}
        amap = np.squeeze(np.asarray(result.anomaly_map, dtype=np.float32))
        queued = self.worker.submit(frame.frame_id, image, amap, meta)
        result.extra["refine"] = "queued" if queued else "dropped"
        return queued

    def emit(self, sinks: Sequence[Any]) -> int:
        """Write the follow-ups of every outcome available now (non-blocking); returns how many."""
        return self._emit_all(self.worker.poll(), sinks)

    def close(self, sinks: Sequence[Any], drain_limit_s: float | None = None) -> None:
        """Wait up to ``drain_timeout_s`` (or the smaller ``drain_limit_s``) for pending frames, stop the worker,
        write the last follow-ups."""
        started = time.perf_counter()
        drain = self.drain_timeout_s if drain_limit_s is None else min(self.drain_timeout_s, drain_limit_s)
        try:
            outcomes = self.worker.close(drain)
        finally:
            self.drain_seconds = time.perf_counter() - started
        self._emit_all(outcomes, sinks)

    def summary(self) -> dict[str, Any]:
        """Refinement counts for the run summary / --benchmark JSON."""
        out = self.worker.counts.summary()
        out["follow_up_records"] = self.records_written
        out["drain_seconds"] = None if self.drain_seconds is None else round(self.drain_seconds, 3)
        if self.worker.failure:
            out["worker_failure"] = self.worker.failure
        return out

    def _emit_all(self, outcomes: Sequence[RefineOutcome], sinks: Sequence[Any]) -> int:
        for outcome in outcomes:
            self._emit(outcome, sinks)
        return len(outcomes)

    def _emit(self, outcome: RefineOutcome, sinks: Sequence[Any]) -> None:
        meta = outcome.meta
        record: dict[str, Any] = {"type": RECORD_TYPE, "frame_id": outcome.frame_id, "source": meta.get("source"),
                                  "name": meta.get("name"), **outcome.summary(), "mask_file": None,
                                  "repaired_file": None}
        if outcome.result is not None:
            for sink in sinks:
                saved = sink.write_refined(outcome.frame_id, meta.get("name"), meta.get("source"),
                                           outcome.result.mask, outcome.result.repaired)
                record.update({k: v for k, v in saved.items() if v is not None})
        for sink in sinks:
            sink.write_record(record)
        self.records_written += 1
