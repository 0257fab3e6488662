"""The run folder of ``grad-train``: what an earlier run left in it.

Light imports only: the command line checks a run folder before it imports torch.
"""

from __future__ import annotations

from pathlib import Path

from gradad.training.config import RunConfig, config_text


def holds_text(path: Path, text: str) -> bool:
    """True when the file at ``path`` reads exactly ``text`` (False when missing or unreadable)."""
    try:
        return path.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


def previous_run_files(run_dir: Path, cfg: RunConfig) -> list[str]:
    """The files of another run (or of the user) that a fresh run of ``cfg`` in ``run_dir`` would replace: a model
    file, a checkpoint, a config.yaml other than the one this run writes, and the log beside any of them. A
    config.yaml of this very run (an earlier start that stopped before its first checkpoint) and its log are not
    another run's."""
    kept = [name for name in ("model.pt", "checkpoint.pt") if (run_dir / name).is_file()]
    ours = holds_text(run_dir / "config.yaml", config_text(cfg))
    if not ours and (run_dir / "config.yaml").is_file():
        kept.append("config.yaml")
    # a log beside another run's files is that run's; without them it is this run's only when config.yaml is this
    # run's (grad-train writes config.yaml first)
    if (kept or not ours) and (run_dir / "train_log.jsonl").is_file():
        kept.append("train_log.jsonl")
    return kept
