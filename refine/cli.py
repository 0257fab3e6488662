"""``grad-refine``: prepare a bundle for F2PAD refinement, and refine images offline.

    grad-refine prepare --bundle models/demo --checkpoint runs/demo/model.pt --data demo_data
    grad-refine IMAGE|DIR... --bundle models/demo -o refined/      (same as ``grad-refine run ...``)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import click
import numpy as np
import yaml
from tqdm import tqdm

from gradad.bundle import check_bundle_class, warn_refine_settings
from gradad.cli_utils import BUNDLE_FOLDER, CLI_CONTEXT, check_folder_writable, grad_command
from gradad.errors import ConfigError, GradError
from gradad.refine.config import RefineConfig, refine_config_from_dict
from gradad.runtime.refine_result import STATUS_COARSE_KEPT

if TYPE_CHECKING:
    from gradad.refine.bundle_files import RefineParts

log = logging.getLogger(__name__)

RECORDS_FILE = "refine.jsonl"


def apply_refine_set(config: RefineConfig, assignments: tuple[str, ...]) -> RefineConfig:
    """``key=value`` strings (values parsed as YAML) on top of ``config``; unknown keys name themselves."""
    values = config.to_dict()
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value (a RefineConfig field)")
        values[key.strip()] = yaml.safe_load(raw)
    try:
        return refine_config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None


def with_set_over_classes(parts: "RefineParts", assignments: tuple[str, ...]) -> "RefineParts":
    """``parts`` whose tuned per-class settings no longer hold the keys given with ``--set``: a value the user
    typed applies to every class (it would otherwise be replaced by each class's tuned one without a word)."""
    named = {item.partition("=")[0].strip() for item in assignments}
    dropped = named & {key for values in parts.class_settings.values() for key in values}
    if not dropped:
        return parts
    log.info("--set %s overrides the classes' tuned value(s)", ", ".join(sorted(dropped)))
    classes = {name: {k: v for k, v in values.items() if k not in named} for name, values in parts.class_settings.items()}
    return dataclasses.replace(parts, class_settings=classes)


class _DefaultToRun(click.Group):
    """``grad-refine IMAGE ...`` means ``grad-refine run IMAGE ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToRun, context_settings=CLI_CONTEXT)
def main() -> None:
    """F2PAD pixel refinement: sharp defect masks for flagged images (needs the [refine] extra: torch).

    \b
    grad-refine prepare --bundle B --checkpoint MODEL.pt --data TRAIN_ROOT   (once per bundle)
    grad-refine IMAGE|DIR... --bundle B -o OUT                             (= grad-refine run ...)
    """


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=BUNDLE_FOLDER,
              help="Model bundle (grad-export onnx) to prepare.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="The model.pt the bundle was exported from (checked against the ONNX model).")
@click.option("--data", "data_roots", required=True, multiple=True, type=click.Path(file_okay=False),
              help="Dataset root whose good training images fit the pixel prior; repeatable (a unified model's "
              "roots: the prior sees every class).")
@click.option("--classes", multiple=True, help="Classes to use [default: all].")
@click.option("--layout", default="auto", help="Dataset layout (auto, mvtec, visa, goodsad, folder).")
@click.option("--images", "max_images", type=click.IntRange(min=1), default=64, show_default=True,
              help="Training images sampled for the pixel prior.")
@click.option("--set", "assignments", multiple=True, help="RefineConfig override stored in the bundle, e.g. "
              "--set lambda0=0.5 --set time_budget_s=2.")
@grad_command
def prepare(bundle_dir, checkpoint, data_roots, classes, layout, max_images, assignments) -> None:
    """Fit the pixel prior on good training images and add the refinement files to BUNDLE.

    Writes refine_model.<hash>.pt (a copy of CHECKPOINT, after checking it reproduces the bundle's ONNX maps) and
    pixel_prior.<hash>.npz, and records them with hashes, the config and the normal map level in bundle.json.
    """
    from gradad.bundle import Bundle
    from gradad.data.datasets import load_samples_from_roots
    from gradad.refine.bundle_files import prepare_bundle
    from gradad.training.checkpoint import check_checkpoint_file
    from gradad.training.features import load_images

    config = apply_refine_set(RefineConfig(), assignments)
    bundle = Bundle.load(bundle_dir)
    check_checkpoint_file(checkpoint, "--checkpoint")  # before minutes of reading images
    check_folder_writable(bundle_dir, "BUNDLE")
    samples = [s for s in load_samples_from_roots(list(data_roots), "train", list(classes) or None, layout)
               if s.label == 0]
    if not samples:
        raise GradError(f"no good training images under {', '.join(data_roots)}")
    rng = np.random.default_rng(0)
    picked = [samples[i] for i in sorted(rng.choice(len(samples), min(max_images, len(samples)), replace=False))]
    images, _ = load_images(picked, bundle.input.model_height)
    section = prepare_bundle(bundle_dir, checkpoint, images, config)
    prior = section.prior or {}
    click.echo(f"prepared {bundle_dir} for refinement: prior {prior['components']} components on "
               f"{prior['pixels']} pixels of {prior['images']} images; normal map level "
               f"{section.normal_map_level:.3f}; checkpoint matches ONNX to "
               f"{section.checkpoint_vs_onnx_max_rel_error:.1e}")


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=BUNDLE_FOLDER,
              help="Calibrated bundle prepared with grad-refine prepare.")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False),
              help="Labelled dataset root (MVTec layout): the tuning split comes out of its test defects.")
@click.option("--classes", multiple=True, help="Classes to tune [default: all].")
@click.option("--per-defect", type=click.IntRange(min=0), default=2, show_default=True,
              help="Labelled defects per (class, defect type) taken out for tuning (recorded; benchmarks skip them); "
              "0 = all of them, which leaves grad-bench refine none of those types to score.")
@click.option("--split", "split_path", type=click.Path(exists=True),
              help="Tune on the labelled images of this tuning split (grad-bench split's split.json, the images a "
              "model was already tuned on) instead of a fresh --per-defect pick; they are recorded the same way.")
@click.option("--good", "good_dir", type=click.Path(exists=True, file_okay=False),
              help="Held-out good images of the class (not used in training): its coarse-mask threshold and the tau "
              "noise are measured on them [default: <class>/validation/good, else training images].")
@click.option("--include-trained", is_flag=True, help="Also tune on labelled defects the model's stage 1 trained "
              "on (left out by default: the model maps them better than new defects, so settings tuned on them do "
              "not transfer).")
@click.option("--threads", type=click.IntRange(min=0), default=2, show_default=True,
              help="CPU threads (torch and ONNX Runtime).")
@click.option("--set", "assignments", multiple=True, help="RefineConfig override used while tuning.")
@grad_command
def tune(bundle_dir, data_root, classes, per_defect, split_path, good_dir, include_trained, threads,
         assignments) -> None:
    """Choose inpainting, lambda0 and tau per class on a labelled tuning split and store them in BUNDLE.

    coarse threshold: the calibration's pixel rule on the class's held-out good images (a unified bundle's one
    calibrated threshold does not fit every class; without held-out images the bundle's threshold is kept);
    lambda0: the "no defect vs true decomposition" break-even check on the tuning defects; tau (with its
    per-image relative part, the kept coarse interior and the spur trim): the repair noise of good images (--good,
    else <class>/validation/good when it exists, else training images) and IoU on the tuning defects; see
    gradad.refine.tuning.
    """
    from gradad.data.datasets import load_samples
    from gradad.refine.bundle_files import TUNED_UNDER, as_recorded, load_refine_parts, write_class_settings
    from gradad.refine.refiner import Refiner
    from gradad.refine.tuning import (TRAINING_SOURCE, TUNING_SEED, class_coarse_threshold, good_images_for,
                                      labelled_arrays, pick_samples, tune_class, without_trained_defects)
    from gradad.runtime.loader import load_backend

    # the classes' earlier --set record is being replaced: no run-time warning about it while tuning
    parts = dataclasses.replace(load_refine_parts(bundle_dir), tuned_under={})
    config = apply_refine_set(dataclasses.replace(parts.config, threads=threads), assignments)
    # stored with each class's record: run time warns when it refines under other values of these keys
    tuned_under = {key: as_recorded(getattr(config, key))
                   for key in dict.fromkeys(item.partition("=")[0].strip() for item in assignments)}
    refiner = Refiner.from_parts(parts, config)
    size = refiner.detector.head.image_hw[0]
    labelled = every_labelled = load_samples(data_root, "test", list(classes) or None)
    if split_path:
        from gradad.data.tuning_split import partition_by_paths, read_held_out

        _, labelled = partition_by_paths(labelled, read_held_out(split_path))
        per_defect = 0  # every image of the split
    left_out: list = []
    if not include_trained:
        labelled, left_out = without_trained_defects(labelled, refiner.trained_defects, parts.model_path)
    samples = pick_samples(labelled, per_defect, TUNING_SEED)
    if not samples:
        raise GradError(f"no labelled defect images (with masks) under {data_root}"
                        + (" that the model did not train on (--include-trained uses those)" if left_out else ""))
    warn_none_left_to_score(samples, every_labelled, (refiner.trained_defects or set()) | refiner.tuned_defects)
    backend, _ = load_backend(bundle_dir, "onnxruntime", "fp32", threads=threads)
    check_folder_writable(bundle_dir, "--bundle")
    tuned_classes = sorted({s.class_name for s in samples})
    if good_dir and len(tuned_classes) > 1:
        raise GradError(f"--good {good_dir} names one class's good images but {len(tuned_classes)} classes are being "
                        f"tuned ({', '.join(tuned_classes)}): tune one class at a time with --classes NAME")
    settings, records = {}, {}
    for name in tuned_classes:
        chosen = [s for s in samples if s.class_name == name]
        images, truths = labelled_arrays(chosen, size)
        _, maps = backend.infer_all(images.astype(np.float32).transpose(0, 3, 1, 2))
        good, good_source = good_images_for(data_root, name, size,
                                            max(config.coarse_threshold_images, config.mask_tau_images), good_dir)
        threshold = None  # training images score lower than unseen ones: a threshold from them would be too low
        if not good_source.endswith(TRAINING_SOURCE):
            _, good_maps = backend.infer_all(np.stack(good).astype(np.float32).transpose(0, 3, 1, 2))
            threshold = class_coarse_threshold(good_maps, config)
        # without its own coarse threshold the class refines at run time from its calibrated one: tune at that
        calibrated = refiner.calibrated_pixel(name)
        values, evidence = tune_class(refiner, list(images), list(truths), list(maps), good, threshold, calibrated)
        evidence["coarse_threshold"] = {"value": threshold, "good_images": len(good), "from": good_source,
                                        "bundle_pixel_threshold": calibrated}
        settings[name] = values
        records[name] = {**evidence, "data": str(data_root), "good_images_from": good_source,
                         "images": [str(s.image_path.resolve()) for s in chosen], "settings": values,
                         TUNED_UNDER: tuned_under,
                         "left_out_as_trained": [str(s.image_path.resolve()) for s in left_out
                                                 if s.class_name == name]}
        click.echo(f"{name}: {values} ({evidence.get('truth_beats_no_defect_at_lambda0', 0)} of "
                   f"{evidence['flagged_tuning_images']} tuning defects: truth beats 'no defect')")
    backend.close()
    # empty settings too: write_class_settings then drops the class's earlier ones, which this record no longer backs
    write_class_settings(bundle_dir, settings, records)


def warn_none_left_to_score(chosen: list, labelled: list, unscored: set[str]) -> list[str]:
    """One warning naming the (class, defect type)s whose every labelled defect image (with a mask) that
    grad-bench refine could score is among the tuning images ``chosen`` (``unscored``: resolved paths it never
    scores anyway: the model's trained and tuned defects); returns them as ``class/type``."""
    from gradad.refine.tuning import pick_samples

    taken = {str(Path(s.image_path).resolve()) for s in chosen}
    left: dict[str, int] = {}
    for s in pick_samples(labelled, 0, exclude=unscored):  # every scorable labelled defect
        key = f"{s.class_name}/{s.defect_type}"
        left[key] = left.get(key, 0) + (str(Path(s.image_path).resolve()) not in taken)
    used_up = sorted({f"{s.class_name}/{s.defect_type}" for s in chosen} & {k for k, n in left.items() if not n})
    if used_up:
        log.warning("tuning uses every labelled defect image of %s: grad-bench refine has none of them left to score "
                    "without bias (a smaller --per-defect, or split, leaves some)", ", ".join(used_up))
    return used_up


def _input_files(inputs: tuple[str, ...]) -> list[Path]:
    from gradad.data.datasets import is_image_file, list_image_files

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(list_image_files(path))
        elif path.is_file() and is_image_file(path):
            files.append(path)
        else:
            raise GradError(f"not an image file or folder: {path}")
    if not files:
        raise GradError(f"no images found in {', '.join(inputs)}")
    return files


def _unique_stems(files: list[Path]) -> dict[Path, str]:
    """Output name per input: its stem, with _2, _3, ... for repeated stems (a.png + a.jpg, two folders' 001.png),
    so no output overwrites another of the same run."""
    taken: set[str] = set()
    names: dict[Path, str] = {}
    for path in files:
        name, n = path.stem, 1
        while name in taken:  # also when a_2 is itself an input's stem (a.png, a.png in another folder, a_2.png)
            n += 1
            name = f"{path.stem}_{n}"
        taken.add(name)
        names[path] = name
    return names


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise GradError(f"cannot write {path}")


def _save_outputs(out_dir: Path, stem: str, result: Any, original: np.ndarray) -> dict[str, Any]:
    """Write every file of one image at the image's own size, and return the record's file names, size and areas
    (those of the files; the solver's model-size ones as ``model_*``): the masks resampled nearest, the repaired
    image = the image with the solver's region (resampled likewise) replaced by x_n resized back."""
    import cv2

    from gradad.data.images import resize_hw, resize_mask

    h, w = original.shape[:2]
    at_size = {key: resize_mask(mask, h, w)
               for key, mask in (("mask", result.mask), ("coarse", result.coarse_mask), ("region", result.region))}
    out: dict[str, Any] = {
        "height": h, "width": w, **{f"{key}_area_px": int(np.count_nonzero(m)) for key, m in at_size.items()},
        "model_height": int(result.mask.shape[0]), "model_width": int(result.mask.shape[1]),
        "model_mask_area_px": int(np.count_nonzero(result.mask)),
        "mask_file": f"{stem}_mask.png", "coarse_mask_file": f"{stem}_coarse.png", "repaired_file": None}
    for key, name in (("mask", "mask_file"), ("coarse", "coarse_mask_file")):
        _write_png(out_dir / out[name], at_size[key].astype(np.uint8) * 255)
    if result.repaired_anything:  # else coarse mask kept, or nothing flagged: no copy of the input
        out["repaired_file"] = f"{stem}_repaired.png"
        repaired = np.where(at_size["region"][..., None], resize_hw(result.repaired, h, w), original)
        _write_png(out_dir / out["repaired_file"], repaired)
    return out


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--bundle", "bundle_dir", required=True, type=BUNDLE_FOLDER,
              help="Bundle prepared with grad-refine prepare.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--pixel-threshold", type=float, help="Coarse-mask threshold [default: the bundle's calibrated one].")
@click.option("--all", "refine_all", is_flag=True, help="Refine every image, not only those above the image "
              "threshold.")
@click.option("--backend", default="auto", type=click.Choice(["auto", "tensorrt", "onnxruntime"]),
              help="Runtime backend computing the coarse map.")
@click.option("--budget", type=float, help="Seconds per image (time budget) [default: the bundle's config].")
@click.option("--batch", type=int, help="Images refined together [default: the bundle's config].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Refinement device.")
@click.option("--set", "assignments", multiple=True, help="RefineConfig override, e.g. --set max_iterations=300.")
@click.option("--class", "class_name", help="Class of the images: its image threshold, and its settings tuned by "
              "grad-refine tune (an untuned class: the bundle's settings, with a warning) [default: the only tuned "
              "class's settings, else the bundle's].")
@click.option("--overwrite", is_flag=True, help="Write into an output folder that already holds results.")
@grad_command
def run(inputs, bundle_dir, out_dir, pixel_threshold, refine_all, backend, budget, batch, device, assignments,
        class_name, overwrite) -> None:
    """Refine IMAGE|DIR...: writes <stem>_mask.png, <stem>_coarse.png, <stem>_repaired.png (each at the image's
    own size) and refine.jsonl (per image: its size, mask areas at that size, the settings used)."""
    from gradad.bundle import Bundle
    from gradad.data.images import read_image_rgb
    from gradad.refine.bundle_files import load_refine_parts
    from gradad.refine.refiner import Refiner
    from gradad.runtime.backend import infer_in_batches
    from gradad.runtime.loader import load_backend
    from gradad.runtime.pipeline import thresholds_from_bundle
    from gradad.runtime.preprocess import to_model_input

    files = _input_files(inputs)
    stems = _unique_stems(files)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # its masks would replace files of the same names
        raise GradError(f"{out} is not empty: choose another --out or pass --overwrite")
    parts = load_refine_parts(bundle_dir, pixel_threshold)
    bundle = Bundle.load(bundle_dir)
    check_bundle_class(bundle, class_name)  # a typo: grad-run --class refuses it alike
    settings = warn_refine_settings(bundle_dir, bundle.classes or [], parts.class_settings, class_name)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {k: v for k, v in (("time_budget_s", budget), ("max_batch", batch), ("device", device))
                 if v is not None}
    config = apply_refine_set(dataclasses.replace(parts.config, **overrides), assignments)
    if bundle.calibration is None and not refine_all:
        raise GradError(f"bundle {bundle_dir} is not calibrated (no image threshold): run grad-calibrate or pass "
                        "--all to refine every image")
    # the frames grad-run --class flags: the class's own image threshold where it was calibrated on its own
    image_threshold = thresholds_from_bundle(bundle, None, class_name).image if bundle.calibration else None
    runtime_backend, _ = load_backend(bundle_dir, backend)
    refiner = Refiner.from_parts(with_set_over_classes(parts, assignments), config)
    h, w = bundle.input.model_hw
    started = time.perf_counter()
    counts = {"images": 0, "refined": 0, "coarse_kept": 0}
    with (out / RECORDS_FILE).open("w") as records:
        for start in tqdm(range(0, len(files), config.max_batch), desc="refining", unit="batch"):
            chunk = files[start:start + config.max_batch]
            originals = [read_image_rgb(p) for p in chunk]
            model_in = to_model_input(originals, h, w)
            scores, maps = infer_in_batches(runtime_backend, model_in, runtime_backend.max_batch)
            pick = [i for i in range(len(chunk)) if refine_all or scores[i] > image_threshold]
            images = [np.ascontiguousarray(model_in[i].transpose(1, 2, 0)).astype(np.uint8) for i in pick]
            results = dict(zip(pick, refiner.refine(images, [maps[i] for i in pick], [class_name] * len(pick))))
            for i, path in enumerate(chunk):
                # a class whose tuning kept its coarse masks is not refined: its mask is the coarse one
                refined = i in results and results[i].status != STATUS_COARSE_KEPT
                record: dict[str, Any] = {"image": str(path), "score": float(scores[i]), "refined": refined}
                if i in results:
                    record.update(results[i].summary())
                    record.update(_save_outputs(out, stems[path], results[i], originals[i]), settings=settings)
                records.write(json.dumps(record) + "\n")
                records.flush()
            counts["images"] += len(chunk)
            kept = sum(r.status == STATUS_COARSE_KEPT for r in results.values())
            counts["refined"] += len(results) - kept
            counts["coarse_kept"] += kept
    runtime_backend.close()
    note = f" ({counts['coarse_kept']} kept their coarse masks: F2PAD off for their class)" if counts["coarse_kept"] else ""
    click.echo(f"refined {counts['refined']} of {counts['images']} images{note} in "
               f"{time.perf_counter() - started:.1f} s -> {out / RECORDS_FILE}")
