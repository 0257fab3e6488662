"""``grad-eval``: per-class image/pixel AUROC, AUPR and PRO of a trained model, with figures."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from gradad.cli_utils import CLI_CONTEXT, check_output_folder, grad_command
from gradad.errors import GradError

log = logging.getLogger("gradad.eval")


@click.command(context_settings=CLI_CONTEXT)
@click.argument("model_path", type=click.Path())
@click.option("--data", "data_roots", type=click.Path(), multiple=True, help="Dataset root, repeatable [default: "
              "the roots the model was trained on, all of them for a unified model].")
@click.option("--exclude", type=click.Path(), help="A tuning split (grad-bench split's split.json or its folder): "
              "its images are left out of scoring. The labelled defects the model's stage 1 trained on, and those "
              "held out of stage 1 to pick its epoch and fit the fusion weight, are always left out.")
@click.option("--classes", help="Comma-separated classes [default: the model's classes].")
@click.option("--layout", default=None, help="Dataset layout: auto, mvtec, visa, goodsad, folder.")
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False),
              help="Output folder [default: <model dir>/eval].")
@click.option("--name", default="metrics", help="Base name of the JSON/markdown result files.")
@click.option("--figures", "figures_per_class", type=click.IntRange(min=0), default=5, help="Figures per class (0 = none).")
@click.option("--device", default="auto", help="cpu, cuda or auto.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@grad_command
def main(model_path, data_roots, exclude, classes, layout, out_dir, name, figures_per_class, device,
         batch_size) -> None:
    """Evaluate MODEL_PATH (a grad-train model.pt) on a test split, class by class.

    Writes OUT/NAME.json and OUT/NAME.md (per class and mean: image AUROC/AUPR, pixel AUROC/AUPR, PRO up to
    30% FPR, and the same per defect type) and OUT/figures/*.png (image | ground truth | heat map).
    """
    from gradad.data.datasets import load_samples_from_roots
    from gradad.data.tuning_split import scoring_selection
    from gradad.evaluation.evaluate import evaluate_predictions, save_figures, write_evaluation
    from gradad.evaluation.report import markdown_table
    from gradad.training.checkpoint import load_detector, trained_defect_paths, tuned_defect_paths
    from gradad.training.inference import predict
    from gradad.devices import resolve_torch_device

    out = Path(out_dir) if out_dir else Path(model_path).parent / "eval"
    # the results are written after minutes of inference: find out now that they cannot be
    check_output_folder(out, "--output" if out_dir else "--output (default <model dir>/eval)")
    dev = resolve_torch_device(device, "--device")
    detector, payload = load_detector(model_path, dev)
    cfg = payload["resolved_config"]
    # the roots as the training run resolved them: a relative --data means nothing from another folder
    roots = list(data_roots) or payload.get("data_roots") or cfg.data.roots
    wanted = [c.strip() for c in classes.split(",")] if classes else payload["classes"]
    selection = scoring_selection(load_samples_from_roots(roots, "test", wanted, layout or cfg.data.layout),
                                  exclude, trained_defect_paths(payload), tuned_defect_paths(payload),
                                  frozenset(payload.get("trained_good_digests") or ()))
    samples = selection.kept
    if not samples:
        raise GradError(f"no test images to evaluate on under {', '.join(map(str, roots))} (classes "
                        f"{', '.join(wanted)}): grad-eval needs each class's test/ folder with good and defect images")
    for class_name in sorted({s.class_name for s in samples}):
        labels = {s.label for s in samples if s.class_name == class_name}
        if labels != {0, 1}:
            log.warning("class %s: its test images are all %s, so its image and pixel metrics cannot be computed "
                        "(shown as -): they need good and defect images in its test split", class_name,
                        "defects" if labels == {1} else "good")
    t0 = time.perf_counter()
    norm = payload["normalisation"]
    preds = predict(detector, samples, cfg.data.image_size, norm["mean"], norm["std"], dev, batch_size)
    seconds = time.perf_counter() - t0
    metrics = evaluate_predictions(samples, preds.scores, preds.maps, preds.masks)
    meta = {
        "model": str(model_path),
        "data_root": ", ".join(map(str, roots)),
        "excluded": exclude, "n_excluded": selection.n_split,
        "n_trained_defects_left_out": selection.n_trained, "n_tuned_defects_left_out": selection.n_tuned,
        "n_trained_goods_left_out": selection.n_trained_goods,
        "preset": cfg.preset,
        "backbone": cfg.backbone.name,
        "image_size": cfg.data.image_size,
        "n_test_images": len(samples),
        "inference_seconds": round(seconds, 2),
        "device": str(dev),
        "command": " ".join(["grad-eval", *sys.argv[1:]]),
    }
    json_path, md_path = write_evaluation(out, name, metrics, meta)
    if figures_per_class > 0:
        save_figures(out, samples, preds.scores, preds.maps, preds.images, preds.masks, figures_per_class)
    click.echo(markdown_table(metrics))
    click.echo(f"results: {json_path} and {md_path}")


if __name__ == "__main__":
    main()
