"""Frame sources for the lean runtime: cameras, GStreamer pipelines, network streams, video files, image folders.

:func:`open_source` returns a :class:`FrameSource`: an iterator of RGB uint8 :class:`~gradad.runtime.types.Frame`
objects, a context manager, with :meth:`FrameSource.stats` (captured / delivered / dropped / skipped / ignored /
reconnects / gave_up). :func:`parse_source` says how a ``--source`` value is classified.

Live sources (camera, gstreamer, stream) are read by a daemon capture thread that keeps only the newest frame: a
slower consumer gets the latest image and the frames it never saw are counted as ``dropped`` (they still use up a
``frame_id``). A frame that cannot be read (a corrupt JPEG in an MJPEG stream) is passed over on the same
connection (``skipped``); only ``SourceConfig.read_failures`` failed reads in a row, or ``read_stall_s`` without a
good frame, count as a lost source, which is reopened with exponential back-off (``SourceConfig.reconnect_*``). An
outage is logged once when it starts, at most once a minute while it lasts and once when it ends; after
``reconnect_give_up_s`` down (or ``reconnect_attempts`` failed tries; 0 = never give up) the iteration ends with
``stats()["gave_up"] = True``. :meth:`FrameSource.poll` takes a live frame without waiting, so several cameras can
be read as one stream (``gradad.runtime.pipeline.interleave``).

File sources (video, folder, glob, image) never drop frames: a prefetch thread decodes ahead into a bounded queue; an
unreadable image or video frame is logged, counted as ``skipped`` and passed over. A video frame's name carries its
index in the file (``clip.avi#12``), also after frames lost to corruption where the reader knows the index (OpenCV's
MJPEG AVI reader; other containers count decoded frames).

Video and stream frames get the still-image decode cap (``OPENCV_IO_MAX_IMAGE_PIXELS``, ``gradad.MAX_IMAGE_PIXELS``
by default), which OpenCV does not apply to ``VideoCapture``: a source announcing larger frames is refused at open
(SourceError) and a larger decoded frame is passed over like an unreadable one (``skipped``), before it is queued.

A source that cannot be opened raises :class:`SourceError` (one line, no traceback); :class:`OpenInterrupted` when
the run's stop flag ends the open. Only numpy, OpenCV and the standard library (and :mod:`gradad.runtime.outage`)
are used here.
"""

from __future__ import annotations

import glob as _glob
import itertools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from gradad.data.datasets import IMAGE_EXTENSIONS, is_image_file, unknown_types_summary
from gradad.data.images import PIXEL_LIMIT_ENV, pixel_cap, read_image_rgb
from gradad.errors import GradError
from gradad.runtime.buffered import Buffered
from gradad.runtime.outage import GIVE_UP_TIMEOUT, MIN_BACKOFF_S, Outage, OutageWords
from gradad.runtime.types import Frame
from gradad.urls import redact_url, redact_secrets_in

logger = logging.getLogger(__name__)

#: Every ``SourceSpec.kind``.
SOURCE_KINDS: tuple[str, ...] = ("camera", "gstreamer", "stream", "video", "folder", "glob", "image")
#: Kinds read by a capture thread with the newest-frame (drop) policy and reconnection.
LIVE_KINDS: frozenset[str] = frozenset({"camera", "gstreamer", "stream"})
#: File extensions (lower-case) classified as video files.
VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpg", ".mjpeg", ".mpg", ".mpeg", ".wmv", ".flv",
    ".ts", ".m2ts", ".mts", ".3gp", ".ogv", ".h264", ".264", ".h265", ".265", ".hevc", ".y4m",
)  # fmt: skip
#: URL prefixes (lower-case) classified as network streams.
STREAM_SCHEMES: tuple[str, ...] = (
    "rtsp://", "rtsps://", "rtmp://", "rtmps://", "http://", "https://", "udp://", "tcp://", "rtp://", "srt://",
)  # fmt: skip

_GLOB_CHARS = re.compile(r"[*?\[]")
_DEV_VIDEO = re.compile(r"^/dev/video\d+$")
_POLL_S = 0.05  # how often blocking waits look at the stop flag
_SLOW_OPEN_SHARE = 0.7  # an open that fails after this share of open_timeout_s timed out (no answer): "timeout"


class SourceError(GradError):
    """A frame source that cannot be opened or read (missing file, empty folder, camera busy, bad pipeline...)."""


class OpenInterrupted(SourceError):
    """The run was stopped (Ctrl-C, SIGTERM) while a live source was still opening: not a fault of the source."""


_NATIVE_THREADS: list[threading.Thread] = []  # open/capture threads that may be blocked inside OpenCV's C++ code
_NATIVE_LOCK = threading.Lock()


def _native_thread(target: Callable[..., None], name: str, args: tuple[Any, ...] = ()) -> threading.Thread:
    """A started daemon thread calling into OpenCV, remembered for :func:`native_threads_alive`."""
    thread = threading.Thread(target=target, args=args, name=name[:60], daemon=True)
    with _NATIVE_LOCK:
        _NATIVE_THREADS[:] = [t for t in _NATIVE_THREADS if t.is_alive()] + [thread]
    thread.start()
    return thread


def native_threads_alive() -> bool:
    """True while an abandoned open or capture thread may still be blocked in OpenCV (a stream that never
    answers). Ending the interpreter then aborts the process (SIGABRT, exit code 134): the CLI exits with
    ``os._exit`` instead."""
    with _NATIVE_LOCK:
        _NATIVE_THREADS[:] = [t for t in _NATIVE_THREADS if t.is_alive()]
        return bool(_NATIVE_THREADS)


# --------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SourceConfig:
    """How a source is opened and read."""

    reconnect: bool = True  # reopen a live source that fails after it was opened
    reconnect_initial_s: float = 0.5  # wait before the first reopen try; doubled after every failed try...
    reconnect_max_s: float = 2.0  # ...up to this (short: a camera back after a blip is read again within 2 s)
    reconnect_attempts: int = 0  # failed reopen tries in a row before giving up (0 = retry forever)
    reconnect_give_up_s: float = 0.0  # seconds down (since the last good frame) before giving up (0 = never)
    read_failures: int = 10  # failed reads in a row on one connection before it counts as lost...
    read_stall_s: float = 2.0  # ...or a failed read this long after the last good frame (corrupt frames between
    # good ones are passed over on the same connection: reopening a stream costs seconds and loses frames)
    open_timeout_s: float = 10.0  # a live source must open and deliver its first frame within this time
    loop: bool = False  # start file sources again at the end (benchmarks, demos)
    prefetch: int = 4  # frames a file source decodes ahead in a thread (0 = in the consumer's thread)
    close_timeout_s: float = 2.0  # how long close() waits for the reader thread

    def __post_init__(self) -> None:
        if not self.reconnect_initial_s > 0 or not self.reconnect_max_s >= MIN_BACKOFF_S:  # NaN too
            raise SourceError(f"reconnect back-off: the first wait must be > 0 and the longest >= {MIN_BACKOFF_S:g} "
                              f"seconds (0 reopens a lost source hundreds of times a second), got "
                              f"{self.reconnect_initial_s} and {self.reconnect_max_s}")
        if self.reconnect_attempts < 0:
            raise SourceError(f"reconnect_attempts must be >= 0 (0 = forever), got {self.reconnect_attempts}")
        if not self.reconnect_give_up_s >= 0:  # NaN too
            raise SourceError(f"reconnect_give_up_s must be >= 0 seconds (0 = never), got {self.reconnect_give_up_s}")
        if self.read_failures < 1 or not self.read_stall_s > 0:
            raise SourceError(f"read_failures must be >= 1 and read_stall_s > 0, got {self.read_failures} and "
                              f"{self.read_stall_s}")
        if self.open_timeout_s <= 0:
            raise SourceError(f"open_timeout_s must be > 0 seconds, got {self.open_timeout_s}")
        if self.prefetch < 0:
            raise SourceError(f"prefetch must be >= 0, got {self.prefetch}")


@dataclass(frozen=True)
class SourceSpec:
    """A classified ``--source`` value."""

    kind: str  # one of SOURCE_KINDS
    value: int | str  # camera index or device path, pipeline, URL, file/folder path or glob pattern

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise SourceError(f"unknown source kind {self.kind!r} (expected one of {', '.join(SOURCE_KINDS)})")

    @property
    def live(self) -> bool:
        """True for camera, GStreamer and stream sources (newest-frame policy, reconnection)."""
        return self.kind in LIVE_KINDS

    @property
    def label(self) -> str:
        """One-line name for logs, errors and ``Frame.source``: credentials, query values and fragments of every
        URL in it (a stream, a GStreamer ``location=``) and secret properties (``user-pw=``) are masked
        (:mod:`gradad.urls`)."""
        if self.kind == "camera":
            return f"camera {self.value}"
        if self.kind == "stream":
            return redact_url(" ".join(str(self.value).split()))
        return redact_secrets_in(" ".join(str(self.value).split()))


def parse_source(spec: str | int | os.PathLike[str]) -> SourceSpec:
    """Classify a ``--source`` / ``--camera`` value.

    Rules, in order: an int or a string of digits is a camera index (``/dev/videoN`` is a camera too); a string
    starting with a stream scheme (:data:`STREAM_SCHEMES`) is a network stream; an existing folder is an image
    folder; an existing file is a video (:data:`VIDEO_EXTENSIONS`) or a single image (image extensions); a string
    containing ``!`` is a GStreamer pipeline; a string containing ``*``, ``?`` or ``[`` is a glob pattern (``**``
    recurses; a folder is not searched recursively). Anything else is a SourceError.
    """
    if isinstance(spec, bool):  # an int to Python, never a camera index to a user
        raise SourceError(f"invalid source: {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise SourceError(f"invalid camera index {spec} (must be 0 or more)")
        return SourceSpec("camera", spec)
    text = os.fspath(spec).strip()
    if not text:
        raise SourceError("empty source (give a camera index, pipeline, URL, video file, folder or glob)")
    if text.isdigit():
        return SourceSpec("camera", int(text))
    if _DEV_VIDEO.match(text):
        return SourceSpec("camera", text)
    if text.lower().startswith(STREAM_SCHEMES):
        return SourceSpec("stream", text)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return SourceSpec("folder", str(path))
    if path.exists():
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            return SourceSpec("video", str(path))
        if suffix in IMAGE_EXTENSIONS:
            return SourceSpec("image", str(path))
        raise SourceError(
            f"unsupported source file type {suffix or '(no extension)'!r} (expected a video "
            f"{'/'.join(VIDEO_EXTENSIONS[:6])}/... or an image {'/'.join(IMAGE_EXTENSIONS)}): {path}"
        )
    if "!" in text:
        return SourceSpec("gstreamer", " ".join(text.split()))
    if _GLOB_CHARS.search(text):
        return SourceSpec("glob", os.path.expanduser(text))
    raise SourceError(f"source not found: {text} (not a camera index, pipeline, URL, existing file/folder or glob)")


# ------------------------------------------------------------------------------------------- capture factory


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` the sources use (tests pass fakes). Live sources call ``grab()`` and
    ``retrieve()`` where the capture has them (OpenCV's do), to time the wait for a frame apart from its decoding."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


#: ``factory(kind, value, config) -> Capture``; kinds "camera", "gstreamer", "stream", "video".
CaptureFactory = Callable[[str, Any, SourceConfig], Capture]


def _open_capture(kind: str, value: int | str, config: SourceConfig) -> Capture:
    """Open a ``cv2.VideoCapture`` for a camera, pipeline, stream URL or video file (the default factory)."""
    if kind == "camera":
        cap = cv2.VideoCapture(value)
        if cap.isOpened():
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1.0)  # the driver's queue adds latency; ignored where unsupported
        return cap
    if kind == "gstreamer":
        return cv2.VideoCapture(str(value), cv2.CAP_GSTREAMER)
    if kind == "stream":
        # FFmpeg gives up opening before the open watchdog (_try_open): a stream that never answers then fails as
        # not opened, and one that sends only frames it cannot decode (its probe finds no picture size) opens and
        # fails its first reads, so the two get their own errors instead of one "no frame within N s"
        ms = int(config.open_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(ms * _SLOW_OPEN_SHARE), cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        return cv2.VideoCapture(str(value), cv2.CAP_FFMPEG, params)
    if kind == "video":
        cap = cv2.VideoCapture(str(value))
        return _avi_index_reader(str(value), cap) or cap
    raise ValueError(f"no capture for source kind {kind!r}")


def _avi_index_reader(path: str, cap: Capture) -> Capture | None:
    """OpenCV's own MJPEG AVI reader for ``path`` when it sees the same video as ``cap`` (FFmpeg), else None.

    It reads every frame through the AVI's index, so ``CAP_PROP_POS_FRAMES`` is the frame's index in the file and a
    damaged frame fails alone. FFmpeg instead resyncs past a damaged chunk and numbers what follows as if the lost
    frames never existed (its POS_FRAMES and its AVI timestamps both count decoded frames), so names would point
    early. Frame count and size must agree, so an AVI this reader only partly understands stays with FFmpeg (a
    truncated file has no index: it never opens here).
    """
    if not path.lower().endswith(".avi") or not cap.isOpened():
        return None
    try:
        alt = cv2.VideoCapture(path, cv2.CAP_OPENCV_MJPEG)
    except cv2.error:  # pragma: no cover - a build without the reader
        return None
    props = (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT)
    if alt.isOpened() and alt.get(cv2.CAP_PROP_FRAME_COUNT) > 0 and all(alt.get(p) == cap.get(p) for p in props):
        _release(cap)
        return alt
    _release(alt)
    return None


def _gstreamer_available() -> bool:
    try:
        return bool(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER))
    except Exception:  # pragma: no cover - very old OpenCV
        return "GStreamer:                   YES" in cv2.getBuildInformation()


def _to_rgb(img: np.ndarray) -> np.ndarray:
    """BGR / BGRA / gray capture output -> (H, W, 3) uint8 RGB."""
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _release(cap: Capture | None) -> None:
    if cap is None:
        return
    try:
        cap.release()
    except Exception as exc:  # pragma: no cover - defensive
        logger.debug("releasing capture failed: %s", exc)


class _FramesTooLarge(SourceError):
    """A source announcing or sending frames over the pixel limit."""


class _PixelGuard:
    """The pixel limit for one source's frames. OpenCV caps decoded still images but not ``VideoCapture`` frames: a
    small hostile video or stream can announce or send frames of up to ~268M pixels (~800 MB each, several queued by
    the file prefetch), so a source is refused when it announces such frames and a larger decoded frame is passed
    over before it is converted or queued (a stream may change size mid-way)."""

    def __init__(self, label: str) -> None:
        self.label, self.limit = label, pixel_cap()  # read once, when the source opens
        self.refused = self.passed = 0  # decoded frames over / within the limit
        self.last = (0, 0)  # width and height of the last frame refused

    def refusal(self, width: int, height: int, verb: str = "announces") -> _FramesTooLarge:
        return _FramesTooLarge(
            f"refusing {self.label}: it {verb} {width}x{height} frames ({width * height} pixels), over the limit of "
            f"{self.limit} pixels a frame (set {PIXEL_LIMIT_ENV} higher before starting to allow larger frames)")

    def announced(self, cap: Capture) -> _FramesTooLarge | None:
        """The error for a capture announcing frames over the limit, else None (an unknown size: frames are checked)."""
        width, height = _capture_prop(cap, cv2.CAP_PROP_FRAME_WIDTH), _capture_prop(cap, cv2.CAP_PROP_FRAME_HEIGHT)
        return self.refusal(width, height) if width and height and width * height > self.limit else None

    def fits(self, img: np.ndarray) -> bool:
        """True for a decoded frame within the limit; False (the source's first one logged) for one over it."""
        height, width = img.shape[:2]
        if height * width <= self.limit:
            self.passed += 1
            return True
        self.refused, self.last = self.refused + 1, (width, height)
        if self.refused == 1:
            logger.warning("%s: passing over frames over the limit of %d pixels (first: %dx%d); counted as skipped, "
                           "logged once; set %s higher to allow them", self.label, self.limit, width, height,
                           PIXEL_LIMIT_ENV)
        return False


# ---------------------------------------------------------------------------------------------- base class


class FrameSource:
    """Iterator of :class:`Frame` from one source; also a context manager. Create with :func:`open_source`."""

    def __init__(self, spec: SourceSpec, config: SourceConfig) -> None:
        self.spec = spec
        self.config = config
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {"captured": 0, "delivered": 0, "dropped": 0, "skipped": 0, "ignored": 0,
                                       "reconnects": 0, "gave_up": False}
        self._closed = False

    # -- public API
    @property
    def label(self) -> str:
        """The source's one-line name (``Frame.source``)."""
        return self.spec.label

    @property
    def live(self) -> bool:
        """True for camera, GStreamer and stream sources."""
        return self.spec.live

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        """Counters: ``captured`` (frames read from the source), ``delivered`` (returned by ``next``),
        ``dropped`` (live frames overwritten before they were read), ``skipped`` (unreadable image files or video
        frames; live: failed reads passed over on a connection that went on delivering), ``ignored`` (files of a
        folder or glob that are not images of a known type, never read), ``reconnects`` (successful reopens of a
        live source), ``gave_up`` (a live source was lost for good; ``gave_up_reason`` then says why). Live sources
        add ``outages`` (times it was lost), ``down_seconds`` (time without a connection delivering, counted from the
        last good frame) and ``connected`` (False while it is down, also when the run ended during an outage)."""
        with self._lock:
            return dict(self._stats)

    def __iter__(self) -> Iterator[Frame]:
        return self

    _interrupted = False

    def interrupt(self) -> None:
        """Make a blocked or future ``next()`` end the iteration (safe from a signal handler: sets one flag).

        ``close()`` must still be called to release the source."""
        self._interrupted = True

    def __next__(self) -> Frame:
        if self._closed or self._interrupted:
            raise StopIteration
        frame = self._next_frame()
        if frame is None:
            raise StopIteration
        self._count("delivered")
        return frame

    def poll(self) -> Frame | None:
        """The next frame if one is ready now, else None; never waits (live sources; see :meth:`watch`)."""
        raise NotImplementedError(f"{type(self).__name__} has no poll(): iterate it")

    def watch(self, event: threading.Event) -> None:
        """Have ``event`` set whenever a frame becomes ready or the source ends (live sources), so one consumer
        can wait for whichever of several sources has a frame first."""
        raise NotImplementedError(f"{type(self).__name__} has no watch(): iterate it")

    @property
    def finished(self) -> bool:
        """True once :meth:`poll` will never return a frame again (ended, closed or interrupted)."""
        return self._closed or self._interrupted

    def close(self) -> None:
        """Stop reading and release the source (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._close_impl()
        s = self.stats()
        logger.info(
            "%s closed: %d captured, %d delivered, %d dropped, %d skipped, %d reconnects",
            self.label, s["captured"], s["delivered"], s["dropped"], s["skipped"], s["reconnects"],
        )

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.kind}: {self.label})"

    # -- for subclasses
    def _next_frame(self) -> Frame | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_impl(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n


# --------------------------------------------------------------------------------------------- file sources

class _FileSource(FrameSource):
    """Video / folder / glob / image: every frame in order (no drops), optionally prefetched by a thread."""

    def __init__(
        self,
        spec: SourceSpec,
        config: SourceConfig,
        produce: Callable[[_FileSource, threading.Event], Iterator[Frame]],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(spec, config)
        self._stop = threading.Event()
        self._on_close = on_close
        gen = produce(self, self._stop)  # a generator: its body first runs on the first next()
        self._frames: Iterator[Frame] = (Buffered(gen, config.prefetch, f"gradad-prefetch-{self.label}",
                                                  stop=self._stop, size_of=attrgetter("nbytes"))
                                         if config.prefetch > 0 else gen)

    def _next_frame(self) -> Frame | None:
        return next(self._frames, None)

    def _close_impl(self) -> None:
        self._stop.set()
        if not isinstance(self._frames, Buffered):
            self._frames.close()  # type: ignore[attr-defined]
        elif not self._frames.close(self.config.close_timeout_s):  # pragma: no cover - a decode stuck in C
            logger.warning("%s: reader thread did not stop within %.1fs", self.label, self.config.close_timeout_s)
            return  # the thread still uses the capture; it releases it when it ends
        if self._on_close is not None:
            self._on_close()  # e.g. the video capture of a source closed before its first frame


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern starts from: its leading parts without wildcards (``data/**/*.png`` -> ``data``)."""
    parts = Path(pattern).parts
    fixed = list(itertools.takewhile(lambda part: not _glob.has_magic(part), parts[:-1]))
    return Path(*fixed) if fixed else Path(".")


def _unique_files(paths: list[Path], pattern: str) -> list[Path]:
    """``paths`` without those reaching an already listed file again (a symlink loop, a second link), logged."""
    seen: set[str] = set()
    kept, skipped = [], []
    for path in paths:
        real = os.path.realpath(path)
        (skipped if real in seen else kept).append(path)
        seen.add(real)
    if skipped:
        logger.warning("glob %s: skipped %d path(s) that reach an already listed file again through a symlink "
                       "(a loop or a second link), e.g. %s", pattern, len(skipped), skipped[0])
    return kept


def _list_images(spec: SourceSpec) -> tuple[list[tuple[Path, str]], int]:
    """(file, record name) of every image of a folder, glob or image source, in reading order, and how many other
    files the folder or glob holds (logged once: see :func:`_log_ignored`).

    The name is the path relative to the source root (the folder, or a glob's leading folder), so
    ``crack/000.png`` and ``good/000.png`` stay distinguishable in the records.
    """
    if spec.kind == "image":
        path = Path(str(spec.value))
        return [(path, path.name)], 0
    if spec.kind == "folder":
        folder = Path(str(spec.value))
        try:
            entries = list(folder.iterdir())
            files = sorted((p for p in entries if is_image_file(p)), key=lambda p: p.name)
        except OSError as exc:
            raise SourceError(f"cannot list folder ({exc.strerror or exc}): {folder}") from None
        ignored = _log_ignored(f"folder {folder}", entries)
        if not files:
            raise SourceError(
                f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in folder (subfolders are not searched): {folder}"
            )
        return [(p, p.name) for p in files], ignored
    pattern = str(spec.value)
    found = {Path(p) for p in _glob.glob(pattern, recursive=True)}
    hits = sorted((p for p in found if is_image_file(p)), key=str)
    files = _unique_files(hits, pattern)
    ignored = _log_ignored(f"glob {spec.label}", found)
    if not files:
        raise SourceError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) match the glob: {pattern}")
    root = _glob_root(pattern)
    return [(p, Path(os.path.relpath(p, root)).as_posix()) for p in files], ignored


def _log_ignored(where: str, paths: Iterable[Path]) -> int:
    """Count, and log once, the visible files among ``paths`` that are not images of a known type: they are never
    read, and a folder of ``.webp`` frames OpenCV could decode must not look empty or short without a word.
    Subfolders and hidden files (``.DS_Store``) are passed over by design and not counted."""
    others = sorted(p for p in paths if not p.name.startswith(".") and not is_image_file(p) and p.is_file())
    if others:
        logger.warning("%s: %s", where, unknown_types_summary(others))
    return len(others)


def _file_frames(source: _FileSource, stop: threading.Event, one_pass: Callable[[], Iterator[tuple[np.ndarray, str]]],
                 nothing_read: str) -> Iterator[Frame]:
    """Frames of a file source: ``one_pass()`` yields (RGB image, record name) once through the files (or video),
    again and again with ``SourceConfig.loop``; a pass that yields nothing raises SourceError(``nothing_read``)."""
    frame_id = 0
    while not stop.is_set():
        delivered = 0
        t0 = time.perf_counter()
        for image, name in one_pass():
            decode_ms = (time.perf_counter() - t0) * 1000.0
            source._count("captured")
            delivered += 1
            yield Frame(frame_id, time.time(), source.label, image, name=name, decode_ms=decode_ms)
            frame_id += 1
            if stop.is_set():
                return
            t0 = time.perf_counter()
        if delivered == 0:
            raise SourceError(nothing_read)
        if not source.config.loop:
            return


def _image_pass(source: _FileSource, files: list[tuple[Path, str]]) -> Iterator[tuple[np.ndarray, str]]:
    """One pass through image files; an unreadable one is logged, counted as skipped and passed over."""
    for path, name in files:
        try:
            image = read_image_rgb(path)
        except GradError as exc:
            logger.error("skipping unreadable image: %s", exc)
            source._count("skipped")
            continue
        yield image, name


#: Failed reads in a row after which a video counts as ended although its container announces more frames.
VIDEO_FAILURES_IN_A_ROW = 25


def _video_pass(source: _FileSource, caps: list[Capture | None], factory: CaptureFactory, guard: _PixelGuard
                ) -> Iterator[tuple[np.ndarray, str]]:
    """One pass through a video file: the capture opened by :func:`open_source` first, a reopened one when looping
    (``caps`` holds the open capture so the source can release it when closed early).

    A frame that cannot be decoded is passed over (``skipped``): an index-based reader says where the next frame is;
    other backends (FFmpeg: a damaged MP4 fails the damaged frame's read alone) are read on while fewer frames than
    the container announces were read, up to :data:`VIDEO_FAILURES_IN_A_ROW` failures in a row (a truncated end)."""
    path = str(source.spec.value)
    if caps[0] is None:
        caps[0] = factory("video", path, source.config)
        if not caps[0].isOpened():
            raise SourceError(f"cannot reopen video file: {path}")
        if (refused := guard.announced(caps[0])) is not None:
            raise refused
    cap, index, failed = caps[0], -1, 0  # index: the last frame's index in the file; failed: failed reads in a row
    unreadable: list[int] = []  # their indices (index-based reader), else the index of the frame before each
    announced = _capture_prop(cap, cv2.CAP_PROP_FRAME_COUNT)
    # only OpenCV's MJPEG AVI reader (see _avi_index_reader) reports a frame's index in the file; FFmpeg counts
    # decoded frames and GStreamer/MSMF may derive positions from timestamps (gaps in a clean VFR file's names)
    trusted = _backend_name(cap) == _INDEX_READER
    try:
        while True:
            try:
                ok, img = cap.read()
            except cv2.error:
                ok, img = False, None
            # the container's position after a read is the index of the next frame: the name follows the file
            # across frames lost to damage; a count of decoded frames where there is no position, the first read
            # does not leave it at 1 (another unit, a backend that does not know) or it does not move on
            pos = _capture_prop(cap, cv2.CAP_PROP_POS_FRAMES) if trusted else None
            trusted = trusted and (index >= 0 or pos == 1)
            at = pos - 1 if trusted and pos is not None and pos - 1 > index else None
            if ok and img is not None:
                unreadable += [index] * failed  # frames passed over since the last decoded one (untrusted)
                source._count("skipped", failed)
                index, failed = (at if at is not None else index + 1), 0
                if guard.fits(img):
                    yield _to_rgb(img), f"{Path(path).name}#{index}"
                else:
                    source._count("skipped")  # over the pixel limit: passed over like an unreadable frame
            elif at is not None and announced is not None and at < announced:
                index = at  # a damaged frame an index-based reader stepped over: go on after it
                unreadable.append(at)
                source._count("skipped")
            elif (not trusted and announced is not None and failed + 1 < VIDEO_FAILURES_IN_A_ROW
                  and index + len(unreadable) + failed + 2 < announced):  # frames read so far, this one included
                failed += 1  # damaged: the next read may decode again (failures at the very end are not skipped)
            else:
                break
        if guard.refused and not guard.passed:  # say why nothing came, not "corrupt or unsupported codec"
            raise guard.refusal(*guard.last, "sends")
        _warn_if_short(path, index + 1 + (0 if trusted else len(unreadable)), announced, unreadable, trusted)
    finally:
        caps[0] = None
        _release(cap)


_INDEX_READER = "CV_MJPEG"  # cv2.VideoCapture.getBackendName() of OpenCV's own MJPEG AVI reader


def _backend_name(cap: Capture) -> str | None:
    """The capture's OpenCV backend name, None for fakes and backends that do not say."""
    try:
        return str(cap.getBackendName())  # type: ignore[attr-defined]
    except Exception:
        return None


def _capture_prop(cap: Capture, prop: int) -> int | None:
    """A capture property as a whole number, None where it is unknown (fakes without get(), -1, NaN)."""
    try:
        value = float(cap.get(prop))  # type: ignore[attr-defined]
    except Exception:  # fakes without get(), backends without the property
        return None
    return int(value) if math.isfinite(value) and value >= 0 else None


def _warn_if_short(path: str, reached: int, announced: int | None, unreadable: list[int], by_index: bool) -> None:
    """Warn about frames of a video that could not be read: damaged ones in between and a missing end (``reached``,
    the frames read, < the frame count the container announces). ``by_index``: ``unreadable`` holds their indices in
    the file, which the other frames' names skip; else the index of the decoded frame before each, and the names
    after them count decoded frames (they are early by the frames lost)."""
    if unreadable:  # only ever found below a known frame count
        where, names = ((_index_ranges(unreadable), "the other frames keep their index in the file as names")
                        if by_index else
                        (f"after {_index_ranges(sorted(set(unreadable)))}", "the frames after them are named by the "
                         "count of decoded frames (this container gives no frame index), so each name is early by "
                         "the frames lost before it"))
        logger.warning("video file %s: %d of %s frames unreadable (%s; corrupt): passed over, %s", path,
                       len(unreadable), announced, where, names)
    if announced is not None and reached < announced:
        logger.warning("video file %s ended after %d of the %d frames its container announces (truncated or "
                       "corrupt): the rest is missing", path, reached, announced)


def _index_ranges(indices: list[int], most: int = 4) -> str:
    """``#7-#12, #20`` for sorted frame indices (the first ``most`` runs, then how many more)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"#{a}" if a == b else f"#{a}-#{b}" for a, b in runs[:most])
    return text + (f" and {len(runs) - most} more runs" if len(runs) > most else "")


# --------------------------------------------------------------------------------------------- live sources


def _grab(cap: Capture, label: str) -> tuple[np.ndarray | None, float, float]:
    """Read one frame: ``(image or None, began, decode_ms)``.

    ``grab()`` waits for the next frame and ``retrieve()`` decodes it: ``began`` is when grab returned and
    ``decode_ms`` the retrieve, so neither the decode nor the end-to-end latency counts the wait for a frame the
    camera has not sent yet (with FFmpeg, grab also unpacks the compressed frame; retrieve converts it). A capture
    with ``read()`` only (test fakes) cannot tell the two apart: ``began`` is when the read began and all of it
    counts as decode.
    """
    grab, retrieve = getattr(cap, "grab", None), getattr(cap, "retrieve", None)
    began = time.perf_counter()
    try:
        if grab is None or retrieve is None:
            ok, img = cap.read()
        elif grab():
            began = time.perf_counter()
            ok, img = retrieve()
        else:
            ok, img = False, None
    except Exception as exc:  # cv2.error from a broken device / stream
        logger.debug("%s: read raised %s", label, exc)
        ok, img = False, None
    return (img if ok and img is not None else None), began, (time.perf_counter() - began) * 1000.0


#: How a live source's outage reads in the log (the first line is the reason it was lost).
_SOURCE_OUTAGE = OutageWords(
    still="still down after {seconds:.0f} s, {lost} reconnect attempt(s) failed so far (last: {reason})",
    again="reconnected after {seconds:.0f} s down ({lost} failed reconnect attempt(s) meanwhile)")
#: Why a reopen try failed (``_try_open``'s failure codes), for the outage log and the give-up line.
_TRY_FAILURES = {"open": "cannot open it (unreachable, unplugged, busy, wrong URL or credentials)",
                 "read": "it opens but sends no decodable frame (corrupt data or an unsupported encoding)",
                 "timeout": "no frame within the open timeout (stalled)"}


class _LiveSource(FrameSource):
    """Camera / GStreamer / stream: a capture thread keeps the newest frame, passes over unreadable frames and
    reconnects with back-off when the source is lost; ``stopping`` (the run's stop flag) cuts an open short,
    ``on_give_up`` hears that the source is lost for good."""

    def __init__(self, spec: SourceSpec, config: SourceConfig, factory: CaptureFactory,
                 stopping: Callable[[], bool] | None = None, on_give_up: Callable[[], None] | None = None) -> None:
        super().__init__(spec, config)
        self._factory = factory
        self._stopping = stopping or (lambda: False)
        self._on_give_up = on_give_up
        self._stop = threading.Event()
        self._cond = threading.Condition(self._lock)
        # (frame_id, time, raw image, decode_ms, perf_counter when its decode began: see _grab)
        self._slot: tuple[int, float, np.ndarray, float, float] | None = None
        self._next_id = 0
        self._ended = False
        self._watchers: list[threading.Event] = []
        self._failures = 0  # failed reads in a row on the current connection (capture thread only)
        self._last_good = time.monotonic()
        self._down = False  # in an outage: down since _last_good (no frame is stored until it ends)
        self._down_s = 0.0  # seconds of the outages that ended
        self._closed_at: float | None = None
        self._open_waited_s = config.open_timeout_s  # how long the last failed open waited (for its message)
        self._events = 0  # numbers losses, failed tries and recoveries for the outage log
        self._outage = Outage(self.label, logger, words=_SOURCE_OUTAGE)
        self._stats["outages"] = 0
        self._guard = _PixelGuard(self.label)
        self._refusal = ""  # why the last open was refused as "too large" (see _PixelGuard)
        cap, first, failure = self._try_open()
        if failure:
            raise self._open_failure(failure)
        assert first is not None
        self._store(*first)
        self._thread = _native_thread(self._run, f"gradad-capture-{self.label}", (cap,))

    # -- opening
    def _try_open(self) -> tuple[Capture | None, tuple[np.ndarray, float, float] | None, str]:
        """Open and read a first frame within ``open_timeout_s`` (in a helper thread, so a hung open can't block).

        Returns ``(cap, (image, began, decode_ms), failure)``; ``failure`` is "" on success, else "open", "read",
        "timeout", "stopped" (closed, or the run's stop flag set) or an exception text.
        """
        box: dict[str, Any] = {}
        lock = threading.Lock()
        finished = threading.Event()

        def work() -> None:
            cap: Capture | None = None
            result: dict[str, Any] = {}
            try:
                started = time.monotonic()
                cap = self._factory(self.spec.kind, self.spec.value, self.config)
                opened = cap is not None and cap.isOpened()
                slow = time.monotonic() - started >= _SLOW_OPEN_SHARE * self.config.open_timeout_s
                first = self._first_frame(cap, box) if opened else None
                if first is not None:
                    result.update(cap=cap, first=first)
                    cap = None  # handed over
                else:
                    result["failure"] = "read" if opened else ("timeout" if slow else "open")
                    result["waited_s"] = time.monotonic() - started
            except _FramesTooLarge as exc:
                result.update(failure="too large", refusal=str(exc))
            except Exception as exc:
                result["failure"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            with lock:
                if box.get("abandoned"):
                    _release(result.get("cap"))
                else:
                    box.update(result)
                    finished.set()
            _release(cap)

        _native_thread(work, f"gradad-open-{self.label}")
        deadline = time.monotonic() + self.config.open_timeout_s
        while not finished.wait(_POLL_S):
            stopped = self._stop.is_set() or self._stopping()
            if stopped or time.monotonic() >= deadline:
                with lock:
                    if not finished.is_set():
                        box["abandoned"] = True
                        self._open_waited_s = self.config.open_timeout_s
                        return None, None, "stopped" if stopped else "timeout"
                break
        if "cap" in box:
            return box["cap"], box["first"], ""
        # FFmpeg gives up on a silent stream at _SLOW_OPEN_SHARE of the timeout: the message says how long it was
        self._open_waited_s = box.get("waited_s", self.config.open_timeout_s)
        self._refusal = box.get("refusal", "")
        return None, None, box.get("failure", "open")

    def _first_frame(self, cap: Capture, box: dict[str, Any]) -> tuple[np.ndarray, float, float] | None:
        """The first good frame of a new connection, passing over up to ``read_failures - 1`` unreadable ones (a
        stream may start on a corrupt frame); None when none came or the open was abandoned meanwhile. Raises
        _FramesTooLarge when the capture announces, or only sends, frames over the pixel limit."""
        if (refused := self._guard.announced(cap)) is not None:
            raise refused
        before = self._guard.refused
        for _ in range(self.config.read_failures):
            img, began, decode_ms = self._read(cap)
            if img is not None:
                return img, began, decode_ms
            if box.get("abandoned"):
                break
        if self._guard.refused > before:  # frames came, too large: say so, not "undecodable"
            raise self._guard.refusal(*self._guard.last, "sends")
        return None

    def _read(self, cap: Capture) -> tuple[np.ndarray | None, float, float]:
        """:func:`_grab`; a frame over the pixel limit is passed over like an unreadable one, before it is stored."""
        img, began, decode_ms = _grab(cap, self.label)
        if img is not None and not self._guard.fits(img):
            img = None
        return img, began, decode_ms

    def _open_failure(self, failure: str) -> SourceError:
        """The error of a first open that failed with ``failure`` (see :meth:`_try_open`)."""
        if failure == "stopped":
            return OpenInterrupted(f"opening {self.label} was interrupted")
        if failure == "too large":
            return SourceError(self._refusal)
        err = self._open_error(failure)
        if failure in _TRY_FAILURES:
            return err
        return SourceError(f"{err} ({redact_secrets_in(failure)})")  # an exception's text may quote the URL

    def _open_error(self, failure: str) -> SourceError:
        kind, label = self.spec.kind, self.label
        t = round(self._open_waited_s, 1)
        if kind == "camera":
            if failure == "open":
                hint = (f"check `ls /dev/video*` and the index" if isinstance(self.spec.value, int)
                        else "check `ls /dev/video*` and the device permissions")
                return SourceError(f"cannot open {label} (no device or busy); {hint}")
            if failure == "read":
                return SourceError(f"{label} opened but delivered no frame (busy, unsupported format or unplugged)")
            if failure == "timeout":
                return SourceError(f"{label} gave no frame within {t:g}s (busy or unplugged); check `ls /dev/video*`")
        if kind == "gstreamer":
            if not _gstreamer_available():
                return SourceError(
                    "cannot open GStreamer pipeline: this OpenCV build has no GStreamer support (on Jetson use "
                    f"JetPack's OpenCV, e.g. the system python3-opencv, not the pip wheel): {label}"
                )
            hint = "test it with gst-launch-1.0 (end it with appsink; convert to BGR before appsink)"
            if "nvarguscamerasrc" in label:
                hint += "; for a CSI camera check the ribbon cable and `sudo systemctl restart nvargus-daemon`"
            what = {"open": "cannot open GStreamer pipeline", "read": "GStreamer pipeline delivered no frame",
                    "timeout": f"GStreamer pipeline gave no frame within {t:g}s"}.get(failure,
                                                                                     "cannot open GStreamer pipeline")
            return SourceError(f"{what} ({hint}): {label}")
        if kind == "stream":
            n = self.config.read_failures
            what = {"open": "cannot open stream (unreachable, wrong URL or credentials)",
                    "read": f"stream connected but its first {n} frames could not be decoded (corrupt data or an "
                            f"unsupported encoding; or the stream ended at once)",
                    "timeout": f"stream gave no frame within {t:g}s (unreachable or stalled)"}.get(
                        failure, "cannot open stream")
            return SourceError(f"{what}: {label}")
        return SourceError(f"cannot open {label}")  # the caller appends an exception's text

    # -- capture thread
    def _store(self, img: np.ndarray, began: float, decode_ms: float) -> None:
        """A good frame into the slot (replacing one never taken: ``dropped``); the unreadable frames passed over
        before it on this connection count as ``skipped``."""
        with self._cond:
            if self._slot is not None:
                self._stats["dropped"] += 1
            self._slot = (self._next_id, time.time(), img, decode_ms, began)
            self._next_id += 1
            self._stats["captured"] += 1
            self._stats["skipped"] += self._failures
            self._failures = 0
            self._last_good = time.monotonic()
            self._wake()

    def _wake(self) -> None:
        """Wake the consumer and the watchers (the caller holds the lock)."""
        self._cond.notify_all()
        for event in self._watchers:
            event.set()

    def _end(self, gave_up: str = "") -> None:
        """The capture thread is done; ``gave_up``: why the source was given up on (``stats()["gave_up_reason"]``)."""
        with self._cond:
            self._ended = True
            if gave_up and not self._stats["gave_up"]:
                self._stats["gave_up"], self._stats["gave_up_reason"] = True, gave_up
            self._wake()
        if gave_up and self._on_give_up is not None:
            self._on_give_up()

    def _run(self, cap: Capture | None) -> None:
        try:
            while not self._stop.is_set():
                if cap is None:
                    cap = self._reconnect()
                    if cap is None:
                        return
                elif not self._read_next(cap):
                    _release(cap)
                    cap = None
                    if not self.config.reconnect:
                        logger.error("%s: lost and reconnect is off; stopping", self.label)
                        self._end(gave_up="lost, and reconnecting is off")
                        return
        except BaseException as exc:  # pragma: no cover - unexpected; never leave the consumer waiting
            logger.exception("%s: capture thread failed: %s", self.label, exc)
            self._end(gave_up=f"its capture thread failed ({type(exc).__name__}: {redact_secrets_in(str(exc))})")
        finally:
            _release(cap)
            self._end()

    def _read_next(self, cap: Capture) -> bool:
        """Read one frame into the slot. An unreadable one (a corrupt JPEG) is passed over on the same connection;
        False when the connection counts as lost: ``read_failures`` failed reads in a row, or a failed read
        ``read_stall_s`` after the last good frame (reopening a stream costs seconds and the frames meanwhile)."""
        img, began, decode_ms = self._read(cap)
        if self._stop.is_set():
            return True  # closing: the loop ends
        if img is not None:
            self._store(img, began, decode_ms)
            return True
        self._failures += 1
        quiet = time.monotonic() - self._last_good
        if self._failures < self.config.read_failures and quiet < self.config.read_stall_s:
            return True
        then = "reconnecting" if self.config.reconnect else "reconnect is off"
        self._lost(f"lost: {self._failures} read(s) in a row gave no frame, the last good one {quiet:.1f} s ago "
                   f"(the source ended, stalled or sends {'too large' if self._guard.refused else 'undecodable'} "
                   f"frames); {then}")
        return False

    def _lost(self, reason: str) -> None:
        """Start an outage (logged once; it counts as down from the last good frame)."""
        with self._lock:
            self._failures = 0
            self._down = True
            self._stats["outages"] += 1
            self._events += 1
            seq = self._events
        self._outage.failed(reason, seq, lost=0)

    def _reconnect(self) -> Capture | None:
        """Reopen with exponential back-off up to ``reconnect_max_s``; None when stopped, or given up after
        ``reconnect_give_up_s`` down or ``reconnect_attempts`` failed tries."""
        cfg = self.config
        delay, tries, last = min(cfg.reconnect_initial_s, cfg.reconnect_max_s), 0, "no reconnect attempt yet"
        give_up_at = self._last_good + cfg.reconnect_give_up_s if cfg.reconnect_give_up_s > 0 else math.inf
        while not self._stop.is_set():
            left = give_up_at - time.monotonic()
            if left <= 0 or 0 < cfg.reconnect_attempts <= tries:
                self._give_up(tries, last, GIVE_UP_TIMEOUT if left <= 0 else f"{tries} reconnect attempts failed")
                return None
            if self._stop.wait(min(delay, left)) or delay > left:
                continue  # closed, or the give-up time came during the wait: the loop's test decides
            tries += 1
            cap, first, failure = self._try_open()
            if failure == "stopped":
                return None
            if first is not None:
                self._reconnected()
                self._store(*first)
                return cap
            last = self._refusal if failure == "too large" else _TRY_FAILURES.get(failure, redact_secrets_in(failure))
            logger.debug("%s: reconnect attempt %d failed (%s)", self.label, tries, last)
            with self._lock:
                self._events += 1
                seq = self._events
            self._outage.failed(last, seq)
            delay = min(max(delay * 2, cfg.reconnect_initial_s), cfg.reconnect_max_s)
        return None

    def _give_up(self, tries: int, last: str, reason: str) -> None:
        down = time.monotonic() - self._last_good
        logger.error("%s: giving up: no frame for %.0f s, %d reconnect attempt(s) failed (last: %s)", self.label,
                     down, tries, last)
        self._end(gave_up=reason)

    def _reconnected(self) -> None:
        """End the outage (one INFO line saying how long it lasted)."""
        with self._lock:
            self._stats["reconnects"] += 1
            self._down_s += time.monotonic() - self._last_good
            self._down = False
            self._events += 1
            seq = self._events
        self._outage.delivered(seq)

    # -- consumer side
    def _next_frame(self) -> Frame | None:
        with self._cond:
            while self._slot is None and not self._ended and not self._closed and not self._interrupted:
                self._cond.wait(timeout=0.5)
        return self._take()

    def poll(self) -> Frame | None:
        if self._closed or self._interrupted:
            return None
        frame = self._take()
        if frame is not None:
            self._count("delivered")
        return frame

    def watch(self, event: threading.Event) -> None:
        with self._cond:
            self._watchers.append(event)
            if self._slot is not None or self._ended:
                event.set()

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._closed or self._interrupted or (self._ended and self._slot is None)

    def _take(self) -> Frame | None:
        """The frame in the slot, converted to RGB, or None."""
        with self._cond:
            slot, self._slot = self._slot, None
        if slot is None:
            return None
        frame_id, ts, raw, decode_ms, began = slot
        t0 = time.perf_counter()
        image = _to_rgb(raw)
        decode_ms += (time.perf_counter() - t0) * 1000.0
        # age_ms() = now - created + decode_ms: created is `began` shifted by the decode it already holds, so the
        # age counts from the moment the frame had arrived, the time it waited in the slot included
        return Frame(frame_id, ts, self.label, image, name=None, decode_ms=decode_ms,
                     created=began + decode_ms / 1000.0)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        with self._lock:
            now = self._closed_at or time.monotonic()
            out["down_seconds"] = round(self._down_s + (now - self._last_good if self._down else 0.0), 3)
            out["connected"] = not self._down and not out["gave_up"]
        return out

    def _close_impl(self) -> None:
        self._closed_at = time.monotonic()
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread = getattr(self, "_thread", None)  # absent when __init__ failed
        if thread is None:
            return
        thread.join(timeout=self.config.close_timeout_s)
        if thread.is_alive():  # pragma: no cover - a read blocked inside the driver
            logger.warning("%s: capture thread did not stop within %.1fs (a read is blocked in the driver); "
                           "it will release the device when the read returns", self.label,
                           self.config.close_timeout_s)


# ---------------------------------------------------------------------------------------------------- open


def open_source(
    spec: str | int | os.PathLike[str],
    config: SourceConfig | None = None,
    *,
    capture_factory: CaptureFactory | None = None,
    stopping: Callable[[], bool] | None = None,
    on_give_up: Callable[[], None] | None = None,
) -> FrameSource:
    """Open a frame source (see :func:`parse_source` for the accepted values); close it (or use a ``with`` block)
    to stop its reader thread. ``capture_factory`` opens camera, gstreamer, stream and video captures (default:
    OpenCV; tests inject fakes). Raises SourceError, one line naming the source, when it cannot be opened, and
    OpenInterrupted as soon as ``stopping()`` (the run's stop flag) turns true while a live source is opening (an
    open or first read may otherwise take ``open_timeout_s``). ``on_give_up`` is called (from the capture thread)
    when a live source is lost for good (``reconnect_give_up_s``, ``reconnect_attempts``)."""
    parsed = parse_source(spec)
    cfg = config or SourceConfig()
    factory = capture_factory or _open_capture
    if parsed.live:
        return _LiveSource(parsed, cfg, factory, stopping, on_give_up)
    if parsed.kind == "video":
        path = str(parsed.value)
        try:
            cap = factory("video", path, cfg)
        except Exception as exc:
            raise SourceError(f"cannot open video file ({' '.join(str(exc).split())}): {path}") from None
        if cap is None or not cap.isOpened():
            _release(cap)
            raise SourceError(f"cannot open video file (corrupt or unsupported format): {path}")
        guard = _PixelGuard(f"video file {path}")
        if (refused := guard.announced(cap)) is not None:
            _release(cap)
            raise refused
        caps: list[Capture | None] = [cap]
        nothing = f"cannot decode any frame of video file (corrupt or unsupported codec): {path}"
        return _FileSource(parsed, cfg, lambda src, stop: _file_frames(
            src, stop, lambda: _video_pass(src, caps, factory, guard), nothing), on_close=lambda: _release(caps[0]))
    files, ignored = _list_images(parsed)
    nothing = f"no readable image in {parsed.label} ({len(files)} file(s) skipped as unreadable)"
    source = _FileSource(parsed, cfg, lambda src, stop: _file_frames(src, stop, lambda: _image_pass(src, files),
                                                                     nothing))
    source._count("ignored", ignored)
    return source
