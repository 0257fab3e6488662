"""Shared command-line plumbing: logging set-up and one-line error reporting."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from gradad.errors import GradError

F = TypeVar("F", bound=Callable[..., Any])

#: click context of every grad-* command: -h works like --help, defaults are shown.
CLI_CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}


def verbose_option(func: F) -> F:
    """The ``-v/--verbose`` flag (debug logging) of every grad-* command."""
    return click.option("-v", "--verbose", is_flag=True, help="Debug logging.")(func)  # type: ignore[return-value]


def setup_logging(verbose: bool = False) -> None:
    """Configure root logging once for a CLI process."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def user_errors_as_exit(func: F) -> F:
    """Turn a GradError into a single 'error: ...' line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GradError as exc:
            click.echo(f"error: {exc}", err=True)
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
