"""JSON lines: one record per frame, follow-up records appended, safe against crashes and concurrent writers."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any


from gradad.errors import GradError
from gradad.files import is_stream_path
from gradad.runtime.sinks.base import SinkBase, record_to_json
from gradad.runtime.types import FrameResult

log = logging.getLogger("gradad.runtime.sinks")


#: how much of an existing file's start is read to see that it holds JSON lines (a record is ~1 KB)
FIRST_LINE_BYTES = 1 << 20


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):  # RecursionError: '[' nested a hundred thousand deep
        return False


def _refuse_other_content(path: Path, head: bytes) -> None:
    """Refuse to append to a file that does not start with a JSON record: a line file (or a typo) naming a script,
    a shell start-up file or any other document would otherwise get records appended to it, and a record's text
    comes from file names and camera URLs that others choose. A first line cut short (a run killed while writing
    it) still counts when it starts like a record and the line after it, if any, is one (the next run started on
    a new line)."""
    first, newline, rest = head.partition(b"\n")
    second = rest.partition(b"\n")[0]
    starts_like_one = first.lstrip(b"\xef\xbb\xbf \t").startswith(b"{")
    ok = _is_record(first) or (starts_like_one and (not newline or _is_record(second)))
    if not ok:
        raise GradError(f"JSONL output {path} already holds something other than gradad's JSON lines (its first "
                        f"line is not a JSON record): refusing to append to it; name a new file or a .jsonl file "
                        f"of an earlier run")


class JsonlSink(SinkBase):
    """One JSON line per frame (``FrameResult.to_record()``), plus follow-up records via :meth:`write_record`.

    * The file is opened in **append** mode and never truncated: records of earlier runs are kept (data is never
      lost); start a new file name per run if you want one file per run. An existing file that does not start
      with a JSON record is refused, never appended to. If the existing file ends in a partial
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
    * Before every line (and at :meth:`close`) it checks that the file is still at ``path`` (one ``fstat`` and one
      ``stat``, about 7 us a line on a 2-core machine): nothing written since a check can be missed, so no line is
      ever written twice. Deleted (its folder too), it is created again, with one warning; the lines of this run
      that were in it are counted as lost. Moved away (log rotation), a new file is started at ``path``.
      :meth:`delivery_report` counts the lines this run's file lacks; a file that cannot be created again is one
      :class:`GradError`.
    """

    def __init__(self, path: str | os.PathLike[str], fsync_every: int = 0) -> None:
        if int(fsync_every) < 0:
            raise GradError(f"fsync_every must be >= 0, got {fsync_every}")
        self.path = str(path)
        self.fsync_every = int(fsync_every)
        self.lines_written = 0
        self.reopened = 0  # times the file was found deleted or moved and opened again at ``path``
        self.deleted_lines = 0  # this run's lines that went with a deleted file (not written again)
        self._in_file = 0  # this run's lines in the file now open
        self._gone = False  # deleted and could not be created again (the run stops with that error)
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
                    if not is_stream_path(p):  # /dev/stdout redirected to a log file: a stream, not a JSONL file
                        _refuse_other_content(p, f.read(FIRST_LINE_BYTES))
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._fh = self._open()
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
                self._check_file()
                self._append(line.encode("utf-8"))
                self._in_file += 1
            else:
                self._fh.write(line)
                self._fh.flush()
            self.lines_written += 1
            if self.fsync_every and self.lines_written % self.fsync_every == 0:
                self._fsync()

    def _open(self) -> IO[Any]:
        """The file opened for appending, unbuffered (a line is on disk, in the page cache, when written)."""
        return open(self.path, "ab", buffering=0)

    def _check_file(self) -> None:
        """Reopen the file if it was deleted or moved since the last line (lock held)."""
        if self._gone:
            return
        st = os.fstat(self._fh.fileno())
        try:
            here = os.stat(self.path)
            moved = (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino)
        except OSError:  # gone (its folder too), or a file where its folder was: open it again there
            moved = True
        if st.st_nlink == 0 or moved:
            self._reopen(deleted=st.st_nlink == 0)

    def _reopen(self, deleted: bool) -> None:
        """Open ``path`` again (its folder created again). One warning says what happened and what the file lacks
        (``deleted``: this run's lines in the old file are gone; a log rotation that compressed and removed the file
        at once looks the same, its lines are then in the compressed file)."""
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fh = self._open()
        except OSError as e:
            self._gone = True  # reported once: close() does not try again
            raise GradError(f"JSONL output {self.path} was {'deleted' if deleted else 'moved'} during the run and "
                            f"cannot be created again: {e.strerror or e}; {self._in_file} line(s) of this run went "
                            f"to the old file") from e
        old, self._fh = self._fh, fh
        old.close()
        self.reopened += 1
        if deleted:
            self.deleted_lines += self._in_file
            log.warning("JSONL output %s was deleted during the run: created it again; %d line(s) of this run went "
                        "with the deleted file (or a log rotation compressed them)", self.path, self._in_file)
        else:
            log.warning("JSONL output %s was moved away during the run (log rotation?): the lines so far are in the "
                        "moved file, new ones go to a new %s", self.path, self.path)
        self._in_file = 0

    def _append(self, data: bytes) -> None:
        """Write ``data`` completely, or cut the file back to its last complete line and raise one GradError.

        The cut happens only when the file grew by this partial line alone: another writer's lines appended
        meanwhile are never cut (the partial line is then ended with a newline instead)."""
        fd, start = self._fh.fileno(), -1
        try:
            start = os.fstat(fd).st_size
            view = memoryview(data)
            while view:
                n = self._fh.write(view)
                if not n:  # a regular file that takes nothing more
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[n:]
        except OSError as exc:
            raise GradError(f"cannot write JSONL output {self.path}: {exc.strerror or exc} after {self.lines_written} "
                            f"line(s) of this run; {self._repair(fd, start, data)}") from exc

    def _repair(self, fd: int, start: int, data: bytes) -> str:
        """After a failed write of ``data`` that began at offset ``start``: cut the file back to ``start`` when
        all it gained is a start of ``data``; otherwise (another writer appended too) end the partial line."""
        try:
            if start < 0:
                return "the file may end in a partial line"
            grown = os.fstat(fd).st_size - start
            if grown > 0:
                with open(self.path, "rb") as f:
                    f.seek(start)
                    tail = f.read(grown)
                if not data.startswith(tail):
                    os.write(fd, b"\n")
                    return "its partial line was ended with a newline (another writer had appended after it)"
                os.ftruncate(fd, start)
            return "the file ends at its last complete line"
        except OSError:
            return "the file may end in a partial line"

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
                if self._own_file:
                    self._check_file()  # a file deleted after the last line: counted, reported
                self._fh.flush()
                if self._own_file:
                    self._fsync()
            finally:
                if self._own_file:
                    self._fh.close()
        log.debug("JSONL sink %s closed after %d lines", self.path, self.lines_written)

    def delivery_report(self) -> dict[str, dict[str, Any]]:
        """``{"jsonl": {target, written, reopened, records_lost, complete}}`` for the run summary (a file only):
        ``records_lost`` counts this run's lines that went with a deleted file."""
        if not self._own_file:
            return {}
        return {"jsonl": {"target": self.path, "written": self.lines_written, "reopened": self.reopened,
                          "records_lost": self.deleted_lines, "complete": self.deleted_lines == 0}}
