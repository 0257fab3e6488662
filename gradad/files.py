"""Atomic file writes: readers (a resumed run, a second process, a crash half-way) see the old file or the new
one, never half of one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from gradad.errors import GradError


@contextmanager
def atomic_file(path: str | os.PathLike[str], fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` when the block ends without error (else it is removed).

    The temporary file is hidden (``.<name>.tmp<pid>``) beside ``path``, so the rename stays on one file system.
    ``fsync`` flushes it to disk before the rename (worth it for files that are costly to lose, not for frames).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with os.fdopen(_create_exclusive(tmp), "wb") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_exclusive(tmp: Path) -> int:
    """Open a new ``tmp`` for writing without following a link planted at its name.

    The folder may come from someone else (a bundle): a symlink named like our temporary file would otherwise have
    the write land on its target (any file the user can write), so an entry already there is removed, never opened.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        return os.open(tmp, flags, 0o666)
    except FileExistsError:
        tmp.unlink()  # a stale temporary file or a planted link: unlinking removes the entry, not its target
        return os.open(tmp, flags, 0o666)


def is_stream_path(path: str | os.PathLike[str]) -> bool:
    """``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``: the process's own stream, whatever file it was
    redirected to; written through, never replaced by a file of its own nor read as a document."""
    return str(Path(path).absolute()).startswith(("/dev/", "/proc/"))


def atomic_write_bytes(path: str | os.PathLike[str], data: Any, fsync: bool = False) -> None:
    """Write ``data`` (bytes or any buffer, e.g. a TensorRT IHostMemory) to ``path`` atomically."""
    with atomic_file(path, fsync) as fh:
        fh.write(memoryview(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, fsync: bool = False) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync)


def looks_like_onnx(path: str | os.PathLike[str]) -> bool:
    """An ONNX model where a torch checkpoint is expected: the ``.onnx`` suffix, or a protobuf's first byte (0x08,
    the ir_version field) on a file that is no zip archive (torch checkpoints are zip archives)."""
    import zipfile

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    with path.open("rb") as f:
        first = f.read(1)
    return first == b"\x08" and not zipfile.is_zipfile(path)


#: Bytes a zip archive may hold beyond what its members' stored data and the file size account for: torch.save
#: pads records to 64-byte boundaries in extra fields and writes small bookkeeping records (version, byteorder).
ZIP_SLACK_BYTES = 64 * 1024


def check_zip_expansion(path: str | os.PathLike[str], what: str, max_bytes: int | None = None,
                        max_ratio: float = 1.0, slack: int = ZIP_SLACK_BYTES,
                        error: type[GradError] = GradError) -> None:
    """Refuse, with one line naming ``what`` and ``path``, a zip archive whose members inflate to more memory than
    the file can honestly hold, before a loader (``np.load`` of an ``.npz``, ``torch.load``) decompresses them.

    Both ``np.load`` and ``torch.load`` allocate and inflate each member whole, as large as the archive's central
    directory says: a deflated record of zeros shrinks ~1000:1, so a few MB of file become GBs of memory (and an
    out-of-memory kill on a Jetson). Only the central directory is read here (no member is decompressed), which is
    what both loaders use for the sizes.

    * a member is refused when its uncompressed size exceeds ``max_ratio`` times its compressed size plus
      ``slack`` (``max_ratio`` 1: stored records only, which is how torch.save and np.savez write);
    * the archive is refused when the members' uncompressed total exceeds ``max_bytes`` (default: the file's own
      size plus ``slack``, all stored records can hold; it also defeats members that share one stored record).

    A file that is no zip archive passes (a legacy torch file stores its tensors raw, a loader reports any other
    file); a file that starts like a zip but whose directory cannot be read is refused, as its loader's own zip
    reader might read it differently. ``error``: the GradError subclass to raise.
    """
    import zipfile

    path = Path(path)
    try:
        with path.open("rb") as fh:
            starts_like_zip = fh.read(4) == b"PK\x03\x04"  # how torch.load tells a zip checkpoint from a legacy one
        file_bytes = path.stat().st_size
    except OSError:
        return  # missing, a folder, no permission: the loader names the file in its own words
    if not starts_like_zip and not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise error(f"cannot read {what} {path}: not a readable zip archive ({exc})") from None
    limit = file_bytes + slack if max_bytes is None else max_bytes
    rule = "torch.save stores members uncompressed" if max_ratio <= 1 else f"at most {max_ratio:g}:1 is accepted"
    for info in members:
        if info.file_size > info.compress_size * max_ratio + slack:
            raise error(f"refusing {what} {path}: member {info.filename!r} would inflate from "
                        f"{info.compress_size} to {info.file_size} bytes, a compression bomb ({rule})")
    total = sum(info.file_size for info in members)
    if total > limit:
        raise error(f"refusing {what} {path}: its members would inflate to {total} bytes from a "
                    f"{file_bytes}-byte file (at most {limit} bytes are accepted)")
