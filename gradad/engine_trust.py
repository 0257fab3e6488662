"""Which TensorRT engines and timing caches this machine may load.

A serialised TensorRT engine is native code: NVIDIA's security notes treat deserialising an engine from an untrusted
source as running untrusted code (an engine can carry plugin libraries), and a bundle's recorded hash proves nothing
(its author writes it). So engines, and the timing caches the builder reads, are loaded only when their SHA-256 is
in this machine's trust list: ``grad-export build`` adds what it builds, ``grad-export trust BUNDLE`` adds a bundle's
engines built elsewhere by someone the user trusts (one build copied to identical Jetsons). A bundle from anyone else
still runs, on ONNX Runtime, whose graphs are data.

The list is ``$GRADAD_TRUST_FILE`` or ``$XDG_CONFIG_HOME/gradad/trusted_engines.json`` (``~/.config/...``).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from gradad.errors import GradError
from gradad.files import atomic_write_text

TRUST_FILE_ENV = "GRADAD_TRUST_FILE"


class TrustListError(GradError):
    """The trust list cannot be read or written."""


def trust_file() -> Path:
    """Where this user's trust list lives (see the module docstring)."""
    if os.environ.get(TRUST_FILE_ENV):
        return Path(os.environ[TRUST_FILE_ENV])
    try:
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    except RuntimeError:  # no HOME and no passwd entry (docker --user N): say what to set, no traceback
        raise TrustListError(f"no home folder for the TensorRT trust list: set {TRUST_FILE_ENV} to a file "
                             "this user may write") from None
    return Path(config_home) / "gradad" / "trusted_engines.json"


def _refuse_non_file(path: Path) -> None:
    """A trust list path that exists but is no file (a folder, a device) is refused before anything is written."""
    if path.exists() and not path.is_file():
        example = f" (e.g. {path / 'trusted_engines.json'})" if path.is_dir() else ""
        raise TrustListError(f"TensorRT trust list {path} is {'a folder' if path.is_dir() else 'not a file'}: set "
                             f"{TRUST_FILE_ENV} to the path of a file{example}")


def trusted_hashes() -> dict[str, dict[str, Any]]:
    """sha256 -> what was trusted (file, kind, time); empty when no list exists yet."""
    path = trust_file()
    _refuse_non_file(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["sha256"]
        if not isinstance(entries, dict):
            raise TypeError("'sha256' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrustListError(f"TensorRT trust list {path} is unreadable ({exc}); delete it and rebuild the engines "
                             f"with grad-export build (or re-trust them with grad-export trust)") from None
    return entries


def is_trusted(sha256: str) -> bool:
    """Whether an engine or timing cache with this SHA-256 was built here or trusted by the user."""
    return sha256 in trusted_hashes()


def trust(sha256: str, file: str | Path, kind: str) -> None:
    """Add one file's hash to the trust list (``kind``: "engine" or "timing cache"); the list stays private.

    Read, update and write happen under a lock, so two builds at once (fp16 and int8) both land."""
    path = trust_file()
    _refuse_non_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            entries = trusted_hashes()
            entries[sha256] = {"file": str(Path(file).resolve()), "kind": kind,
                               "added": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write_text(path, json.dumps({"format": 1, "sha256": entries}, indent=1) + "\n")
            path.chmod(0o600)
    except OSError as exc:
        raise TrustListError(f"cannot write the TensorRT trust list {path}: {exc}") from None


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX; elsewhere none: one build at a time there). The lock file is never
    removed: flock locks the open file, so removing its path while another process waits on it would let a third
    one lock a new file at the same path."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def untrusted_message(file: str | Path, bundle_dir: str | Path, rebuild: str) -> str:
    """Why an engine is refused and the two ways forward."""
    return (f"engine {file} in {bundle_dir} is not in this user's trust list {trust_file()} (built elsewhere, by "
            f"another user, or by a gradad without trust lists): a TensorRT engine is native code, so it is only "
            f"loaded once trusted. Build it here with `{rebuild}`, or, if you trust whoever built it, run "
            f"`grad-export trust {bundle_dir}` as the user that runs grad-run")
