"""Commands that write meet a folder they cannot write: one 'error:' line naming it, exit code 2, no traceback,
and the bundle-writing ones find out before the work starts."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gradad.cli_utils import check_folder_writable, grad_command, os_error_line
from gradad.errors import GradError


def _command(exc: BaseException) -> click.Command:
    @click.command()
    @grad_command
    def failing() -> None:
        raise exc

    return failing


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_os_error_of_the_machine_is_one_line_and_exit_2(tmp_path: Path, code: int) -> None:
    target = tmp_path / "bundle" / ".bundle.json.tmp123"
    result = CliRunner().invoke(_command(OSError(code, os.strerror(code), str(target))))
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.output.strip()
    assert line == f"error: {tmp_path / 'bundle'}: {os.strerror(code)}"  # the folder, not the hidden temporary


def test_other_os_errors_still_raise() -> None:
    result = CliRunner().invoke(_command(OSError(errno.EIO, "Input/output error")))
    assert result.exit_code == 1 and isinstance(result.exception, OSError)
    assert os_error_line(OSError(errno.ENOENT, "No such file or directory", "x.png")) == \
        "x.png: No such file or directory"


def test_ctrl_c_in_any_grad_command_is_one_line_and_exit_130() -> None:
    result = CliRunner().invoke(_command(KeyboardInterrupt()))
    assert result.exit_code == 130 and result.output.strip() == "interrupted (Ctrl-C)"  # not click's "Aborted!", 1


def test_a_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path: Path) -> None:
    """A file in place of the folder (what a read-only mount or a missing permission also give: the temporary
    file cannot be created; the tests run as root, for whom permission bits do not stop a write)."""
    not_a_folder = tmp_path / "bundle"
    not_a_folder.write_text("x")
    with pytest.raises(GradError, match="BUNDLE_DIR .*bundle: cannot write there"):
        check_folder_writable(not_a_folder, "BUNDLE_DIR")
    folder = tmp_path / "ok"
    folder.mkdir()
    assert check_folder_writable(folder, "BUNDLE_DIR") == folder and list(folder.iterdir()) == []


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GradError, match="cannot write there"):
        check_folder_writable(tmp_path / "nope", "--bundle")


def test_grad_calibrate_refuses_an_unwritable_bundle_before_scoring(tmp_path: Path, monkeypatch) -> None:
    """The check runs right after the bundle loads: no image is scored (the scoring function is never called)."""
    import gradad.calibration.calibrate as cal_mod
    import gradad.runtime.loader as loader
    from gradad.calibration.cli import main

    called = []
    monkeypatch.setattr(loader, "load_backend", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(cal_mod, "calibrate", lambda *a, **k: called.append(1))
    result = CliRunner().invoke(main, [str(tmp_path / "missing_bundle"), "--good", str(tmp_path)])
    assert result.exit_code == 2 and "cannot write there" in result.output and not called
