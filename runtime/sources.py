"""Frame sources for the lean runtime: cameras, GStreamer pipelines, network streams, video files, image folders.

:func:`open_source` returns a :class:`FrameSource`: an iterator of RGB uint8 :class:`~gradad.runtime.types.Frame`
objects, a context manager, with :meth:`FrameSource.stats` (captured / delivered / dropped / skipped / ignored /
reconnects / gave_up). :func:`parse_source` says how a ``--source`` value is classified.

Live sources (camera, gstreamer, stream) are read by a daemon capture thread that keeps only the newest frame: a
slower consumer gets the latest image and the frames it never saw are counted as ``dropped`` (they still use up a
``frame_id``). A live source that fails after it was opened is reopened with exponential back-off
(``SourceConfig.reconnect_*``); after ``reconnect_attempts`` failed tries (0 = never give up) the iteration ends
with ``stats()["gave_up"] = True``. File sources (video, folder, glob, image) never drop frames: a prefetch thread
decodes ahead into a bounded queue; an unreadable image or video frame is logged, counted as ``skipped`` and passed
over. A video frame's name carries its index in the file (``clip.avi#12``), also after frames lost to corruption.

A source that cannot be opened raises :class:`SourceError` (one line, no traceback). Only numpy, OpenCV and the
standard library are used here.
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
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from gradad.data.datasets import IMAGE_EXTENSIONS, is_image_file
from gradad.data.images import read_image_rgb
from gradad.errors import GradError
from gradad.runtime.buffered import Buffered
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


class SourceError(GradError):
    """A frame source that cannot be opened or read (missing file, empty folder, camera busy, bad pipeline...)."""


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
    reconnect_max_s: float = 10.0  # ...up to this
    reconnect_attempts: int = 0  # failed reopen tries in a row before giving up (0 = retry forever)
    open_timeout_s: float = 10.0  # a live source must open and deliver its first frame within this time
    loop: bool = False  # start file sources again at the end (benchmarks, demos)
    prefetch: int = 4  # frames a file source decodes ahead in a thread (0 = in the consumer's thread)
    close_timeout_s: float = 2.0  # how long close() waits for the reader thread

    def __post_init__(self) -> None:
        if self.reconnect_initial_s < 0 or self.reconnect_max_s < 0:
            raise SourceError("reconnect back-off times must be >= 0 seconds")
        if self.reconnect_attempts < 0:
            raise SourceError(f"reconnect_attempts must be >= 0 (0 = forever), got {self.reconnect_attempts}")
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
    """The part of ``cv2.VideoCapture`` the sources use (tests pass fakes)."""

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
        ms = int(config.open_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
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
        frames), ``ignored`` (files of a folder or glob that are not images of a known type, never read),
        ``reconnects`` (successful reopens of a live source), ``gave_up`` (a live source was lost for good)."""
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
                                                  stop=self._stop) if config.prefetch > 0 else gen)

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
        kinds = sorted({p.suffix.lower() or "(no extension)" for p in others})
        logger.warning("%s: ignored %d file(s) that are not images of a known type (%s; known: %s)", where,
                       len(others), ", ".join(kinds), " ".join(IMAGE_EXTENSIONS))
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


def _video_pass(source: _FileSource, caps: list[Capture | None], factory: CaptureFactory
                ) -> Iterator[tuple[np.ndarray, str]]:
    """One pass through a video file: the capture opened by :func:`open_source` first, a reopened one when looping
    (``caps`` holds the open capture so the source can release it when closed early)."""
    path = str(source.spec.value)
    if caps[0] is None:
        caps[0] = factory("video", path, source.config)
        if not caps[0].isOpened():
            raise SourceError(f"cannot reopen video file: {path}")
    cap, index = caps[0], -1  # index: the last frame's index in the file
    unreadable: list[int] = []
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
                index = at if at is not None else index + 1
                yield _to_rgb(img), f"{Path(path).name}#{index}"
            elif at is not None and announced is not None and at < announced:
                index = at  # a damaged frame an index-based reader stepped over: go on after it
                unreadable.append(at)
                source._count("skipped")
            else:
                break
        _warn_if_short(path, index + 1, announced, unreadable)
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


def _warn_if_short(path: str, reached: int, announced: int | None, unreadable: list[int]) -> None:
    """Warn about frames of a video that could not be read: damaged ones in between (their indices, which the
    other frames' names skip) and a missing end (``reached`` < the frame count the container announces)."""
    if unreadable:  # only ever found below a known frame count
        logger.warning("video file %s: %d of %s frames unreadable (%s; corrupt): passed over, the other frames keep "
                       "their index in the file as names", path, len(unreadable), announced, _index_ranges(unreadable))
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


class _LiveSource(FrameSource):
    """Camera / GStreamer / stream: a capture thread keeps the newest frame; reconnects with back-off."""

    def __init__(self, spec: SourceSpec, config: SourceConfig, factory: CaptureFactory) -> None:
        super().__init__(spec, config)
        self._factory = factory
        self._stop = threading.Event()
        self._cond = threading.Condition(self._lock)
        # (frame_id, time, raw image, read_ms, perf_counter at capture: end-to-end latency includes the slot wait)
        self._slot: tuple[int, float, np.ndarray, float, float] | None = None
        self._next_id = 0
        self._ended = False
        cap, first, read_ms, failure = self._try_open()
        if failure:
            err = self._open_error(failure)
            if failure in ("open", "read", "timeout"):
                raise err
            raise SourceError(f"{err} ({redact_secrets_in(failure)})")  # an exception's text may quote the URL
        self._store(first, read_ms)
        self._thread = _native_thread(self._run, f"gradad-capture-{self.label}", (cap,))

    # -- opening
    def _try_open(self) -> tuple[Capture | None, np.ndarray | None, float, str]:
        """Open and read a first frame within ``open_timeout_s`` (in a helper thread, so a hung open can't block).

        Returns ``(cap, first_image, read_ms, failure)``; ``failure`` is "" on success, else "open", "read",
        "timeout", "stopped" or an exception text.
        """
        box: dict[str, Any] = {}
        lock = threading.Lock()
        finished = threading.Event()

        def work() -> None:
            cap: Capture | None = None
            result: dict[str, Any] = {}
            try:
                cap = self._factory(self.spec.kind, self.spec.value, self.config)
                if cap is None or not cap.isOpened():
                    result["failure"] = "open"
                else:
                    t0 = time.perf_counter()
                    ok, img = cap.read()
                    if ok and img is not None:
                        result.update(cap=cap, img=img, read_ms=(time.perf_counter() - t0) * 1000.0)
                        cap = None  # handed over
                    else:
                        result["failure"] = "read"
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
            if self._stop.is_set() or time.monotonic() >= deadline:
                with lock:
                    if not finished.is_set():
                        box["abandoned"] = True
                        return None, None, 0.0, "stopped" if self._stop.is_set() else "timeout"
                break
        if "cap" in box:
            return box["cap"], box["img"], box["read_ms"], ""
        return None, None, 0.0, box.get("failure", "open")

    def _open_error(self, failure: str) -> SourceError:
        kind, label, t = self.spec.kind, self.label, self.config.open_timeout_s
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
            what = {"open": "cannot open stream (unreachable, wrong URL or credentials)",
                    "read": "stream opened but delivered no frame",
                    "timeout": f"stream gave no frame within {t:g}s (unreachable or stalled)"}.get(
                        failure, "cannot open stream")
            return SourceError(f"{what}: {label}")
        return SourceError(f"cannot open {label}")  # the caller appends an exception's text

    # -- capture thread
    def _store(self, img: np.ndarray, read_ms: float) -> None:
        with self._cond:
            if self._slot is not None:
                self._stats["dropped"] += 1
            self._slot = (self._next_id, time.time(), img, read_ms, time.perf_counter())
            self._next_id += 1
            self._stats["captured"] += 1
            self._cond.notify_all()

    def _end(self, gave_up: bool = False) -> None:
        with self._cond:
            self._ended = True
            self._stats["gave_up"] |= gave_up
            self._cond.notify_all()

    def _run(self, cap: Capture | None) -> None:
        try:
            while not self._stop.is_set():
                if cap is None:
                    cap = self._reconnect()
                    if cap is None:
                        return
                    continue
                t0 = time.perf_counter()
                try:
                    ok, img = cap.read()
                except Exception as exc:  # cv2.error from a broken device / stream
                    logger.debug("%s: read raised %s", self.label, exc)
                    ok, img = False, None
                if self._stop.is_set():
                    return
                if not ok or img is None:
                    _release(cap)
                    cap = None
                    if not self.config.reconnect:
                        logger.error("%s: lost (read failed) and reconnect is off; stopping", self.label)
                        self._end(gave_up=True)
                        return
                    logger.warning("%s: read failed (camera/stream lost); reconnecting", self.label)
                    continue
                self._store(img, (time.perf_counter() - t0) * 1000.0)
        except BaseException as exc:  # pragma: no cover - unexpected; never leave the consumer waiting
            logger.exception("%s: capture thread failed: %s", self.label, exc)
            self._end(gave_up=True)
        finally:
            _release(cap)
            self._end()

    def _reconnect(self) -> Capture | None:
        """Reopen with exponential back-off; None when stopped or after ``reconnect_attempts`` failed tries."""
        cfg = self.config
        delay = cfg.reconnect_initial_s
        tries = 0
        while not self._stop.is_set():
            if cfg.reconnect_attempts > 0 and tries >= cfg.reconnect_attempts:
                logger.error("%s: giving up after %d failed reconnect attempt(s)", self.label, tries)
                self._end(gave_up=True)
                return None
            if self._stop.wait(delay):
                return None
            tries += 1
            cap, img, read_ms, failure = self._try_open()
            if failure == "stopped":
                return None
            if not failure:
                assert cap is not None and img is not None
                self._count("reconnects")
                logger.warning("%s: reconnected after %d attempt(s)", self.label, tries)
                self._store(img, read_ms)
                return cap
            delay = min(max(delay * 2, cfg.reconnect_initial_s), cfg.reconnect_max_s)
            logger.warning(
                "%s: reconnect attempt %d failed (%s); next try in %.1fs", self.label, tries, failure, delay
            )
        return None

    # -- consumer side
    def _next_frame(self) -> Frame | None:
        with self._cond:
            while self._slot is None and not self._ended and not self._closed and not self._interrupted:
                self._cond.wait(timeout=0.5)
            if self._slot is None:
                return None
            frame_id, ts, raw, read_ms, captured = self._slot
            self._slot = None
        t0 = time.perf_counter()
        image = _to_rgb(raw)
        convert_s = time.perf_counter() - t0
        # age = now - created + decode_ms: created shifted by the conversion it already holds, so the age counts
        # from the start of the read, the time the frame waited in the slot included
        return Frame(frame_id, ts, self.label, image, name=None, decode_ms=read_ms + convert_s * 1000.0,
                     created=captured + convert_s)

    def _close_impl(self) -> None:
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
) -> FrameSource:
    """Open a frame source (see :func:`parse_source` for the accepted values); close it (or use a ``with`` block)
    to stop its reader thread. ``capture_factory`` opens camera, gstreamer, stream and video captures (default:
    OpenCV; tests inject fakes). Raises SourceError, one line naming the source, when it cannot be opened."""
    parsed = parse_source(spec)
    cfg = config or SourceConfig()
    factory = capture_factory or _open_capture
    if parsed.live:
        return _LiveSource(parsed, cfg, factory)
    if parsed.kind == "video":
        path = str(parsed.value)
        try:
            cap = factory("video", path, cfg)
        except Exception as exc:
            raise SourceError(f"cannot open video file ({' '.join(str(exc).split())}): {path}") from None
        if cap is None or not cap.isOpened():
            _release(cap)
            raise SourceError(f"cannot open video file (corrupt or unsupported format): {path}")
        caps: list[Capture | None] = [cap]
        nothing = f"cannot decode any frame of video file (corrupt or unsupported codec): {path}"
        return _FileSource(parsed, cfg, lambda src, stop: _file_frames(src, stop, lambda: _video_pass(src, caps, factory),
                                                                       nothing), on_close=lambda: _release(caps[0]))
    files, ignored = _list_images(parsed)
    nothing = f"no readable image in {parsed.label} ({len(files)} file(s) skipped as unreadable)"
    source = _FileSource(parsed, cfg, lambda src, stop: _file_frames(src, stop, lambda: _image_pass(src, files),
                                                                     nothing))
    source._count("ignored", ignored)
    return source
