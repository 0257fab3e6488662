"""Shared command-line plumbing: logging set-up and one-line error reporting."""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from gradad.errors import GradError

F = TypeVar("F", bound=Callable[..., Any])

#: click context of every grad-* command: -h works like --help, defaults are shown.
CLI_CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}


class BundleFolder(click.Path):
    """A bundle folder argument: a file given instead (model.pt, model.onnx) is refused saying what a bundle is
    and which command writes one, not only click's "is a file"."""

    def __init__(self) -> None:
        super().__init__(file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if os.path.isfile(value):
            self.fail(f"{str(value)!r} is a file, not a bundle: a bundle is the folder grad-export writes "
                      f"(grad-export onnx MODEL.pt -o models/NAME); pass that folder", param, ctx)
        return super().convert(value, param, ctx)


BUNDLE_FOLDER = BundleFolder()


def verbose_option(func: F) -> F:
    """The ``-v/--verbose`` flag (debug logging) of every grad-* command."""
    return click.option("-v", "--verbose", is_flag=True, help="Debug logging.")(func)  # type: ignore[return-value]


#: C0 controls but newline and tab, DEL and the C1 controls: ESC and CSI (0x9b) start terminal sequences that move
#: the cursor, erase or rewrite lines, and OSC 52 writes the clipboard; BEL, backspace and carriage return overprint.
#: Also the Unicode bidirectional controls (ALM, LRM/RLM, LRE..RLO, LRI..PDI): a terminal that honours them shows
#: text in another order than it is ("Trojan Source"), so a name could display as a different file or hash.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL_CHARS = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_BIDI_CONTROLS}]")
#: The same and newline: for a text meant to be one line, where a newline could forge a line of its own.
_CONTROL_CHARS_AND_NEWLINE = re.compile(f"[\\x00-\\x08\\x0a-\\x1f\\x7f-\\x9f{_BIDI_CONTROLS}]")


def printable(text: object, newlines: bool = True) -> str:
    """``text`` safe to write to a terminal: every control character but newline and tab as a visible escape
    (ESC -> ``\\x1b``), other characters unchanged; ``newlines=False`` escapes newlines too (``\\n``), for a
    text that must stay one line.

    Strings from a bundle.json (its name, classes, file names, calibration folders) are someone else's: printed as
    they are, an escape sequence in them could rewrite the summary lines a user reads before ``grad-export trust``
    or put commands on the clipboard.
    """
    pattern = _CONTROL_CHARS if newlines else _CONTROL_CHARS_AND_NEWLINE
    return pattern.sub(lambda m: ascii(m.group())[1:-1], str(text))


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines pass through :func:`printable` (log lines quote bundle names and paths)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(verbose: bool = False) -> None:
    """Configure root logging once for a CLI process (lines made terminal-safe by :class:`PrintableFormatter`)."""
    handler = logging.StreamHandler()  # stderr, as basicConfig's own
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


#: OSErrors that are the machine's state, not a bug: one line for the user, no traceback.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
                                 errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.EMFILE})


def os_error_line(exc: OSError) -> str:
    """'<file>: <reason>' for an OSError; an atomic write's hidden temporary file is named by its folder."""
    name = exc.filename
    if isinstance(name, (str, os.PathLike)) and Path(name).name.startswith(".") and ".tmp" in Path(name).name:
        name = Path(name).parent
    where = f"{name}: " if name is not None else ""
    return f"{where}{exc.strerror or exc}"


class SettingsFileError(click.ClickException):
    """A settings file's problem found while the command line is parsed (a callback, before
    :func:`user_errors_as_exit` runs): the same one 'error: ...' line and exit code 2, without click's usage
    banner (the message names the file and the setting; the usage says nothing about them)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {printable(self.format_message())}", err=True)


#: top-level module -> the pyproject extra that installs it: a command run on an install without that extra (a
#: Jetson with the lean runtime only, then grad-train) says what to install instead of a traceback
EXTRA_OF_MODULE = {"torch": "train", "torchvision": "train", "timm": "train", "onnx": "export", "onnxslim": "export",
                   "onnxruntime": "runtime", "paho": "mqtt", "matplotlib": "bench"}


def missing_extra_line(exc: ModuleNotFoundError) -> str | None:
    """The one-line error for a missing optional dependency, or None when ``exc`` is about another module."""
    module = exc.name or ""
    extra = EXTRA_OF_MODULE.get(module)  # a missing submodule of an installed package (a version or code bug) has a
    if extra is None:                    # dotted name: not in the table, its traceback stays
        return None
    return (f"this command needs the Python package {module!r}, which is not installed here: "
            f"pip install 'gradad[{extra}]' (from the repository: pip install -e '.[{extra}]')")


def user_errors_as_exit(func: F) -> F:
    """Turn a GradError, or an OSError of the machine's state (read-only or full disk, no permission, missing
    file), into a single 'error: ...' line on stderr and exit code 2 (no traceback); likewise a missing optional
    dependency (naming the extra to install); Ctrl-C into one line and exit code 130, as a shell reports a process
    stopped by SIGINT (click's own handling says 'Aborted!' and exits 1, which scripts and service managers read
    as a failure of the command)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted (Ctrl-C)", err=True)
            sys.exit(130)
        except GradError as exc:  # its message may quote a bundle's strings
            click.echo(f"error: {printable(exc)}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as exc:
            line = missing_extra_line(exc)
            if line is None:
                raise
            logging.getLogger("gradad").debug("the error's traceback", exc_info=True)
            click.echo(f"error: {line}", err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            # a missing file can also be a wrong internal path: -v keeps the traceback for that case
            logging.getLogger("gradad").debug("the error's traceback", exc_info=True)
            click.echo(f"error: {printable(os_error_line(exc))}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def grad_command(func: F) -> F:
    """What every grad-* command body shares: the ``-v/--verbose`` flag, logging set-up before the body runs, and
    a GradError as one 'error: ...' line with exit code 2."""

    @functools.wraps(func)
    def body(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
        setup_logging(verbose)
        return func(*args, **kwargs)

    return verbose_option(user_errors_as_exit(body))  # type: ignore[return-value]


def check_writable(path: str | os.PathLike[str], option: str) -> Path:
    """Fail before the work starts, with one line naming ``option`` and the file, when ``path`` cannot be written
    (read-only folder, a file in place of the folder, a folder in place of the file)."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        raise GradError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


def check_folder_writable(folder: str | os.PathLike[str], what: str) -> Path:
    """Fail before the work starts, with one line naming ``what`` and the folder, when no file can be created in
    ``folder`` (read-only file system, no permission): commands that write into a bundle find out before minutes
    of inference, not after."""
    folder = Path(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gradad-write-check-"):
            pass
    except OSError as exc:
        raise GradError(f"{what} {folder}: cannot write there ({exc.strerror or exc})") from None
    return folder


def check_output_folder(folder: str | os.PathLike[str], what: str) -> Path:
    """Fail before the work starts (minutes of feature extraction or inference), with one line naming ``what``
    and the folder, when results cannot be written into ``folder``: a folder that does not exist yet is not made
    here (a run refused later leaves none); its nearest existing parent must take a new file, and no part of the
    path may be a file or a broken link."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise GradError(f"{what} {folder}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise GradError(f"{what} {folder}: {existing} is a file, not a folder")
    check_folder_writable(existing, what if existing == folder else f"{what} {folder}: its parent")
    return folder
