"""Assertions shared by the command-line tests."""

from __future__ import annotations


def one_error_line(result) -> str:
    """A click result that failed as a user error: exit code 2, no traceback, exactly one 'error:' line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]
