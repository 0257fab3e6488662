"""The flagged-frame folder: original, overlay and map of every NG frame (and refined masks), size-bounded."""

from __future__ import annotations

import collections
import errno
import functools
import io
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np

from gradad.data.datasets import IMAGE_EXTENSIONS
from gradad.errors import GradError
from gradad.files import atomic_write_bytes
from gradad.imaging import map_2d, map_to_uint8, to_bgr_uint8
from gradad.runtime.outage import Outage, OutageWords
from gradad.runtime.sinks.background import OffloadedSink
from gradad.runtime.sinks.base import map_display_range
from gradad.runtime.sinks.video import OVERLAY_MAX_SIDE, capped_overlay
from gradad.runtime.types import FrameResult

log = logging.getLogger("gradad.runtime.sinks")


_KINDS = ("orig.png", "overlay.jpg", "map.npy", "map.png")
_REFINED_KINDS = {"mask_file": "refined_mask.png", "repaired_file": "repaired.png"}  # follow-up field -> kind
_ALL_KINDS = _KINDS + tuple(_REFINED_KINDS.values())
_NAME_RE = re.compile(r"^(?P<key>\d{8,}_[A-Za-z0-9_-]+?)_(?P<kind>"
                      + "|".join(re.escape(k) for k in _ALL_KINDS) + r")$")
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.tmp(?P<pid>\d*)$")  # gradad.files.atomic_file's temporary names
# "no space left" and "quota exceeded": deleting our oldest frames can make room (EDQUOT is missing on Windows)
_DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
_NOT_SAVING = OutageWords(still="still not saving after {seconds:.0f} s, {lost} frames lost so far (last: {reason})",
                          again="saving again after {seconds:.0f} s, {lost} frames lost meanwhile")


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


def _writer_alive(pid: str) -> bool:
    """Whether the process that names a temporary file still runs (a second grad-run sharing the folder)."""
    if not pid or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # exists, another user's: leave its file alone
    return True


class FlaggedFrameSink(OffloadedSink):
    """Saves anomalous frames to a folder, with bounded disk use.

    For every result with ``is_anomalous`` (and, with ``save_normal_every=N > 0``, every N-th normal result, for
    audits) it writes four files named ``<frame_id:08d>_<name>_`` + ``orig.png`` (the frame), ``overlay.jpg``
    (:func:`~gradad.runtime.sinks.video.annotate_frame`, scaled to ``overlay_max_side`` pixels on its longer side;
    the original keeps the full size), ``map.npy`` (the raw float32 anomaly map at model resolution) and ``map.png``
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
    * A full disk (``ENOSPC``, ``EDQUOT``) while writing a frame evicts the oldest saved frames, one at a time, and
      retries, so the newest frames are kept; only when none of its own is left is the frame lost (``errors``,
      one log line per streak of lost frames). Other disk errors (read-only, permissions) are logged and counted
      in ``errors``, logged once per streak of failures (then at most once a minute, and once when saving works
      again). A frame is indexed and counted in ``saved`` only once all its files are written: a failed frame
      leaves none behind. Disk errors do not stop the camera loop.
    * A folder that takes no file (read-only, no permission) is refused at start (:class:`GradError`). A folder
      removed during the run is created again by the next frame's write (one warning; the frames of this run it
      held are counted in ``deleted``).
    * ``queue_size > 0``: frames are encoded and written on a thread of the sink's own (a
      :class:`~gradad.runtime.sinks.background.BackgroundWriter`), so :meth:`write` never waits for a multi-megapixel
      PNG; a full queue drops the frame (``dropped``), :meth:`close` writes every queued frame first (within
      :meth:`limit_drain`'s time after a stop signal, the rest ``dropped``).
      :meth:`delivery_report` gives the counts for the run summary (``flagged_folder``: ``complete`` when no frame
      of this run was lost).
    * :meth:`write_refined` adds a refined mask (``refined_mask.png``, 0/255 at model resolution) and the repaired
      image (``repaired.png``) to a frame saved earlier in this run (``grad-run --refine``); they share the frame's
      disk budget and are evicted with it. With a queue they are written on the writer thread, after their frame
      (the queue is FIFO): a frame's file names are decided when it is queued, so :meth:`write_refined` returns the
      refined files' names at once, and one that is then not saved is counted in ``refined_skipped`` (its frame
      is not in the folder, or no room) or ``refined_failed`` (a disk error), apart from the frames' counts.
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int = 1 << 30, max_files: int | None = None,
                 save_normal_every: int = 0, jpeg_quality: int = 90, overlay_max_side: int = OVERLAY_MAX_SIDE,
                 queue_size: int = 0, drop_when_full: bool = True) -> None:
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
        self.overlay_max_side = int(overlay_max_side)
        self.saved = 0
        self.deleted = 0  # frames of this run that went with the folder when it was removed during the run
        self.evicted = 0
        self.skipped = 0
        self.errors = 0
        self.refined_failed = 0  # refined masks not saved: a disk (or encoding) error
        self._refined_skipped = 0  # refined masks not saved: their frame is not in the folder, or no room
        self._normal_seen = 0
        self._full_evict_logged = False  # the first eviction for a full disk is logged, later ones are counted
        self._lost_to_full_disk = 0  # frames lost in a row because the disk is full and nothing is left to evict
        self._lock = threading.Lock()  # the index and the files: held by whoever writes (the writer thread, if any)
        self._keys_lock = threading.Lock()  # _run_keys and _base_of only, held briefly (write() takes it)
        self._failure = Outage(f"flagged-frame folder {self.folder}", log, words=_NOT_SAVING)
        self._writes = 0  # frame writes attempted: their numbers for the failure log
        self._closed = False
        # key -> {kind: size}; insertion order = age (oldest first)
        self._index: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        # (source, base key) of this run -> actual key on disk (frames still on disk); the source is part of it
        # because every source numbers its frames from 0: two cameras' frame 0 are two files
        self._run_keys: dict[tuple[str, str], str] = {}
        self._base_of: dict[str, tuple[str, str]] = {}  # actual key -> its run key, to forget evicted frames
        self.total_bytes = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GradError(f"cannot create flagged-frame folder {self.folder}: {e.strerror or e}") from e
        if not self.folder.is_dir():
            raise GradError(f"flagged-frame folder {self.folder} is not a directory")
        self._probe()
        self._scan()
        self._offload(f"flagged-frame folder {self.folder}", _call, queue_size, drop_when_full)

    def _probe(self) -> None:
        """Fail at start, not at every NG frame, when the folder takes no file (read-only file system, no
        permission), as ``--jsonl`` and ``--video`` do."""
        probe = self.folder / f".gradad-write-probe{os.getpid()}"
        try:
            atomic_write_bytes(probe, b"")  # what a frame's file takes: a temporary file, renamed into place
            probe.unlink()
        except OSError as e:
            if e.errno in _DISK_FULL:  # writable, but full: evicting the oldest frames makes room (see the class)
                log.warning("flagged-frame folder %s: the disk is full at start (%s); the oldest saved frames are "
                            "evicted to make room for new ones", self.folder, e.strerror or e)
                return
            raise GradError(f"flagged-frame folder {self.folder}: cannot write there ({e.strerror or e})") from None

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
                        if not _writer_alive(tmp.group("pid")):
                            os.remove(entry.path)  # a stale temporary file of an interrupted write
                        continue  # else another live process is writing it
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

    def _run_key(self, result: FrameResult) -> tuple[str, str]:
        """(source, base key): a frame of this run, whatever suffix its files got on disk."""
        return result.frame.source, self._base_key(result.frame.frame_id, result.frame.name, result.frame.source)

    def _reserve(self, run_key: tuple[str, str]) -> tuple[str, bool]:
        """The key (file-name stem) of a frame of this run, decided the first time it is written (queued): the base
        key, or ``-2``, ``-3``, ... after it when files of an earlier run (or of another source's frame of that
        name in this run) hold it. Returns (key, whether it was decided now)."""
        with self._keys_lock:
            if run_key in self._run_keys:
                return self._run_keys[run_key], False
            base = run_key[1]
            key, n = base, 1
            while key in self._base_of or any((self.folder / f"{key}_{k}").exists() for k in _ALL_KINDS):
                n += 1
                key = f"{base}-{n}"
            self._run_keys[run_key] = key
            self._base_of[key] = run_key
            return key, True

    def _forget(self, key: str) -> None:
        """Drop ``key``'s reservation (its frame is evicted, gone with the folder or never queued)."""
        with self._keys_lock:
            run_key = self._base_of.pop(key, None)
            if run_key is not None:
                self._run_keys.pop(run_key, None)

    def _remove_files(self, key: str, kinds: Iterable[str]) -> None:
        for kind in kinds:
            p = self.folder / f"{key}_{kind}"
            if not os.path.lexists(p):  # never written (a failed frame): nothing to delete, nothing to warn about
                continue
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("flagged-frame folder: cannot delete %s: %s", p, e)

    def _evict_one(self) -> None:
        key, files = self._index.popitem(last=False)
        self._forget(key)
        self._remove_files(key, files)
        self.total_bytes -= sum(files.values())
        self.evicted += 1
        log.debug("evicted flagged frame %s", key)

    # -- writing -------------------------------------------------------------------------------------------------

    def _encode(self, result: FrameResult) -> dict[str, bytes]:
        amap = map_2d(result.anomaly_map)
        ok1, orig = cv2.imencode(".png", to_bgr_uint8(result.frame.image))
        ok2, overlay = cv2.imencode(".jpg", capped_overlay(result, self.overlay_max_side),
                                    [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
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
        """Save the result's files if it is anomalous (or a sampled normal one), evicting old frames as needed:
        here or, with a queue, on the writer thread."""
        if self._closed:
            raise RuntimeError(f"FlaggedFrameSink({self.folder}) is closed")
        if not result.is_anomalous:
            if self.save_normal_every <= 0:
                return
            self._normal_seen += 1
            if self._normal_seen % self.save_normal_every:
                return
        if self._background is None:
            self._save(result)
            return
        key, new = self._reserve(self._run_key(result))  # now: a refined mask's record names its files at once
        if not self._background.submit(functools.partial(self._save, result, key),
                                       nbytes=result.frame.nbytes) and new:
            self._forget(key)  # dropped: not in the folder, a refined mask is not promised a place

    def _save(self, result: FrameResult, key: str | None = None) -> None:
        """Encode and write one frame's files (under ``key``, decided when it was queued) within the disk budget."""
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
            key = key or self._reserve(self._run_key(result))[0]
            old = self._index.pop(key, None)  # same frame written again in this run: replaced
            if old is not None:
                self.total_bytes -= sum(old.values())
                self._remove_files(key, [k for k in old if k not in payload])  # e.g. a stale refined mask
            while self._index and (self.total_bytes + size > self.max_bytes
                                   or (self.max_files is not None and len(self._index) >= self.max_files)):
                self._evict_one()
            if self._write_frame(key, payload, result.frame.frame_id):
                self._index[key] = {kind: len(payload[kind]) for kind in _KINDS}
                self.total_bytes += size
                self.saved += 1

    def _write_frame(self, key: str, payload: dict[str, bytes], frame_id: int) -> bool:
        """Write a frame's files; on a full disk evict the oldest frames and retry. False (no file left) if lost.

        Eviction for one frame stops once it freed twice the frame's size without making room: then something
        else fills the disk (another writer, deleted files still held open, a snapshot), and deleting the whole
        archive would not save this frame either."""
        freed, budget, recreated = 0, 2 * sum(len(b) for b in payload.values()), False
        self._writes += 1
        while True:
            try:
                for kind in _KINDS:
                    atomic_write_bytes(self.folder / f"{key}_{kind}", payload[kind])
            except OSError as e:
                # a frame missing its map is useless and would hold disk outside the index: none of its files stay
                # (all kinds: when the frame is written again in this run, its old files are unindexed already)
                self._remove_files(key, _ALL_KINDS)
                if e.errno == errno.ENOENT and not recreated and self._recreate_folder(keep=key):
                    recreated = True
                    continue
                if e.errno not in _DISK_FULL:
                    self.errors += 1  # once per streak, then once a minute: a camera loop would log every NG frame
                    self._failure.failed(f"NG frames are not saved (frame {frame_id}: {e.strerror or e})",
                                         self._writes)
                    return False
                more = self._evict_for_full_disk(e, freed, budget)  # the README: the newest frames survive
                if more is not None:
                    freed = more
                    continue
                self.errors += 1
                self._lost_to_full_disk += 1
                if self._lost_to_full_disk == 1:  # a camera loop would otherwise log every NG frame
                    log.error("flagged-frame folder %s: disk full (%s) and evicting %s did not make room: NG frames "
                              "are not saved until space is freed", self.folder, e.strerror or e,
                              "every saved frame" if not self._index else f"{freed} bytes of the oldest frames")
                return False
            self._failure.delivered(self._writes)
            if freed == 0:  # written without evicting: a later full disk is announced again
                self._full_evict_logged = False
            if self._lost_to_full_disk:
                log.warning("flagged-frame folder %s: saving again after %d frames lost to a full disk", self.folder,
                            self._lost_to_full_disk)
                self._lost_to_full_disk = 0
            return True

    def write_refined(self, frame_id: int, name: str | None, source: str, mask: np.ndarray,
                      repaired: np.ndarray | None = None) -> dict[str, str | None]:
        """Save a refined mask (and the repaired RGB image) next to the frame this run saved with these ids.

        Returns ``{"mask_file": path or None, "repaired_file": path or None}`` for the follow-up record. Without a
        queue the files are written here: None when the frame is not on disk (never flagged here, skipped or
        already evicted), the disk budget has no room left once every older frame is evicted, or writing failed.
        With a queue they are written on the writer thread after their frame and this never waits: the paths are
        those they will have, None only when the frame was never queued, is evicted already or the queue is full;
        one then not saved is counted in ``refined_skipped`` / ``refined_failed``.
        """
        if self._closed:
            raise RuntimeError(f"FlaggedFrameSink({self.folder}) is closed")
        run_key = (source, self._base_key(frame_id, name, source))
        if self._background is None:
            return self._save_refined(self._run_keys.get(run_key), frame_id, mask, repaired)
        with self._keys_lock:
            key = self._run_keys.get(run_key)
        files: dict[str, str | None] = dict.fromkeys(_REFINED_KINDS)
        if key is None:
            self._refined_skipped += 1
            log.debug("refined mask of frame %d not saved: the frame is not in %s", frame_id, self.folder)
            return files
        held = np.asarray(mask).nbytes + (np.asarray(repaired).nbytes if repaired is not None else 0)
        if not self._background.submit(functools.partial(self._save_refined, key, frame_id, mask, repaired),
                                       counted=False, nbytes=held):
            return files  # a full queue: counted in refined_skipped (dropped_other)
        for field_name, kind in _REFINED_KINDS.items():
            if field_name == "mask_file" or repaired is not None:
                files[field_name] = str(self.folder / f"{key}_{kind}")
        return files

    def _save_refined(self, key: str | None, frame_id: int, mask: np.ndarray,
                      repaired: np.ndarray | None) -> dict[str, str | None]:
        """Encode and write a refined mask (and repaired image) of frame ``key``; the files saved, by field."""
        files: dict[str, str | None] = dict.fromkeys(_REFINED_KINDS)
        try:
            payload = _encode_refined(mask, repaired)
        except (ValueError, cv2.error) as e:
            self.refined_failed += 1
            log.error("refined mask of frame %d not saved: %s", frame_id, e)
            return files
        with self._lock:
            if key is None or key not in self._index:
                self._refined_skipped += 1
                log.debug("refined mask of frame %d not saved: the frame is not in %s", frame_id, self.folder)
                return files
            if not self._make_room(key, payload):
                self._refined_skipped += 1
                log.warning("refined mask of frame %d not saved: no room within max_bytes=%d", frame_id,
                            self.max_bytes)
                return files
            entry = self._index[key]
            for field_name, kind in _REFINED_KINDS.items():
                if kind not in payload:
                    continue
                path = self.folder / f"{key}_{kind}"
                if not self._write_refined_file(key, path, payload[kind]):
                    break
                self.total_bytes += len(payload[kind]) - entry.get(kind, 0)
                entry[kind] = len(payload[kind])
                files[field_name] = str(path)
        return files

    def _write_refined_file(self, key: str, path: Path, data: bytes) -> bool:
        """Write one refined file of frame ``key``; a full disk evicts frames older than it and retries, as
        :meth:`write` does (the frame itself stays)."""
        freed, budget = 0, 2 * len(data)
        while True:
            try:
                atomic_write_bytes(path, data)
                return True
            except OSError as e:
                more = self._evict_for_full_disk(e, freed, budget, keep=key) if e.errno in _DISK_FULL else None
                if more is not None:
                    freed = more
                    continue
                self.refined_failed += 1
                self._failure.failed(f"refined file {path.name} not saved ({e.strerror or e})", self._writes,
                                     lost=0)  # a file, not a frame: the frame itself is saved
                return False

    def _evict_for_full_disk(self, error: OSError, freed: int, budget: int, keep: str | None = None) -> int | None:
        """On a full disk, evict the oldest frame (never ``keep``) and return the bytes freed so far for this write;
        None when nothing may go: no frame left, or ``budget`` bytes freed already without making room (something
        else fills the disk: another writer, deleted files held open, a snapshot; the archive would not help)."""
        if not self._index or freed >= budget or next(iter(self._index)) == keep:
            return None
        if not self._full_evict_logged:
            self._full_evict_logged = True
            log.warning("flagged-frame folder %s: disk full (%s): evicting the oldest frames to make room",
                        self.folder, error.strerror or error)
        before = self.total_bytes
        self._evict_one()
        return freed + before - self.total_bytes

    def _make_room(self, key: str, payload: dict[str, bytes]) -> bool:
        """Evict frames older than ``key`` until ``payload`` (replacing key's files of those kinds) fits."""
        entry = self._index[key]
        extra = sum(len(b) for b in payload.values()) - sum(entry.get(kind, 0) for kind in payload)
        while self.total_bytes + extra > self.max_bytes and next(iter(self._index)) != key:
            self._evict_one()
        return self.total_bytes + extra <= self.max_bytes

    def _recreate_folder(self, keep: str) -> bool:
        """The folder was removed during the run (an operator, a clean-up job): create it again and forget the
        frames that went with it, but ``keep`` (the frame being written). False when the folder is there (the write
        failed for another reason) or cannot be created (the caller reports the write's error)."""
        if self.folder.is_dir():
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        with self._keys_lock:
            gone = sum(k != keep and k in self._index for k in self._base_of)  # this run's frames that were saved
        self.deleted += gone
        log.warning("flagged-frame folder %s was removed during the run, with %d frame(s) this run had saved: "
                    "created it again", self.folder, gone)
        for key in self._index:  # the frames still queued keep their keys (their refined masks were promised them)
            if key != keep:
                self._forget(key)
        self._index.clear()
        self.total_bytes = 0
        return True

    @property
    def frames_lost(self) -> int:
        """Frames of this run that are not in the folder, evictions (the budget, by design) aside; refined masks
        not saved are not frames (``refined_failed``, ``refined_skipped``)."""
        return self.errors + self.skipped + self.dropped + self.deleted

    @property
    def refined_skipped(self) -> int:
        """Refined masks not saved: their frame is not in the folder (never saved, evicted), no room, a full queue."""
        return self._refined_skipped + (self._background.dropped_other if self._background is not None else 0)

    def delivery_report(self) -> dict[str, dict[str, Any]]:
        """``{"flagged_folder": {...}}`` for the run summary: target, saved, failed, skipped (too big), dropped (a
        full queue), deleted (with the folder, removed during the run), evicted (the budget: by design, not lost),
        ``records_lost`` (:attr:`frames_lost`), ``complete``, and the refined masks not saved (``refined_failed``,
        ``refined_skipped``; not frames, so not in ``records_lost``)."""
        lost = self.frames_lost
        return {"flagged_folder": {"target": str(self.folder), "saved": self.saved, "failed": self.errors,
                                   "skipped": self.skipped, "dropped": self.dropped, "deleted": self.deleted,
                                   "evicted": self.evicted, "records_lost": lost, "complete": lost == 0,
                                   "refined_failed": self.refined_failed, "refined_skipped": self.refined_skipped}}

    def close(self) -> None:
        """Write the frames still queued; logs a summary (the run's ``done:`` line warns when frames were lost).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._background is not None:
            self._background.close()
        log.info("flagged-frame folder %s: %d saved, %d evicted, %d skipped, %d errors, %d dropped, %d deleted with "
                 "the folder (%d frames, %.1f MB)", self.folder, self.saved, self.evicted, self.skipped, self.errors,
                 self.dropped, self.deleted, len(self._index), self.total_bytes / 1e6)


def _call(job: Callable[[], Any]) -> None:
    """The writer thread's work: a frame's or a refined mask's save, bound with its arguments."""
    job()


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
