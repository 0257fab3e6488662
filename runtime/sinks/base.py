"""The sink base class (one interface with no-op defaults), record/JSON helpers and the fan-out to several sinks."""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable

import numpy as np

from gradad.plain import plain_leaf
from gradad.runtime.types import FrameResult

log = logging.getLogger("gradad.runtime.sinks")


#: Banner colours (BGR): NG red, OK green; text is white.
NG_COLOR_BGR = (0, 0, 220)
OK_COLOR_BGR = (0, 170, 0)
_TEXT_COLOR_BGR = (255, 255, 255)
_CONTOUR_COLOR_BGR = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------------
# helpers


class SinkBase:
    """Every sink's base: one interface, with no-op defaults, so the loop and the refinement stage call every
    sink the same way (no ``hasattr``): ``write`` each frame, ``write_record`` follow-up records (refinement),
    ``write_refined`` refined masks (returns the files saved), ``quit_requested`` (a display window asks to stop),
    ``delivery_report`` (a network sink's counts for the summary), ``close`` once; plus context-manager support
    and the ``closed`` flag."""

    _closed: bool = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    @property
    def quit_requested(self) -> bool:
        """True when the sink asks the run to stop (the display window); False for the others."""
        return False

    def started(self) -> None:
        """The loop starts scoring: the backend is warmed up and the sources are open (default: nothing)."""

    def stopping(self) -> None:
        """The loop has scored its last frame; drains and :meth:`close` follow (default: nothing)."""

    def write(self, result: FrameResult) -> None:
        """Take one frame's result (default: ignore it)."""

    def write_record(self, record: dict[str, Any]) -> None:
        """Take a follow-up record, e.g. a refinement result (default: ignore it)."""

    def write_refined(self, frame_id: int, name: str | None, source: str, mask: np.ndarray,
                      repaired: np.ndarray | None = None) -> dict[str, str | None]:
        """Save a refined mask with its frame; returns the saved files by record field (default: none)."""
        return {}

    def delivery_report(self) -> dict[str, dict[str, Any]]:
        """A network sink's delivery counts for the run summary, under its kind (``{"mqtt": {...}}``: target,
        records delivered, failed, dropped, ``records_lost``, ``complete``); the other sinks report nothing."""
        return {}

    @property
    def slow_close(self) -> bool:
        """True when :meth:`close` may take seconds (a file sink's writer thread still writing queued frames): the
        fan-out closes such sinks last."""
        return False

    def limit_drain(self, seconds: float) -> None:
        """Have :meth:`close` write queued frames for at most ``seconds`` from now (a stop signal: a supervisor
        kills soon), the rest counted as dropped (default: nothing queued, nothing to do)."""

    def close(self) -> None:
        """Flush and release everything; called once at shutdown."""
        self._closed = True

    def __enter__(self) -> "SinkBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(obj: Any) -> Any:
    leaf = plain_leaf(obj)
    if leaf is not obj:
        return leaf
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats (not valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    return obj


def record_to_json(record: dict[str, Any]) -> str:
    """One-line strict JSON of a record: numpy values converted, NaN/inf written as ``null``."""
    try:
        return json.dumps(record, default=_json_default, allow_nan=False)
    except ValueError:  # a non-finite float somewhere
        return json.dumps(_finite(record), default=_json_default, allow_nan=False)


def map_display_range(threshold: float, amap: np.ndarray | None = None) -> tuple[float | None, float | None]:
    """The anomaly-map range shown by overlays and 8-bit map images: ``(0, 2 * threshold)``.

    A fixed range keeps colours comparable across frames (the threshold is mid-scale). When the threshold is
    not a positive finite number (an uncalibrated bundle) it falls back to the map's own min/max
    (``(None, None)``, or the actual values when ``amap`` is given).
    """
    t = float(threshold) if threshold is not None else float("nan")
    if math.isfinite(t) and t > 0:
        return 0.0, 2.0 * t
    if amap is None:
        return None, None
    a = np.asarray(amap, dtype=np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return 0.0, 1.0
    return float(a[finite].min()), float(a[finite].max())


def _fmt(x: float) -> str:
    x = float(x)
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _passes_filter(only_anomalous: bool, record: dict[str, Any]) -> bool:
    """Records without a ``decision`` (e.g. follow-ups) always pass; with it, only "NG" when filtering."""
    return not only_anomalous or record.get("decision", "NG") == "NG"


# ----------------------------------------------------------------------------------------------------------------
# fan-out


class MultiSink(SinkBase):
    """Fans ``write`` / ``write_record`` / ``write_refined`` / ``close`` out to several sinks: the run loop's one
    fan-out (``run_pipeline`` wraps its sinks in one).

    Every sink gets every call even if an earlier one raises; the first error is re-raised afterwards (the others
    are logged). :meth:`close` closes every sink.
    """

    def __init__(self, sinks: Iterable[SinkBase]) -> None:
        self.sinks = list(sinks)
        self._closed = False

    @property
    def quit_requested(self) -> bool:
        """True when any sink (e.g. the display window) asks to stop."""
        return any(s.quit_requested for s in self.sinks)

    def _fan_out(self, what: str, call: Any, sinks: list[Any]) -> None:
        first: BaseException | None = None
        for sink in sinks:
            try:
                call(sink)
            except Exception as e:  # noqa: BLE001 - every sink must get its call
                if first is None:
                    first = e
                else:
                    log.error("%s of %s failed: %s", what, type(sink).__name__, e)
        if first is not None:
            raise first

    def started(self) -> None:
        """``started`` on every sink."""
        self._fan_out("started", lambda s: s.started(), self.sinks)

    def stopping(self) -> None:
        """``stopping`` on every sink."""
        self._fan_out("stopping", lambda s: s.stopping(), self.sinks)

    def write(self, result: FrameResult) -> None:
        """``write`` on every sink."""
        self._fan_out("write", lambda s: s.write(result), self.sinks)

    def write_record(self, record: dict[str, Any]) -> None:
        """``write_record`` on every sink."""
        self._fan_out("write_record", lambda s: s.write_record(record), self.sinks)

    def write_refined(self, frame_id: int, name: str | None, source: str, mask: np.ndarray,
                      repaired: np.ndarray | None = None) -> dict[str, str | None]:
        """``write_refined`` on every sink; the saved file paths merged (first non-None wins)."""
        files: dict[str, str | None] = {}

        def save(sink: Any) -> None:
            for key, value in sink.write_refined(frame_id, name, source, mask, repaired).items():
                if files.get(key) is None:
                    files[key] = value

        self._fan_out("write_refined", save, self.sinks)
        return files

    def limit_drain(self, seconds: float) -> None:
        """``limit_drain`` on every sink."""
        self._fan_out("limit_drain", lambda s: s.limit_drain(seconds), self.sinks)

    def close(self) -> None:
        """Close every sink, the quick ones (JSONL, MQTT, webhook) before those with frames still to write (video,
        flagged folder), even if one raises: the error is logged, the first re-raised at the end."""
        if self._closed:
            return
        self._closed = True
        first: BaseException | None = None
        for sink in sorted(self.sinks, key=lambda s: s.slow_close):  # stable: same order otherwise
            try:
                sink.close()
            except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt during close must not skip the rest
                log.error("closing %s failed: %s", type(sink).__name__, e)
                if first is None:
                    first = e
        if first is not None:
            raise first
