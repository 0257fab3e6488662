"""Result files of ``grad-bench``: one JSON per run (with its ``kind`` and exact command) plus a markdown table."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gradad.errors import GradError
from gradad.evaluation.report import to_jsonable

log = logging.getLogger(__name__)

RESULTS_SCHEMA_VERSION = 1
KIND_ACCURACY = "accuracy"
KIND_LATENCY = "latency"
KIND_REFINE = "refine"  # F2PAD mask benchmark (benchmarks/refine_masks.py)
KIND_PREPARATION = "preparation"  # hand-written: the commands that made the models the results evaluate


def command_line(args: list[str], program: str = "grad-bench") -> str:
    """The command as a user would type it: program name + shell-quoted arguments."""
    return " ".join([program, *(shlex.quote(a) for a in args)])


def now_iso() -> str:
    """UTC time stamp, seconds resolution."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version() -> dict[str, Any]:
    """The git commit the code ran from and whether the working tree had changes (``dirty``), so a result can be
    tied to the code that made it; nulls outside a git checkout (an installed wheel)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def result_header(kind: str, name: str, command: str) -> dict[str, Any]:
    """The fields every ``grad-bench`` result file starts with (kind, exact command, time, code version)."""
    return {"kind": kind, "schema_version": RESULTS_SCHEMA_VERSION, "name": name, "created": now_iso(),
            "command": command, "code": code_version()}


def _refuse_foreign(json_path: Path, md_path: Path, kind: Any) -> None:
    """Refuse to replace files that are not an earlier result of the same kind: a --name that matches a
    hand-written record (``preparation.json``) or the folder's README.md would silently overwrite it."""
    if json_path.exists():
        try:
            old_kind = json.loads(json_path.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):  # not JSON, or not an object: not ours either
            old_kind = None
        if old_kind is None or old_kind != kind:
            raise GradError(f"{json_path} exists and is not a {kind!r} result (kind {old_kind!r}): choose another "
                            f"--name or -o")
    elif md_path.exists():  # a markdown file without its result JSON was not written by grad-bench
        raise GradError(f"{md_path} exists and is not a grad-bench result: choose another --name or -o")


def check_result_name(name: str, option: str = "--name") -> str:
    """A result name is a file stem in the ``-o`` folder: one with a path separator, or ``.``/``..``, would put the
    files (and a refine run's ``NAME_panels/``) somewhere else, so it is refused naming ``option``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise GradError(f"{option} {name!r}: give a plain file name (no path separator, not '..'); choose the "
                        f"folder with -o")
    return name


def write_result_files(out_dir: str | Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` (floats to 6 significant digits, nan as null) and ``<name>.md``; an existing
    pair is replaced only when its JSON is a result of the same ``kind`` as ``payload``."""
    check_result_name(name)
    out = Path(out_dir)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    _refuse_foreign(json_path, md_path, payload.get("kind"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        md_path.write_text(markdown.rstrip("\n") + "\n", encoding="utf-8")
    except OSError as exc:
        raise GradError(f"cannot write results to {out}: {exc}") from exc
    log.info("results: %s and %s", json_path, md_path)
    return json_path, md_path


def load_result_files(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` in ``folder`` by file name (sorted); a file that is not valid JSON is a user error."""
    root = Path(folder)
    if not root.is_dir():
        raise GradError(f"results folder not found: {root}")
    results = {}
    for path in sorted(root.glob("*.json")):
        try:
            results[path.name] = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GradError(f"{path} is not valid JSON: {exc}") from exc
    return results
