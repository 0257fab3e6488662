"""User-facing errors: one clear line naming the file or setting at fault."""

from __future__ import annotations


class GradError(Exception):
    """An error caused by user input (a path, a file, a setting), shown as one line without a traceback."""


class DatasetError(GradError):
    """A dataset root, class, image or mask that cannot be used."""


class ConfigError(GradError):
    """A configuration value or file that is invalid."""


class CheckpointError(GradError):
    """A missing, corrupt or incompatible model checkpoint / weights file."""
