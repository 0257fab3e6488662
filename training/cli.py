"""``grad-train``: two-stage GRAD training from a preset and/or a config file."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from gradad.cli_utils import CLI_CONTEXT, grad_command, printable
from gradad.errors import GradError
from gradad.training.config import (PRESETS, RunConfig, apply_set_options, load_config,
                                   preset_config)
from gradad.training.run_folder import previous_run_files

log = logging.getLogger("gradad.train")


@click.command(context_settings=CLI_CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML/JSON run config "
              "(a run's saved config.yaml reproduces it). Other options override it.")
@click.option("--preset", type=click.Choice(PRESETS), default=None, help="Preset when no --config is given "
              "[default: edge].")
@click.option("--data", "data_roots", multiple=True, type=click.Path(),
              help="Dataset root (MVTec/VisA/GoodsAD/folder layout); repeat for one unified model over several "
                   "roots (class names must differ between them).")
@click.option("--classes", help="Comma-separated classes (default: all classes, one unified model).")
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False), help="Run directory.")
@click.option("--device", help="cpu, cuda, cuda:1 or auto.")
@click.option("--epochs", nargs=2, type=int, help="Stage-1 and stage-2 epochs, e.g. --epochs 10 30.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any setting, e.g. --set model.fusion_depth=3 (repeatable).")
@click.option("--defects", type=click.Path(file_okay=False),
              help="Folder of labelled defect images (sub-folders allowed) used in stage 1 next to the synthetic "
                   "anomalies.")
@click.option("--masks", "defect_masks", type=click.Path(file_okay=False),
              help="Masks of --defects at the same relative paths (<stem>_mask.png or <stem>.png); without it a "
                   "whole defect image counts as anomalous.")
@click.option("--normal-from", type=click.Path(dir_okay=False),
              help="Reuse the normal branch of this model.pt (same data and normal settings) and skip stage 2, "
                   "e.g. to add --defects to a trained model in minutes.")
@click.option("--resume", is_flag=True, help="Continue from the run directory's checkpoint.pt.")
@click.option("--overwrite", is_flag=True, help="Train afresh into a run directory that already holds a model.pt "
              "or checkpoint.pt, replacing them (without it such a directory is refused unless --resume).")
@grad_command
def main(config_path, preset, data_roots, classes, output_dir, device, epochs, assignments, defects, defect_masks,
         normal_from, resume, overwrite) -> None:
    """Train a GRAD anomaly detector on good images only (unified multi-class by default).

    Writes RUN_DIR/model.pt (final model), checkpoint.pt (resumable state), config.yaml (reproduces the run)
    and train_log.jsonl (loss per epoch).

    \b
    Examples:
      grad-train --data demo_data -o runs/demo
      grad-train --data mtd --data mvtec3d -o runs/unified        # one model, classes of both roots
      grad-train --data mtd --defects bad/ --masks bad_masks/ --normal-from runs/mtd/model.pt -o runs/mtd_bad
      grad-train --config runs/demo/config.yaml --resume
      grad-train --preset tiny --data demo_data --set train.batch_size=8
    """
    cfg = load_config(config_path) if config_path else preset_config(preset or "edge")
    if preset and config_path:
        raise click.UsageError("give either --config or --preset, not both")
    if data_roots:
        cfg.data.root, cfg.data.extra_roots = data_roots[0], list(data_roots[1:])
    if defects:
        cfg.data.defects = defects
    if defect_masks:
        cfg.data.defect_masks = defect_masks
    if normal_from:
        cfg.train.normal_from = normal_from
    if classes:
        cfg.data.classes = [c.strip() for c in classes.split(",") if c.strip()]
    if output_dir:
        cfg.output_dir = output_dir
    elif resume and config_path:
        cfg.output_dir = _resume_dir(Path(config_path), Path(cfg.output_dir))
    if device:
        cfg.train.device = device
    if epochs:
        cfg.train.stage1_epochs, cfg.train.stage2_epochs = epochs
    apply_set_options(cfg, list(assignments))
    if not resume and not overwrite:
        _refuse_existing_run(Path(cfg.output_dir), cfg)
    if resume and overwrite and not (Path(cfg.output_dir) / "checkpoint.pt").is_file():
        resume = False  # nothing to resume: --overwrite asks for a fresh run
    from gradad.training.trainer import TrainingInterrupted, train  # heavy import after argument checks

    try:
        model_path = train(cfg, resume=resume)
    except TrainingInterrupted as exc:  # every command's Ctrl-C line (cli_utils), with what can be resumed
        click.echo(f"interrupted (Ctrl-C): {printable(exc, newlines=False)}", err=True)
        raise SystemExit(130) from None
    click.echo(f"model: {model_path}")
    click.echo(_next_step(cfg, model_path))
    log.debug("run dir %s", Path(cfg.output_dir).resolve())


def _next_step(cfg: RunConfig, model_path: Path) -> str:
    """What to run next: grad-eval where the data has labelled defects in its test split, else export and calibrate
    (grad-eval would print a table of dashes: its metrics need good and defect test images)."""
    from gradad.data.datasets import load_samples_from_roots

    try:
        has_defects = any(s.label == 1 for s in load_samples_from_roots(cfg.data.roots, "test", cfg.data.classes,
                                                                          cfg.data.layout))
    except GradError:
        has_defects = False
    if has_defects:
        return f"evaluate with: grad-eval {model_path}"
    return (f"no defect images in the data's test split, so nothing for grad-eval to measure: export with "
            f"grad-export onnx {model_path} -o models/NAME, then set its threshold on held-out good images with "
            f"grad-calibrate models/NAME --good FOLDER")


def _refuse_existing_run(run_dir: Path, cfg: RunConfig) -> None:
    """A fresh run replaces a finished model, a resumable checkpoint, another run's config.yaml and its log (at its
    first checkpoint): say so first. A config.yaml this very run would write (an earlier start of it that stopped
    before its first checkpoint) and its log may go."""
    kept = previous_run_files(run_dir, cfg)
    if kept:
        listed = " and ".join(kept) if len(kept) < 3 else f"{', '.join(kept[:-1])} and {kept[-1]}"
        resumable = "continue it with --resume, " if (run_dir / "checkpoint.pt").is_file() else ""
        raise GradError(f"{run_dir} already holds {listed}: {resumable}train afresh into it with "
                        f"--overwrite (replacing them), or choose another -o")


def _resume_dir(config_path: Path, named: Path) -> str:
    """The run a ``--config D/config.yaml --resume`` continues: D itself when it is a run directory, with a checkpoint
    or only a model file (a NORMAL-only run from --normal-from keeps none): a copied or moved run directory resumes
    where it now is; its config still names the original, which must not be written."""
    here = config_path.parent
    is_run = (here / "checkpoint.pt").is_file() or (here / "model.pt").is_file()
    if is_run and here.resolve() != named.resolve():
        log.info("resuming the run in %s (its config.yaml names %s)", here, named)
        return str(here)
    return str(named)


if __name__ == "__main__":
    main()
