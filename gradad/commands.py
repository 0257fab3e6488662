"""The ``grad`` umbrella command: ``grad train ...`` is ``grad-train ...``, ``grad run --camera 0`` is ``grad-run
--camera 0``, and so on for every console script of pyproject.toml.

Like the console-script table it mirrors, this module names the commands' modules as strings and imports one only
when it runs (``grad --help`` and ``grad run`` import no training, export or torch code), so it keeps the layering
of the packages it names: nothing here imports them at module level.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import click

from gradad.cli_utils import CLI_CONTEXT, missing_extra_line


class CommandEntry(NamedTuple):
    module: str  # where the click command lives
    attribute: str
    summary: str  # for ``grad --help`` without importing the module


#: grad <name> -> the command of grad-<name>
COMMANDS: dict[str, CommandEntry] = {
    "demo-data": CommandEntry("gradad.data.demo_cli", "main", "Write the procedural demo dataset (MVTec layout)."),
    "train": CommandEntry("gradad.training.cli", "main", "Train a GRAD model on images of good parts."),
    "eval": CommandEntry("gradad.evaluation.cli", "main", "Per-class metrics and figures of a trained model."),
    "export": CommandEntry("gradad.export.cli", "main", "Bundles: ONNX, FP16, INT8, TensorRT engines, inspect."),
    "calibrate": CommandEntry("gradad.calibration.cli", "main", "Thresholds of a bundle from held-out good images."),
    "run": CommandEntry("gradad.runtime.cli", "main", "Score cameras, videos or image folders with a bundle."),
    "refine": CommandEntry("gradad.refine.cli", "main", "F2PAD pixel refinement: prepare, tune, refine."),
    "bench": CommandEntry("gradad.benchmarks.cli", "main", "Accuracy, latency and F2PAD benchmarks; results page."),
}


def load_command(name: str) -> click.Command:
    """The click command behind ``grad-<name>``."""
    entry = COMMANDS[name]
    return getattr(importlib.import_module(entry.module), entry.attribute)


class _LazyGroup(click.Group):
    """A group whose subcommands are imported when they run (or when their own --help is asked for)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        try:
            return load_command(cmd_name)
        except ModuleNotFoundError as exc:  # a command module that imports an optional package when loaded
            line = missing_extra_line(exc)
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            ctx.exit(2)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, entry.summary) for name, entry in COMMANDS.items()])


@click.group(cls=_LazyGroup, context_settings=CLI_CONTEXT)
def main() -> None:
    """GRAD edge inspection toolchain: every grad-* tool in one command (grad train = grad-train).

    \b
    The usual order: grad train -> grad eval -> grad export onnx -> grad calibrate -> grad run
    Each command's options: grad COMMAND --help
    """
