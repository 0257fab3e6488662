"""``grad-calibrate``: set image and pixel thresholds of a bundle from held-out images."""

from __future__ import annotations

import click

from gradad.cli_utils import BUNDLE_FOLDER, CLI_CONTEXT, check_folder_writable, grad_command


@click.command(context_settings=CLI_CONTEXT)
@click.argument("bundle_dir", type=BUNDLE_FOLDER)
@click.option("--good", "good_dir", required=True, multiple=True, type=click.Path(),
              help="Folder of held-out GOOD images, repeatable (one per class for a unified model) "
              "(not used in training).")
@click.option("--defect", "defect_dir", type=click.Path(), help="Folder of labelled defective images (optional).")
@click.option("--masks", "masks_dir", type=click.Path(), help="Masks of the defect images (<stem>_mask.png); "
              "sets the pixel threshold by F1.")
@click.option("--false-alarm-rate", type=float, default=0.01, help="Target fraction of good parts flagged.")
@click.option("--target-recall", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              help="Recall for the 'recall' rule (with --defect).")
@click.option("--method", type=click.Choice(["far", "f1", "recall"]), default="far",
              help="Rule that sets the active threshold (f1/recall need --defect).")
@click.option("--backend", default="auto", help="auto, onnxruntime or tensorrt: calibrate on what the line runs.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="[default: fp16 for TensorRT, fp32 for ONNX Runtime]")
@click.option("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0 = default).")
@click.option("--dry-run", is_flag=True, help="Print the table without writing bundle.json.")
@grad_command
def main(bundle_dir, good_dir, defect_dir, masks_dir, false_alarm_rate, target_recall, method, backend, precision,
         threads, dry_run) -> None:
    """Calibrate BUNDLE_DIR's thresholds through the runtime backend (the same numbers the line will see).

    With good images only, the image threshold is set for the target false-alarm rate (with its 95% upper
    bound, and a warning when the set is too small). With --defect, the F1-optimal and target-recall thresholds
    are reported too. The result is stored in bundle.json; grad-run uses it (--threshold overrides).
    """
    from gradad.calibration.calibrate import calibrate, calibration_table, store_calibration
    from gradad.calibration.thresholds import CalibrationConfig
    from gradad.runtime.loader import load_backend

    engine, bundle = load_backend(bundle_dir, backend, precision, threads=threads)
    if not dry_run:
        check_folder_writable(bundle_dir, "BUNDLE_DIR")
    cfg = CalibrationConfig(false_alarm_rate=false_alarm_rate, target_recall=target_recall, method=method)
    cal = calibrate(engine, good_dir, defect_dir, masks_dir, cfg, bundle=bundle)
    click.echo(calibration_table(cal))
    if cal.warnings:  # each was logged when found (above); repeating them doubled every warning in a log file
        stored = "" if dry_run else ", stored with the thresholds (grad-export inspect shows them)"
        click.echo(f"{len(cal.warnings)} warning(s) above{stored}", err=True)
    if not dry_run:
        path = store_calibration(bundle_dir, cal)
        click.echo(f"thresholds written to {path} (image {cal.image_threshold:.4f}, "
                   f"pixel {cal.pixel_threshold:.4f}, method {cal.method})")


if __name__ == "__main__":
    main()
