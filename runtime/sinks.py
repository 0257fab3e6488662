"""Where the runtime's results go: JSON lines, an annotated window/video, a flagged-frame folder, MQTT, webhooks.

Every sink follows the :class:`gradad.runtime.types.Sink` protocol (``write(result)``, ``close()``); sinks that
carry plain records also have ``write_record(dict)`` for follow-up records of an already written frame (e.g. a
refined mask). ``close()`` is idempotent and flushes everything, so the run loop may call it from its ``finally``
after Ctrl-C / SIGTERM and no record is lost. Every sink is also a context manager.

Only numpy, OpenCV and the standard library are imported here; ``paho-mqtt`` (for :class:`MqttSink`) is an
optional dependency imported when that sink is created. Never torch or timm.

Colour convention: :func:`annotate_frame` scales the anomaly map to the fixed range ``[0, 2 * threshold]`` (the
threshold sits in the middle of the JET scale, green-yellow), so colours mean the same in every frame and every
run with the same calibration.
"""

from __future__ import annotations

import base64
import collections
import errno
import io
import ipaddress
import json
import logging
import math
import os
import re
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any, Iterable

import cv2
import numpy as np

from gradad.data.datasets import IMAGE_EXTENSIONS
from gradad.errors import GradError
from gradad.files import atomic_write_bytes
from gradad.imaging import heatmap_overlay, map_to_uint8, to_bgr_uint8
from gradad.runtime.types import FrameResult
from gradad.urls import redact_url, redact_urls_in

__all__ = [
    "JsonlSink",
    "VideoSink",
    "DisplaySink",
    "FlaggedFrameSink",
    "WebhookSink",
    "MqttSink",
    "MultiSink",
    "annotate_frame",
    "map_display_range",
    "record_to_json",
]

log = logging.getLogger(__name__)

#: Banner colours (BGR): NG red, OK green; text is white.
NG_COLOR_BGR = (0, 0, 220)
OK_COLOR_BGR = (0, 170, 0)
_TEXT_COLOR_BGR = (255, 255, 255)
_CONTOUR_COLOR_BGR = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------------
# helpers


class _SinkBase:
    """Context-manager support and the ``closed`` flag shared by every sink."""

    _closed: bool = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:  # pragma: no cover - overridden
        self._closed = True

    def __enter__(self) -> "_SinkBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
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


def _map2d(amap: np.ndarray) -> np.ndarray:
    a = np.squeeze(np.asarray(amap, dtype=np.float32))
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {np.asarray(amap).shape}")
    return a


def _fmt(x: float) -> str:
    x = float(x)
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _passes_filter(only_anomalous: bool, record: dict[str, Any]) -> bool:
    """Records without a ``decision`` (e.g. follow-ups) always pass; with it, only "NG" when filtering."""
    return not only_anomalous or record.get("decision", "NG") == "NG"


# ----------------------------------------------------------------------------------------------------------------
# JSON lines


class JsonlSink(_SinkBase):
    """One JSON line per frame (``FrameResult.to_record()``), plus follow-up records via :meth:`write_record`.

    * The file is opened in **append** mode and never truncated: records of earlier runs are kept (data is never
      lost); start a new file name per run if you want one file per run. If the existing file ends in a partial
      line (a previous run was killed mid-write), a newline is added first so every new line parses.
    * Every line is flushed as soon as it is written: SIGKILL or a power cut loses at most the line being
      written (plus whatever the OS had not yet written to disk, see ``fsync_every``); SIGTERM / Ctrl-C, which
      end in :meth:`close`, lose nothing.
    * ``fsync_every=N`` (>0) also calls ``os.fsync`` every N lines (durability against power loss, at a cost);
      :meth:`close` always flushes and fsyncs.
    * A write that fails (disk full, I/O error) cuts the file back to its last complete line and raises one
      :class:`GradError` naming the file: the file never ends in a partial line written by this run.
    * ``path == "-"`` writes to standard output (never closed by this sink).
    * Thread-safe: the camera loop and a refinement worker may write concurrently; lines never interleave.
    """

    def __init__(self, path: str | os.PathLike[str], fsync_every: int = 0) -> None:
        if int(fsync_every) < 0:
            raise GradError(f"fsync_every must be >= 0, got {fsync_every}")
        self.path = str(path)
        self.fsync_every = int(fsync_every)
        self.lines_written = 0
        self._lock = threading.Lock()
        self._closed = False
        self._own_file = self.path != "-"
        if not self._own_file:
            self._fh: IO[Any] = sys.stdout
            return
        p = Path(self.path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = False
            if p.is_file() and p.stat().st_size > 0:
                with open(p, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._fh = open(p, "ab", buffering=0)  # unbuffered: a line is on disk (page cache) when written
            self._good_size = p.stat().st_size
            if needs_newline:
                log.warning("%s ends in a partial line (an interrupted run): starting on a new line", p)
                self._append(b"\n")
        except OSError as e:
            raise GradError(f"cannot open JSONL output {p} for appending: {e.strerror or e}") from e
        log.debug("JSONL sink appending to %s", p)

    def write(self, result: FrameResult) -> None:
        """Append the frame's record (one line, flushed)."""
        self.write_record(result.to_record())

    def write_record(self, record: dict[str, Any]) -> None:
        """Append any JSON-serialisable dict as one line (e.g. a refined follow-up for an earlier frame id)."""
        line = record_to_json(record) + "\n"
        with self._lock:
            if self._closed:
                raise RuntimeError(f"JsonlSink({self.path}) is closed: record for frame "
                                   f"{record.get('frame_id')} not written")
            if self._own_file:
                self._append(line.encode("utf-8"))
            else:
                self._fh.write(line)
                self._fh.flush()
            self.lines_written += 1
            if self.fsync_every and self.lines_written % self.fsync_every == 0:
                self._fsync()

    def _append(self, data: bytes) -> None:
        """Write ``data`` completely, or cut the file back to its last complete line and raise one GradError."""
        try:
            view = memoryview(data)
            while view:
                n = self._fh.write(view)
                if not n:  # a regular file that takes nothing more
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[n:]
        except OSError as exc:
            try:
                os.ftruncate(self._fh.fileno(), self._good_size)
                kept = "the file ends at its last complete line"
            except OSError:
                kept = "the file may end in a partial line"
            raise GradError(f"cannot write JSONL output {self.path}: {exc.strerror or exc} after {self.lines_written} "
                            f"line(s) of this run; {kept}") from exc
        self._good_size += len(data)

    def _fsync(self) -> None:
        try:
            os.fsync(self._fh.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):  # pipes, terminals, pytest capture
            pass

    def close(self) -> None:
        """Flush, fsync and close the file (stdout is flushed only). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._fh.flush()
                if self._own_file:
                    self._fsync()
            finally:
                if self._own_file:
                    self._fh.close()
        log.debug("JSONL sink %s closed after %d lines", self.path, self.lines_written)


# ----------------------------------------------------------------------------------------------------------------
# annotated frames


def _banner_text(result: FrameResult, width: int, height: int) -> tuple[str, float, int]:
    font = cv2.FONT_HERSHEY_SIMPLEX
    decision = result.decision
    refined = " refined" if result.refined else ""
    candidates = [
        f"{decision}  score {_fmt(result.score)}  thr {_fmt(result.threshold)}{refined}",
        f"{decision} {_fmt(result.score)}/{_fmt(result.threshold)}",
        decision,
    ]
    (_, h1), _ = cv2.getTextSize("NG", font, 1.0, 1)
    scale = max(0.25, 0.6 * height / max(h1, 1))
    thick = max(1, round(scale * 1.5))
    for text in candidates:
        (tw, _), _ = cv2.getTextSize(text, font, scale, thick)
        if tw <= width - 8:
            return text, scale, thick
        s = scale * (width - 8) / max(tw, 1)
        if s >= 0.3:
            return text, s, max(1, round(s * 1.5))
    return decision, 0.25, 1


def annotate_frame(result: FrameResult, image_rgb: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """The display/video picture of a result: a BGR uint8 image of the frame's size.

    * JET heat-map of ``result.anomaly_map`` (resized to the frame) blended with weight ``alpha`` over the frame
      (``image_rgb``, default ``result.frame.image``, RGB). The map range is fixed to ``[0, 2 * threshold]``
      (:func:`map_display_range`) so a colour means the same score in every frame: blue = 0, the threshold
      mid-scale, red >= 2x the threshold.
    * When ``result.pixel_threshold`` is set, a white contour around ``map > pixel_threshold``.
    * A banner over the top rows: "OK" on green or "NG" on red, with the score and threshold.
    """
    image = result.frame.image if image_rgb is None else image_rgb
    bgr = to_bgr_uint8(image)
    h, w = bgr.shape[:2]
    amap = _map2d(result.anomaly_map)
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    vmin, vmax = map_display_range(result.threshold, amap)
    out = heatmap_overlay(bgr, amap, vmin=vmin, vmax=vmax, alpha=alpha, channel_order="bgr")
    out = np.ascontiguousarray(out)

    if result.pixel_threshold is not None and math.isfinite(float(result.pixel_threshold)):
        mask = (np.nan_to_num(amap, nan=-np.inf) > float(result.pixel_threshold)).astype(np.uint8)
        if mask.any():
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, _CONTOUR_COLOR_BGR, max(1, round(min(h, w) / 240)), cv2.LINE_AA)

    bh = min(h, max(14, min(40, round(h * 0.07))))
    color = NG_COLOR_BGR if result.is_anomalous else OK_COLOR_BGR
    cv2.rectangle(out, (0, 0), (w - 1, bh - 1), color, thickness=-1)
    text, scale, thick = _banner_text(result, w, bh)
    (_, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.putText(out, text, (4, (bh + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, _TEXT_COLOR_BGR, thick,
                cv2.LINE_AA)
    return out


#: Default FOURCC per video container; others get "mp4v".
_FOURCC_BY_SUFFIX = {".avi": "MJPG", ".mkv": "MJPG", ".mp4": "mp4v", ".mov": "mp4v"}


def _readable_frames(path: Path) -> int:
    """Frames a player finds in a finished video file: the container's count, or 1 when it opens and decodes
    a frame but announces no count (0 when it does not open at all)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return 0
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        if math.isfinite(count) and count > 0:
            return int(count)
        ok, _ = cap.read()
        return int(ok)
    finally:
        cap.release()


class VideoSink(_SinkBase):
    """Writes :func:`annotated <annotate_frame>` frames to video **segments** that survive a crash.

    ``path`` ``run.mp4`` is written as ``run.000.mp4``, ``run.001.mp4``, ...: a new segment starts every
    ``segment_s`` seconds (wall clock) and the finished one is closed, so it is complete and playable. SIGKILL, a
    power cut or a full disk can only lose the segment in progress (an MP4 needs its index, written at close);
    with ``.mkv`` or ``.avi`` (MJPEG) the segment in progress stays playable up to its last few hundred KB.
    ``segment_s=0`` writes the single file ``path`` (lost entirely if the process is killed).

    Each finished segment is reopened and its frame count checked: a segment the disk could not hold, a writer
    that fails or a segment that cannot be started is logged as an error, the video is reported incomplete
    (:meth:`report`) and the run goes on without video. The folder and codec are checked when the sink is created.
    The writer size is the first frame's; later frames of another size (several sources) are resized to it.
    Existing segment files of the same name are overwritten.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 10.0, fourcc: str | None = None,
                 segment_s: float = 60.0) -> None:
        self.path = Path(path)
        fourcc = fourcc or _FOURCC_BY_SUFFIX.get(self.path.suffix.lower(), "mp4v")
        if not isinstance(fourcc, str) or len(fourcc) != 4:
            raise GradError(f"video codec must be a 4-character FOURCC such as 'mp4v' or 'MJPG', got {fourcc!r}")
        if not (float(fps) > 0) or not math.isfinite(float(fps)):
            raise GradError(f"video fps must be a finite number > 0, got {fps}")
        if not (float(segment_s) >= 0) or not math.isfinite(float(segment_s)):
            raise GradError(f"video segment length must be >= 0 seconds, got {segment_s}")
        self.fps, self.fourcc, self.segment_s = float(fps), fourcc, float(segment_s)
        self.size: tuple[int, int] | None = None  # (width, height)
        self.frames_written = 0
        self.frames_lost = 0  # frames not written after a failure
        self.files: list[Path] = []
        self.incomplete: list[str] = []  # one reason per lost or short segment
        self._writer: cv2.VideoWriter | None = None
        self._segment_frames = 0
        self._segment_start = 0.0
        self._failed = False
        self._lock = threading.Lock()
        self._closed = False
        self._probe()

    def _segment_path(self, index: int) -> Path:
        if self.segment_s <= 0:
            return self.path
        return self.path.with_name(f"{self.path.stem}.{index:03d}{self.path.suffix}")

    def _new_writer(self, path: Path, width: int, height: int) -> cv2.VideoWriter:
        """An opened writer for ``path``, else one GradError naming the file, codec and folder."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GradError(f"cannot create the folder of video output {path}: {e.strerror or e}") from e
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (width, height))
        if not writer.isOpened():
            writer.release()
            raise GradError(f"cannot open video writer for {path} with codec '{self.fourcc}' ({width}x{height} @ "
                            f"{self.fps:g} fps): try another codec (mp4v for .mp4, MJPG for .avi) or check that the "
                            f"folder is writable")
        return writer

    def _probe(self) -> None:
        """Fail at start, not after the first frame, when the folder or the container/codec cannot be written."""
        probe = self.path.with_name(f".{self.path.stem}.probe{os.getpid()}{self.path.suffix}")
        try:
            writer = self._new_writer(probe, 32, 32)
            writer.write(np.zeros((32, 32, 3), np.uint8))
            writer.release()
        except GradError:
            raise GradError(f"--video {self.path}: cannot write a video there with codec '{self.fourcc}' (check "
                            f"that the folder is writable; mp4v suits .mp4, MJPG .avi/.mkv)") from None
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:  # the folder itself is not usable: already reported
                pass

    def _start_segment(self, width: int, height: int) -> None:
        path = self._segment_path(len(self.files))
        try:
            self._writer = self._new_writer(path, width, height)
        except GradError as exc:
            if not self.files:
                raise
            self._fail(f"cannot start video segment {path}: {exc}")
            return
        self.files.append(path)
        self._segment_frames, self._segment_start = 0, time.monotonic()
        log.info("writing annotated video %s (%dx%d @ %g fps, %s)", path, width, height, self.fps, self.fourcc)

    def _finish_segment(self) -> None:
        """Close the segment in progress and check what a player will find in it."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        path, written = self.files[-1], self._segment_frames
        try:
            writer.release()
        except cv2.error as exc:
            log.debug("releasing %s: %s", path, exc)
        readable = _readable_frames(path)
        if readable < min(written, 1) or (readable > 1 and readable < written):
            reason = f"{path}: {readable} of {written} frames readable (disk full or write error?)"
            self.incomplete.append(reason)
            log.error("video segment incomplete: %s", reason)
        else:
            log.debug("video segment %s closed: %d frames", path, written)

    def _fail(self, reason: str) -> None:
        """Stop writing video after an error; the run itself goes on."""
        self._failed = True
        self.incomplete.append(reason)
        log.error("video stopped, the rest of the run has no video: %s", reason)

    def _rotate_if_due(self, width: int, height: int) -> None:
        if self._writer is not None and 0 < self.segment_s <= time.monotonic() - self._segment_start:
            self._finish_segment()
        if self._writer is None and not self._failed:
            self._start_segment(width, height)

    def write(self, result: FrameResult) -> None:
        """Annotate and append one frame (to a new segment when the current one is ``segment_s`` old)."""
        frame = annotate_frame(result)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"VideoSink({self.path}) is closed")
            h, w = frame.shape[:2]
            self.size = self.size or (w, h)
            self._rotate_if_due(*self.size)
            if self._writer is None:
                self.frames_lost += 1
                return
            if (w, h) != self.size:
                frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
            try:
                self._writer.write(frame)
            except cv2.error as exc:
                self.frames_lost += 1
                self._finish_segment()
                self._fail(f"writing {self.files[-1]} failed: {' '.join(str(exc).split())}")
                return
            self._segment_frames += 1
            self.frames_written += 1

    def report(self) -> dict[str, Any]:
        """Files, frames written and lost, and whether every segment was verified complete (for the summary)."""
        return {"files": [str(f) for f in self.files], "frames": self.frames_written,
                "frames_lost": self.frames_lost, "complete": not self.incomplete, "problems": list(self.incomplete)}

    def close(self) -> None:
        """Finish the segment in progress and log what the video holds. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finish_segment()
        if self.incomplete:
            log.error("video INCOMPLETE: %d frames written to %d file(s), %d frames not written; %s",
                      self.frames_written, len(self.files), self.frames_lost, "; ".join(self.incomplete))
        elif self.files:
            log.info("video %s: %d frames in %d file(s), each checked playable", self.path, self.frames_written,
                     len(self.files))


class DisplaySink(_SinkBase):
    """Shows :func:`annotate_frame` pictures in an OpenCV window (``imshow`` + ``waitKey(1)``).

    Raises :class:`GradError` at construction on a headless machine (Linux without ``DISPLAY`` /
    ``WAYLAND_DISPLAY``, or an OpenCV built without GUI such as opencv-python-headless). :attr:`quit_requested`
    becomes True when 'q' or Esc is pressed or the window is closed; the run loop should stop then.
    """

    _NO_DISPLAY = "no display available: use --video OUT.mp4 instead"

    def __init__(self, window: str = "gradad") -> None:
        self.window = window
        self._quit = False
        self._closed = False
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise GradError(f"{self._NO_DISPLAY} (DISPLAY is not set)")
        try:
            cv2.namedWindow(window, cv2.WINDOW_NORMAL)
        except cv2.error as e:
            raise GradError(f"{self._NO_DISPLAY} (this OpenCV has no GUI support, e.g. "
                            f"opencv-python-headless)") from e

    @property
    def quit_requested(self) -> bool:
        """True after 'q' / Esc was pressed in the window or the window was closed."""
        return self._quit

    def write(self, result: FrameResult) -> None:
        """Show the annotated frame and poll the keyboard (1 ms)."""
        if self._closed:
            return
        cv2.imshow(self.window, annotate_frame(result))
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), ord("Q"), 27):
            self._quit = True
        try:
            if cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) < 1:
                self._quit = True
        except cv2.error:
            pass

    def close(self) -> None:
        """Close the window. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            cv2.destroyWindow(self.window)
            cv2.waitKey(1)
        except cv2.error:
            pass


# ----------------------------------------------------------------------------------------------------------------
# flagged-frame folder

_KINDS = ("orig.png", "overlay.jpg", "map.npy", "map.png")
_REFINED_KINDS = {"mask_file": "refined_mask.png", "repaired_file": "repaired.png"}  # follow-up field -> kind
_ALL_KINDS = _KINDS + tuple(_REFINED_KINDS.values())
_NAME_RE = re.compile(r"^(?P<key>\d{8,}_[A-Za-z0-9_-]+?)_(?P<kind>"
                      + "|".join(re.escape(k) for k in _ALL_KINDS) + r")$")
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.tmp\d*$")  # gradad.files.atomic_file's temporary names


def _safe_name(name: str | None, source: str) -> str:
    """A file-name-safe ``[A-Za-z0-9_-]`` rendering of the frame's name (or source), at most 60 characters."""
    s = str(name) if name else str(source)
    s = os.path.basename(s.replace("\\", "/").rstrip("/")) or s
    low = s.lower()
    for ext in IMAGE_EXTENSIONS:  # frame names come from image folders/globs: only readable kinds occur
        if low.endswith(ext) and len(s) > len(ext):
            s = s[: -len(ext)]
            break
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_")
    s = re.sub(r"_+", "_", s)[:60].strip("_")
    return s or "frame"


class FlaggedFrameSink(_SinkBase):
    """Saves anomalous frames to a folder, with bounded disk use.

    For every result with ``is_anomalous`` (and, with ``save_normal_every=N > 0``, every N-th normal result, for
    audits) it writes four files named ``<frame_id:08d>_<name>_`` + ``orig.png`` (the frame), ``overlay.jpg``
    (:func:`annotate_frame`), ``map.npy`` (the raw float32 anomaly map at model resolution) and ``map.png``
    (the map as 8-bit grey, scaled from ``[0, 2 * threshold]``). ``<name>`` is the frame's file name (or its
    source) reduced to ``[A-Za-z0-9_-]``.

    * Every file is written atomically (a hidden ``.<file>.tmp<pid>`` then ``os.replace``): readers never see
      partial files.
    * Disk use: the total size of its files is kept <= ``max_bytes`` (and the number of saved frames <=
      ``max_files`` if given) by deleting the **oldest** saved frames (by modification time) before writing a
      new one; ``evicted`` counts deleted frames. A frame larger than ``max_bytes`` by itself is not saved
      (``skipped``).
    * It only ever deletes files matching its own naming pattern directly inside ``folder`` (and its own stale
      ``.tmp`` files); nothing else in the folder, and no sub-folder, is touched or counted.
    * At start it indexes its own files already in the folder, so the limits hold across runs. Frame ids restart
      at 0 every run: a frame whose file names exist from an earlier run gets a ``-2``, ``-3``, ... suffix on its
      name instead of overwriting them; writing the same frame twice in one run (e.g. refined) overwrites.
    * Disk errors (full, read-only) are logged and counted in ``errors``; they do not stop the camera loop.
    * :meth:`write_refined` adds a refined mask (``refined_mask.png``, 0/255 at model resolution) and the repaired
      image (``repaired.png``) to a frame saved earlier in this run (``grad-run --refine``); they share the frame's
      disk budget and are evicted with it.
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int = 1 << 30, max_files: int | None = None,
                 save_normal_every: int = 0, jpeg_quality: int = 90) -> None:
        if int(max_bytes) <= 0:
            raise GradError(f"flagged-frame max_bytes must be > 0, got {max_bytes}")
        if max_files is not None and int(max_files) < 1:
            raise GradError(f"flagged-frame max_files must be >= 1 or None, got {max_files}")
        if int(save_normal_every) < 0:
            raise GradError(f"save_normal_every must be >= 0, got {save_normal_every}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.max_files = None if max_files is None else int(max_files)
        self.save_normal_every = int(save_normal_every)
        self.jpeg_quality = int(jpeg_quality)
        self.saved = 0
        self.evicted = 0
        self.skipped = 0
        self.errors = 0
        self._normal_seen = 0
        self._lock = threading.Lock()
        self._closed = False
        # key -> {kind: size}; insertion order = age (oldest first)
        self._index: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        self._run_keys: dict[str, str] = {}  # base key of this run -> actual key on disk (frames still on disk)
        self._base_of: dict[str, str] = {}  # actual key -> base key, to forget evicted frames (24/7 runs)
        self.total_bytes = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GradError(f"cannot create flagged-frame folder {self.folder}: {e.strerror or e}") from e
        if not self.folder.is_dir():
            raise GradError(f"flagged-frame folder {self.folder} is not a directory")
        self._scan()

    # -- index ---------------------------------------------------------------------------------------------------

    def _scan(self) -> None:
        groups: dict[str, dict[str, int]] = {}
        mtimes: dict[str, float] = {}
        with os.scandir(self.folder) as it:
            for entry in it:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    tmp = _TMP_RE.match(entry.name)
                    if tmp and _NAME_RE.match(tmp.group("final")):
                        os.remove(entry.path)  # our own stale temporary file from an interrupted write
                        continue
                    m = _NAME_RE.match(entry.name)
                    if not m:
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    log.warning("flagged-frame folder: cannot inspect %s: %s", entry.path, e)
                    continue
                key = m.group("key")
                groups.setdefault(key, {})[m.group("kind")] = st.st_size
                mtimes[key] = max(mtimes.get(key, 0.0), st.st_mtime)
        for key in sorted(groups, key=lambda k: (mtimes[k], k)):
            self._index[key] = groups[key]
        self.total_bytes = sum(sum(v.values()) for v in self._index.values())
        if self._index:
            log.info("flagged-frame folder %s: %d earlier frames, %.1f MB", self.folder, len(self._index),
                     self.total_bytes / 1e6)

    @property
    def frames_on_disk(self) -> int:
        """Number of saved frames (file sets) this sink knows in its folder."""
        return len(self._index)

    @staticmethod
    def _base_key(frame_id: int, name: str | None, source: str) -> str:
        return f"{int(frame_id):08d}_{_safe_name(name, source)}"

    def _key_for(self, result: FrameResult) -> str:
        base = self._base_key(result.frame.frame_id, result.frame.name, result.frame.source)
        if base in self._run_keys:
            return self._run_keys[base]
        key, n = base, 1
        while key in self._index or any((self.folder / f"{key}_{k}").exists() for k in _ALL_KINDS):
            n += 1
            key = f"{base}-{n}"
        self._run_keys[base] = key
        self._base_of[key] = base
        return key

    def _remove_files(self, key: str, kinds: Iterable[str]) -> None:
        for kind in kinds:
            p = self.folder / f"{key}_{kind}"
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("flagged-frame folder: cannot delete %s: %s", p, e)

    def _evict_one(self) -> None:
        key, files = self._index.popitem(last=False)
        self._run_keys.pop(self._base_of.pop(key, ""), None)
        self._remove_files(key, files)
        self.total_bytes -= sum(files.values())
        self.evicted += 1
        log.debug("evicted flagged frame %s", key)

    # -- writing -------------------------------------------------------------------------------------------------

    def _encode(self, result: FrameResult) -> dict[str, bytes]:
        amap = _map2d(result.anomaly_map)
        ok1, orig = cv2.imencode(".png", to_bgr_uint8(result.frame.image))
        ok2, overlay = cv2.imencode(".jpg", annotate_frame(result), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        buf = io.BytesIO()
        np.save(buf, amap.astype(np.float32), allow_pickle=False)
        lo, hi = map_display_range(result.threshold, amap)
        lo = 0.0 if lo is None else lo
        hi = lo + 1.0 if hi is None or hi <= lo else hi
        grey = map_to_uint8(amap, lo, hi)
        ok3, map_png = cv2.imencode(".png", grey)
        if not (ok1 and ok2 and ok3):
            raise ValueError("OpenCV could not encode the images")
        return {"orig.png": orig.tobytes(), "overlay.jpg": overlay.tobytes(), "map.npy": buf.getvalue(),
                "map.png": map_png.tobytes()}

    def write(self, result: FrameResult) -> None:
        """Save the result's files if it is anomalous (or a sampled normal one), evicting old frames as needed."""
        if self._closed:
            raise RuntimeError(f"FlaggedFrameSink({self.folder}) is closed")
        if not result.is_anomalous:
            if self.save_normal_every <= 0:
                return
            self._normal_seen += 1
            if self._normal_seen % self.save_normal_every:
                return
        try:
            payload = self._encode(result)
        except (ValueError, cv2.error) as e:
            self.errors += 1
            log.error("flagged frame %d not saved: %s", result.frame.frame_id, e)
            return
        size = sum(len(b) for b in payload.values())
        with self._lock:
            if size > self.max_bytes:
                self.skipped += 1
                log.warning("flagged frame %d (%d bytes) is larger than max_bytes=%d: not saved",
                            result.frame.frame_id, size, self.max_bytes)
                return
            key = self._key_for(result)
            old = self._index.pop(key, None)  # same frame written again in this run: replaced
            if old is not None:
                self.total_bytes -= sum(old.values())
                self._remove_files(key, [k for k in old if k not in payload])  # e.g. a stale refined mask
            while self._index and (self.total_bytes + size > self.max_bytes
                                   or (self.max_files is not None and len(self._index) >= self.max_files)):
                self._evict_one()
            written: dict[str, int] = {}
            try:
                for kind in _KINDS:
                    atomic_write_bytes(self.folder / f"{key}_{kind}", payload[kind])
                    written[kind] = len(payload[kind])
            except OSError as e:
                self.errors += 1
                log.error("flagged frame %d not (fully) saved to %s: %s", result.frame.frame_id, self.folder, e)
            finally:
                if written:
                    self._index[key] = written
                    self.total_bytes += sum(written.values())
            if len(written) == len(_KINDS):
                self.saved += 1

    def write_refined(self, frame_id: int, name: str | None, source: str, mask: np.ndarray,
                      repaired: np.ndarray | None = None) -> dict[str, str | None]:
        """Save a refined mask (and the repaired RGB image) next to the frame this run saved with these ids.

        Returns ``{"mask_file": path or None, "repaired_file": path or None}`` for the follow-up record: None when
        the frame is not on disk (never flagged here, skipped or already evicted), the disk budget has no room
        left once every older frame is evicted, or writing failed.
        """
        files: dict[str, str | None] = dict.fromkeys(_REFINED_KINDS)
        if self._closed:
            raise RuntimeError(f"FlaggedFrameSink({self.folder}) is closed")
        try:
            payload = _encode_refined(mask, repaired)
        except (ValueError, cv2.error) as e:
            self.errors += 1
            log.error("refined mask of frame %d not saved: %s", frame_id, e)
            return files
        with self._lock:
            key = self._run_keys.get(self._base_key(frame_id, name, source))
            if key is None or key not in self._index:
                log.debug("refined mask of frame %d not saved: the frame is not in %s", frame_id, self.folder)
                return files
            if not self._make_room(key, payload):
                self.skipped += 1
                log.warning("refined mask of frame %d not saved: no room within max_bytes=%d", frame_id,
                            self.max_bytes)
                return files
            entry = self._index[key]
            for field_name, kind in _REFINED_KINDS.items():
                if kind not in payload:
                    continue
                path = self.folder / f"{key}_{kind}"
                try:
                    atomic_write_bytes(path, payload[kind])
                except OSError as e:
                    self.errors += 1
                    log.error("refined file %s not saved: %s", path, e)
                    break
                self.total_bytes += len(payload[kind]) - entry.get(kind, 0)
                entry[kind] = len(payload[kind])
                files[field_name] = str(path)
        return files

    def _make_room(self, key: str, payload: dict[str, bytes]) -> bool:
        """Evict frames older than ``key`` until ``payload`` (replacing key's files of those kinds) fits."""
        entry = self._index[key]
        extra = sum(len(b) for b in payload.values()) - sum(entry.get(kind, 0) for kind in payload)
        while self.total_bytes + extra > self.max_bytes and next(iter(self._index)) != key:
            self._evict_one()
        return self.total_bytes + extra <= self.max_bytes

    def close(self) -> None:
        """Nothing is buffered (every write is complete on return); logs a summary. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        log.info("flagged-frame folder %s: %d saved, %d evicted, %d skipped, %d errors (%d frames, %.1f MB)",
                 self.folder, self.saved, self.evicted, self.skipped, self.errors, len(self._index),
                 self.total_bytes / 1e6)


def _encode_refined(mask: np.ndarray, repaired: np.ndarray | None) -> dict[str, bytes]:
    """PNG bytes of a refined mask (0/255) and, when given, the repaired RGB image."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"refined mask must be 2-D, got shape {m.shape}")
    images = {_REFINED_KINDS["mask_file"]: (m > 0).astype(np.uint8) * 255}
    if repaired is not None:
        images[_REFINED_KINDS["repaired_file"]] = to_bgr_uint8(repaired)
    out = {}
    for kind, image in images.items():
        ok, data = cv2.imencode(".png", image)
        if not ok:
            raise ValueError(f"OpenCV could not encode {kind}")
        out[kind] = data.tobytes()
    return out


# ----------------------------------------------------------------------------------------------------------------
# network sinks


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_credentials(parsed: urllib.parse.SplitResult) -> tuple[str, dict[str, str]]:
    """(URL without ``user:password@``, HTTP Basic ``Authorization`` header for them, if any)."""
    netloc = parsed.netloc.rpartition("@")[2]
    url = urllib.parse.urlunsplit(parsed._replace(netloc=netloc))
    if "@" not in parsed.netloc:
        return url, {}
    user, _, password = parsed.netloc.rpartition("@")[0].partition(":")
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
    return url, {"Authorization": f"Basic {token}"}


def _redacted_error(exc: BaseException) -> str:
    """An exception's text with every URL in it redacted (urllib errors may quote the URL)."""
    return redact_urls_in(" ".join(str(exc).split()))


class _RecordSink(_SinkBase):
    """A sink that forwards JSON records, optionally only those of anomalous frames."""

    only_anomalous: bool = False

    def write(self, result: FrameResult) -> None:
        """Forward the frame's record (when it passes ``only_anomalous``)."""
        if self.only_anomalous and not result.is_anomalous:
            return
        self.write_record(result.to_record())

    def write_record(self, record: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class WebhookSink(_RecordSink):
    """POSTs each record as JSON (``Content-Type: application/json``) to ``url`` from a background thread.

    * The camera loop never waits on the network: records go to a bounded queue (``queue_size``); when it is
      full the **oldest** queued record is dropped (``dropped`` counts them).
    * Each POST has ``timeout_s``; a failed POST (network error, timeout, HTTP error) is retried once, then
      given up (``failed``); ``sent`` counts successes.
    * ``only_anomalous`` (default) sends only NG records (records without a ``decision`` always go).
    * :meth:`close` waits up to ``close_timeout_s`` for the queue to drain, then stops the thread; records still
      queued then are counted as dropped.
    * Proxies from the environment (``https_proxy``...) are honoured, except for loopback hosts.
    """

    def __init__(self, url: str, timeout_s: float = 2.0, queue_size: int = 1000, only_anomalous: bool = True,
                 close_timeout_s: float = 10.0, retry_delay_s: float = 0.2) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.label = redact_url(url)  # what logs and errors show: never the URL's credentials or query values
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise GradError(f"webhook URL must be http(s)://host[:port]/path, got {self.label!r}")
        if int(queue_size) < 1:
            raise GradError(f"webhook queue_size must be >= 1, got {queue_size}")
        self.url, self._headers = _split_credentials(parsed)
        self.timeout_s = float(timeout_s)
        self.queue_size = int(queue_size)
        self.only_anomalous = bool(only_anomalous)
        self.close_timeout_s = float(close_timeout_s)
        self.retry_delay_s = float(retry_delay_s)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._closed = False
        self._opener = (urllib.request.build_opener(urllib.request.ProxyHandler({}))
                        if _is_loopback(parsed.hostname) else urllib.request.build_opener())
        self._thread = threading.Thread(target=self._run, name="gradad-webhook", daemon=True)
        self._thread.start()

    def write_record(self, record: dict[str, Any]) -> None:
        """Queue any record (follow-ups included); never blocks."""
        if not _passes_filter(self.only_anomalous, record):
            return
        body = record_to_json(record).encode("utf-8")
        with self._cond:
            if self._closed:
                raise RuntimeError(f"WebhookSink({self.label}) is closed")
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("webhook %s is not keeping up: %d records dropped so far", self.label, self.dropped)
            self._queue.append(body)
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Records queued or being sent."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "gradad",
                                              **self._headers})
        with self._opener.open(req, timeout=self.timeout_s) as resp:
            resp.read()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                body = self._queue.popleft()
                self._busy = True
            try:
                for attempt in (1, 2):
                    try:
                        self._post(body)
                        self.sent += 1
                        break
                    except Exception as e:  # noqa: BLE001 - network errors must never kill the thread
                        if attempt == 2 or self._stop:
                            self.failed += 1
                            log.warning("webhook POST to %s failed: %s", self.label, _redacted_error(e))
                            break
                        log.debug("webhook POST to %s failed (%s): retrying once", self.label, _redacted_error(e))
                        time.sleep(self.retry_delay_s)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def close(self) -> None:
        """Drain the queue (at most ``close_timeout_s``), then stop the thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            deadline = time.monotonic() + self.close_timeout_s
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = len(self._queue)
            self._queue.clear()
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=2 * self.timeout_s + self.retry_delay_s + 1.0)
        if left:
            self.dropped += left
            log.warning("webhook %s: %d queued records not sent within %.1f s at shutdown", self.label, left,
                        self.close_timeout_s)
        log.info("webhook %s: %d sent, %d failed, %d dropped", self.label, self.sent, self.failed, self.dropped)


class MqttSink(_RecordSink):
    """Publishes records as JSON to an MQTT broker with ``paho-mqtt`` (optional: ``pip install paho-mqtt``).

    Connects in the constructor (waiting up to ``connect_timeout_s`` for the broker's answer: a clear
    :class:`GradError` if it cannot), then paho's background network thread (``loop_start``) sends, so
    :meth:`write` never blocks on the network. paho reconnects by itself after a lost connection; QoS 1/2
    messages published meanwhile are queued (at most ``queue_size``, beyond that they are counted in
    ``dropped``) and sent on reconnection. :meth:`close` waits up to ``close_timeout_s`` for pending publishes,
    then disconnects.
    """

    def __init__(self, host: str, port: int = 1883, topic: str = "gradad/results", qos: int = 1,
                 only_anomalous: bool = False, client_id: str | None = None, username: str | None = None,
                 password: str | None = None, keepalive: int = 30, queue_size: int = 1000,
                 connect_timeout_s: float = 5.0, close_timeout_s: float = 10.0) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as e:
            raise GradError("MQTT needs the optional dependency: pip install paho-mqtt") from e
        if qos not in (0, 1, 2):
            raise GradError(f"MQTT qos must be 0, 1 or 2, got {qos}")
        if not topic or any(c in topic for c in "#+"):
            raise GradError(f"MQTT topic must be a non-empty topic name without wildcards, got {topic!r}")
        self._mqtt = mqtt
        self.host, self.port, self.topic, self.qos = host, int(port), topic, int(qos)
        self.only_anomalous = bool(only_anomalous)
        self.close_timeout_s = float(close_timeout_s)
        self.published = 0
        self.dropped = 0
        self._pending: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._connected = threading.Event()
        self._connect_rc: Any = None

        if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt >= 2
            client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "")
        else:  # pragma: no cover - paho-mqtt 1.x
            client = mqtt.Client(client_id=client_id or "")
        if username is not None:
            client.username_pw_set(username, password)
        client.max_queued_messages_set(int(queue_size))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._client = client
        try:
            client.connect(host, self.port, keepalive=int(keepalive))
        except (OSError, ValueError) as e:
            raise GradError(f"cannot connect to MQTT broker {host}:{self.port}: {e}") from e
        client.loop_start()
        if not self._connected.wait(connect_timeout_s) or not self._rc_ok(self._connect_rc):
            client.loop_stop()
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001
                pass
            why = "no answer" if self._connect_rc is None else f"refused: {self._connect_rc}"
            raise GradError(f"cannot connect to MQTT broker {host}:{self.port} ({why})")
        log.info("MQTT: publishing to %s:%d topic %r (qos %d)", host, self.port, topic, self.qos)

    @staticmethod
    def _rc_ok(rc: Any) -> bool:
        if rc is None:
            return False
        is_failure = getattr(rc, "is_failure", None)
        return not is_failure if is_failure is not None else int(rc) == 0

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, *rest: Any) -> None:
        self._connect_rc = rc
        self._connected.set()
        if self._rc_ok(rc):
            log.debug("MQTT connected to %s:%d", self.host, self.port)
        else:
            log.warning("MQTT broker %s:%d refused the connection: %s", self.host, self.port, rc)

    def _on_disconnect(self, client: Any, userdata: Any, *args: Any) -> None:
        if not self._closed:
            log.warning("MQTT: disconnected from %s:%d (%s); reconnecting", self.host, self.port,
                        args[-2] if len(args) >= 2 else (args[0] if args else "?"))

    def _state(self, info: Any) -> bool | None:
        """True published, False still pending, None failed (not queued / no connection for QoS 0)."""
        try:
            return bool(info.is_published())
        except ValueError:  # outgoing queue full
            return None
        except RuntimeError:
            if self.qos > 0 and info.rc == self._mqtt.MQTT_ERR_NO_CONN:
                return bool(getattr(info, "_published", False))  # queued; resent on reconnection
            return None

    def _reap(self) -> None:
        while self._pending:
            state = self._state(self._pending[0])
            if state is False:
                break
            self._pending.popleft()
            if state:
                self.published += 1
            else:
                self.dropped += 1

    def write_record(self, record: dict[str, Any]) -> None:
        """Publish any record (follow-ups included); never blocks on the network."""
        if not _passes_filter(self.only_anomalous, record):
            return
        payload = record_to_json(record)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"MqttSink({self.host}:{self.port}) is closed")
            info = self._client.publish(self.topic, payload, qos=self.qos)
            self._pending.append(info)
            self._reap()

    def close(self) -> None:
        """Wait (at most ``close_timeout_s``) for pending publishes, then disconnect. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            deadline = time.monotonic() + self.close_timeout_s
            self._reap()
            while self._pending and time.monotonic() < deadline:
                time.sleep(0.01)
                self._reap()
            left = len(self._pending)
            self._pending.clear()
        self.dropped += left
        if left:
            log.warning("MQTT: %d messages not confirmed by %s:%d within %.1f s at shutdown", left, self.host,
                        self.port, self.close_timeout_s)
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        log.info("MQTT %s:%d: %d published, %d dropped", self.host, self.port, self.published, self.dropped)


# ----------------------------------------------------------------------------------------------------------------
# fan-out


class MultiSink(_SinkBase):
    """Fans ``write`` / ``write_record`` / ``close`` out to several sinks.

    Every sink gets every call even if an earlier one raises; the first error is re-raised afterwards (the others
    are logged). ``write_record`` goes to the sinks that have it. :meth:`close` closes every sink.
    """

    def __init__(self, sinks: Iterable[Any]) -> None:
        self.sinks = list(sinks)
        self._closed = False

    @property
    def quit_requested(self) -> bool:
        """True when any sink (e.g. the display window) asks to stop."""
        return any(bool(getattr(s, "quit_requested", False)) for s in self.sinks)

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

    def write(self, result: FrameResult) -> None:
        """``write`` on every sink."""
        self._fan_out("write", lambda s: s.write(result), self.sinks)

    def write_record(self, record: dict[str, Any]) -> None:
        """``write_record`` on every sink that has it."""
        self._fan_out("write_record", lambda s: s.write_record(record),
                      [s for s in self.sinks if hasattr(s, "write_record")])

    def write_refined(self, frame_id: int, name: str | None, source: str, mask: np.ndarray,
                      repaired: np.ndarray | None = None) -> dict[str, str | None]:
        """``write_refined`` on every sink that has it; the saved file paths merged (first non-None wins)."""
        files: dict[str, str | None] = {}

        def save(sink: Any) -> None:
            for key, value in sink.write_refined(frame_id, name, source, mask, repaired).items():
                if files.get(key) is None:
                    files[key] = value

        self._fan_out("write_refined", save, [s for s in self.sinks if hasattr(s, "write_refined")])
        return files

    def close(self) -> None:
        """Close every sink (even if one raises: the error is logged, the first re-raised at the end)."""
        if self._closed:
            return
        self._closed = True
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt during close must not skip the rest
                log.error("closing %s failed: %s", type(sink).__name__, e)
                if first is None:
                    first = e
        if first is not None:
            raise first
