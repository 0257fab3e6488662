"""The flagged-frame folder: original, overlay and map of every NG frame (and refined masks), size-bounded."""

from __future__ import annotations

import collections
import errno
import io
import logging
import os
import re
import threading
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from gradad.data.datasets import IMAGE_EXTENSIONS
from gradad.errors import GradError
from gradad.files import atomic_write_bytes
from gradad.imaging import map_to_uint8, to_bgr_uint8
from gradad.runtime.sinks.base import SinkBase, _map2d, map_display_range
from gradad.runtime.sinks.video import annotate_frame
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


class FlaggedFrameSink(SinkBase):
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
    * A full disk (``ENOSPC``, ``EDQUOT``) while writing a frame evicts the oldest saved frames, one at a time, and
      retries, so the newest frames are kept; only when none of its own is left is the frame lost (``errors``,
      one log line per streak of lost frames). Other disk errors (read-only, permissions) are logged and counted
      in ``errors``. A frame is indexed and counted in ``saved`` only once all its files are written: a failed
      frame leaves none behind. Disk errors do not stop the camera loop.
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
        self._full_evict_logged = False  # the first eviction for a full disk is logged, later ones are counted
        self._lost_to_full_disk = 0  # frames lost in a row because the disk is full and nothing is left to evict
        self._lock = threading.Lock()
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

    def _key_for(self, result: FrameResult) -> str:
        base = self._base_key(result.frame.frame_id, result.frame.name, result.frame.source)
        run_key = (result.frame.source, base)
        if run_key in self._run_keys:
            return self._run_keys[run_key]
        key, n = base, 1
        while key in self._index or any((self.folder / f"{key}_{k}").exists() for k in _ALL_KINDS):
            n += 1
            key = f"{base}-{n}"
        self._run_keys[run_key] = key
        self._base_of[key] = run_key
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
        run_key = self._base_of.pop(key, None)
        if run_key is not None:
            self._run_keys.pop(run_key, None)
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
            if self._write_frame(key, payload, result.frame.frame_id):
                self._index[key] = {kind: len(payload[kind]) for kind in _KINDS}
                self.total_bytes += size
                self.saved += 1

    def _write_frame(self, key: str, payload: dict[str, bytes], frame_id: int) -> bool:
        """Write a frame's files; on a full disk evict the oldest frames and retry. False (no file left) if lost.

        Eviction for one frame stops once it freed twice the frame's size without making room: then something
        else fills the disk (another writer, deleted files still held open, a snapshot), and deleting the whole
        archive would not save this frame either."""
        freed, budget = 0, 2 * sum(len(b) for b in payload.values())
        while True:
            try:
                for kind in _KINDS:
                    atomic_write_bytes(self.folder / f"{key}_{kind}", payload[kind])
            except OSError as e:
                # a frame missing its map is useless and would hold disk outside the index: none of its files stay
                # (all kinds: when the frame is written again in this run, its old files are unindexed already)
                self._remove_files(key, _ALL_KINDS)
                if e.errno not in _DISK_FULL:
                    self.errors += 1
                    log.error("flagged frame %d not saved to %s: %s", frame_id, self.folder, e)
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
            key = self._run_keys.get((source, self._base_key(frame_id, name, source)))
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
                self.errors += 1
                log.error("refined file %s not saved: %s", path, e)
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
