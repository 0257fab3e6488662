"""Annotated frames: the overlay drawing, the segmented overlay video and the live display window."""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gradad.errors import GradError
from gradad.imaging import heatmap_overlay, map_2d, to_bgr_uint8
from gradad.runtime.sinks.background import OffloadedSink
from gradad.runtime.sinks.base import NG_COLOR_BGR, OK_COLOR_BGR, SinkBase, _CONTOUR_COLOR_BGR, _TEXT_COLOR_BGR, _fmt, map_display_range
from gradad.runtime.types import FrameResult

log = logging.getLogger("gradad.runtime.sinks")


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
    amap = map_2d(result.anomaly_map)
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


#: Longest side of the annotated pictures the video and the flagged folder's overlay get by default (a 12 MP
#: camera's full-size overlay took seconds per frame to draw and encode; the flagged folder keeps the original).
OVERLAY_MAX_SIDE = 1920


def fit_within(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` scaled down (area interpolation) so that its longer side is at most ``max_side`` (0: as it is)."""
    h, w = image.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


_Drawing = tuple["weakref.ref[FrameResult]", threading.Event, list[np.ndarray]]  # whose, drawn yet, the picture


class _OverlayCache:
    """The annotated pictures of the newest few results: with both ``--video`` and ``--save-flagged`` (each on its
    own writer thread) a frame's overlay is drawn once; the second sink waits for the first's drawing instead of
    drawing it again. Keyed by the result object's id, checked through a weak reference (the cache never keeps a
    multi-megapixel frame alive; a reused id of a dead result is a miss)."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[int, int], _Drawing] = collections.OrderedDict()

    def get(self, result: FrameResult, max_side: int) -> np.ndarray:
        """:func:`annotate_frame` of ``result`` on its image scaled by :func:`fit_within` (do not modify it)."""
        key = (id(result), int(max_side))
        with self._lock:
            entry = self._entries.get(key)
            drawer = entry is None or entry[0]() is not result
            if drawer:
                entry = self._entries[key] = (weakref.ref(result), threading.Event(), [])
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)
        _, ready, picture = entry
        if drawer:
            try:
                picture.append(annotate_frame(result, fit_within(result.frame.image, max_side)))
            finally:
                ready.set()
        else:
            ready.wait()
        # the drawer failed: draw here too, so this sink gets (and reports) the error itself
        return picture[0] if picture else annotate_frame(result, fit_within(result.frame.image, max_side))


capped_overlay = _OverlayCache().get


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


class VideoSink(OffloadedSink):
    """Writes :func:`annotated <annotate_frame>` frames to video **segments** that survive a crash.

    ``path`` ``run.mp4`` is written as ``run.000.mp4``, ``run.001.mp4``, ...: a new segment starts every
    ``segment_s`` seconds (wall clock) and the finished one is closed, so it is complete and playable. SIGKILL, a
    power cut or a full disk can only lose the segment in progress (an MP4 needs its index, written at close);
    with ``.mkv`` or ``.avi`` (MJPEG) the segment in progress stays playable up to its last few hundred KB.
    ``segment_s=0`` writes the single file ``path`` (lost entirely if the process is killed). A segment is closed
    when it is due even if no frame comes (an idle camera), so frames written hours ago are never at risk.

    Each finished segment is reopened and its frame count checked: a segment the disk could not hold, a writer
    that fails or a segment that cannot be started is logged as an error, the video is reported incomplete
    (:meth:`report`) and the run goes on without video. The folder and codec are checked when the sink is created.
    The writer size is the first frame's, scaled down to ``max_side`` pixels on its longer side (0: full size);
    later frames of another size (several sources) are resized to it. With ``queue_size > 0`` the frames are drawn,
    encoded and written on a thread of the sink's own (a :class:`~gradad.runtime.sinks.background.BackgroundWriter`):
    :meth:`write` never waits, a full queue drops the frame (``dropped``, reported), :meth:`close` writes every
    queued frame first (within :meth:`limit_drain`'s time after a stop signal) and finishes the segment in
    progress even when interrupted.
    Nothing is overwritten: segments of an earlier run with the same name stay, this run's numbering continues
    after them (``run.005.mp4`` after ``run.004.mp4``); a single file (``segment_s=0``) that exists is refused.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 10.0, fourcc: str | None = None,
                 segment_s: float = 60.0, max_side: int = OVERLAY_MAX_SIDE, queue_size: int = 0,
                 drop_when_full: bool = True) -> None:
        self.path = Path(path)
        if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 0:
            raise GradError(f"video max side must be a number of pixels >= 0 (0 = full size), got {max_side!r}")
        self.max_side = max_side
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
        self._closed = False  # write() refuses
        self._finished = False  # the last segment is closed (set after the queued frames are written)
        if self.segment_s <= 0 and self.path.exists():
            raise GradError(f"--video {self.path} exists: choose another name (or segments, --video-segment > 0, "
                            f"which continue after earlier ones)")
        self._first_index = self._next_free_index()
        self._probe()
        self._idle_stop = threading.Event()
        if self.segment_s > 0:  # an idle camera writes nothing: this thread still closes a segment when it is due
            threading.Thread(target=self._close_due_segments, name="gradad-video-segments", daemon=True).start()
        self._offload(f"video {self.path}", self._write_now, queue_size, drop_when_full)

    def _close_due_segments(self) -> None:
        """Finish the segment in progress once it is ``segment_s`` old even when no frame comes (a camera
        waiting for the next part): a crash then loses no frame written before that."""
        while not self._idle_stop.wait(min(1.0, self.segment_s / 4)):
            with self._lock:
                if self._writer is not None and time.monotonic() - self._segment_start >= self.segment_s:
                    self._finish_segment()

    def _next_free_index(self) -> int:
        """One past the highest segment number of this name already in the folder (0 when there is none)."""
        pattern = re.compile(rf"{re.escape(self.path.stem)}\.(\d{{3,}}){re.escape(self.path.suffix)}")
        try:
            names = os.listdir(self.path.parent) if self.path.parent.is_dir() else []
        except OSError:
            names = []
        taken = [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]
        return max(taken) + 1 if taken else 0

    def _segment_path(self, index: int) -> Path:
        if self.segment_s <= 0:
            return self.path
        return self.path.with_name(f"{self.path.stem}.{self._first_index + index:03d}{self.path.suffix}")

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
            if not self.files and self._background is None:  # on the writer thread it would be one error per frame
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
        """Annotate and append one frame (to a new segment when the current one is ``segment_s`` old), here or,
        with a queue, on the writer thread."""
        if self._closed:
            raise RuntimeError(f"VideoSink({self.path}) is closed")
        if self._background is not None:
            self._background.submit(result, nbytes=result.frame.nbytes)
        else:
            self._write_now(result)

    def _write_now(self, result: FrameResult) -> None:
        frame = capped_overlay(result, self.max_side)
        with self._lock:
            if self._finished:  # a write racing close() from another thread: never a segment after the last
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
        """Files, frames written, lost (writer failures) and dropped (a full queue), and whether every segment was
        verified complete and no frame dropped (for the summary)."""
        return {"files": [str(f) for f in self.files], "frames": self.frames_written,
                "frames_lost": self.frames_lost, "dropped": self.dropped,
                "complete": not self.incomplete and not self.dropped, "problems": list(self.incomplete)}

    def close(self) -> None:
        """Write the queued frames, finish the segment in progress and log what the video holds. Idempotent."""
        if self._closed:
            return
        self._closed = True  # write() refuses from now on; the queued frames are still written
        try:
            if self._background is not None:
                self._background.close()
        finally:  # also after a second Ctrl-C during the drain: the segment in progress stays playable
            self._idle_stop.set()
            with self._lock:
                self._finished = True
                self._finish_segment()
        slow = self.dropped - self.dropped_at_stop
        if slow:
            self.incomplete.append(f"{slow} frames dropped: writing the video did not keep up with the "
                                   f"camera (a smaller --video-max-side costs less)")
        if self.dropped_at_stop:
            self.incomplete.append(f"{self.dropped_at_stop} queued frames not written: the run was stopped by a "
                                   f"signal and the drain's time ran out")
        if self.incomplete:
            log.error("video INCOMPLETE: %d frames written to %d file(s), %d frames not written; %s",
                      self.frames_written, len(self.files), self.frames_lost, "; ".join(self.incomplete))
        elif self.files:
            log.info("video %s: %d frames in %d file(s), each checked playable", self.path, self.frames_written,
                     len(self.files))


class DisplaySink(SinkBase):
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
