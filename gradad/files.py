"""Atomic file writes: readers (a resumed run, a second process, a crash half-way) see the old file or the new
one, never half of one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


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
