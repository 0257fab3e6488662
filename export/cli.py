"""``grad-export``: checkpoint -> ONNX bundle, TensorRT engine build, bundle inspection."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from gradad.cli_utils import (BUNDLE_FOLDER, CLI_CONTEXT, check_folder_writable, grad_command, printable,
                               user_errors_as_exit)
from gradad.errors import GradError

log = logging.getLogger("gradad.export")

_CTX = CLI_CONTEXT


@click.group(context_settings=_CTX)
def main() -> None:
    """Export a trained GRAD model into a deployable bundle (README: "Deploy: export, calibrate, run").

    \b
      grad-export onnx runs/demo/model.pt -o models/demo     # FP32 + FP16 ONNX, parity-checked
      grad-export build --fp16 models/demo --parity-images imgs/  # TensorRT engine, on the target device
      grad-export quantize models/demo --calib good/ --data DATA   # INT8 QDQ ONNX, AUROC-gated
      grad-export build --int8 models/demo --parity-images imgs/  # INT8 TensorRT engine from the QDQ model
      grad-export inspect models/demo                          # what is in a bundle
      grad-export trust models/demo        # load engines built on another (identical) device
    """


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected HEIGHTxWIDTH, e.g. 480x640") from exc
    from gradad.bundle import MAX_INPUT_SIDE

    if not (16 <= h <= MAX_INPUT_SIDE and 16 <= w <= MAX_INPUT_SIDE):  # bundle.json's schema bounds: refuse now,
        # not after the export when the manifest is validated
        raise click.BadParameter(f"{value!r}: each side must be 16 to {MAX_INPUT_SIDE} pixels",
                                 param_hint="'--input-size'")
    return h, w


@main.command("onnx", context_settings=_CTX)
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Bundle folder to create, e.g. models/NAME.")
@click.option("--name", help="Bundle name [default: the folder name].")
@click.option("--data", "data_root", type=click.Path(), help="Dataset whose test split feeds the parity gates "
              "[default: the training dataset].")
@click.option("--parity-images", type=click.Path(), help="Folder of unlabelled images for the parity gates "
              "instead of a dataset.")
@click.option("--parity-max-images", type=int, default=64, help="Images used for FP16 parity and AUROC.")
@click.option("--input-size", help="Fixed frame size HxW the graph takes and resizes itself "
              "[default: the model's input size; the caller resizes].")
@click.option("--no-fp16", is_flag=True, help="Skip the FP16 ONNX.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim simplification.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle in the output folder (its calibration, "
              "engines and refinement files go with it); refused when the folder holds anything the bundle does not "
              "list.")
@grad_command
def onnx_command(checkpoint, out_dir, name, data_root, parity_images, parity_max_images, input_size, no_fp16,
                 no_simplify, overwrite) -> None:
    """Export CHECKPOINT (grad-train's model.pt) to an ONNX bundle with parity gates.

    Writes model.onnx (FP32, opset 17, dynamic batch, normalisation + map smoothing + image score inside),
    model.fp16.onnx (FP32 where gradad.export.precision says: GridSample, coordinate branch, the model's own
    arithmetic, map head, extractor stem + blocks 0-2) and bundle.json. The bundle is written only if
    ONNX Runtime matches PyTorch and FP16 matches FP32 within the gates; otherwise the numbers are printed.
    """
    from gradad.export.onnx_export import ExportOptions, export_bundle

    opts = ExportOptions(name=name, data_root=data_root, parity_images=parity_images,
                         parity_max_images=parity_max_images, input_size=_parse_size(input_size),
                         fp16=not no_fp16, simplify=not no_simplify, overwrite=overwrite)
    bundle = export_bundle(checkpoint, out_dir, opts)
    click.echo(summary_text(bundle))


@main.command("quantize", context_settings=_CTX)
@click.argument("bundle_dir", type=BUNDLE_FOLDER)
@click.option("--calib", "calib", multiple=True, required=True, type=click.Path(file_okay=False),
              help="Folder of held-out good images to calibrate activation ranges on (repeatable).")
@click.option("--calib-max-images", type=int, default=64, help="Calibration images, spread over the folders.")
@click.option("--data", "data_roots", multiple=True, type=click.Path(), help="Dataset whose test split (good + "
              "defects) gates the image AUROC; repeat for a unified model over several roots [default: the dataset "
              "the bundle was exported with].")
@click.option("--parity-max-images", type=int, default=64, help="Test images of the gate (classes and labels "
              "taken in turn).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              help="Activation range calibration.")
@click.option("--activations", type=click.Choice(["int8", "uint8"]), default="int8",
              help="int8: symmetric, for TensorRT (grad-export build --int8) and ARM CPUs; uint8: asymmetric, "
              "ONNX Runtime's faster INT8 kernels on x86 CPUs (no TensorRT engine from it).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0 = default).")
@grad_command
def quantize_command(bundle_dir, calib, calib_max_images, data_roots, parity_max_images, method, activations,
                     threads) -> None:
    """Add an INT8 QDQ model (model.int8.onnx) to BUNDLE_DIR: ONNX Runtime static quantisation, per-channel
    symmetric INT8 weights, INT8 activations (--activations) calibrated on --calib good images.

    FP32 as in the FP16 ONNX (gradad.export.precision): GridSample, the coordinate mappers and grid modules, the
    model's own arithmetic (cosines, refinement, map fusion, image Gaussian), the map head, and for INT8 the whole
    extractor; the two fusion CNNs are INT8. The model is
    added only if it passes the INT8 gate against the FP32 ONNX (map and score relative L2 error, image-AUROC drop
    <= 0.5 point on the --data test split); the gate's numbers go into bundle.json (parity.onnx_int8_vs_fp32).
    Run it with grad-run --precision int8, or build a TensorRT engine with grad-export build --int8.
    """
    from gradad.bundle import Bundle
    from gradad.export.int8 import QuantizeOptions, quantize_bundle

    Bundle.load(bundle_dir)
    check_folder_writable(bundle_dir, "BUNDLE_DIR")
    opts = QuantizeOptions(calib=list(calib), calib_max_images=calib_max_images, data_roots=list(data_roots),
                           parity_max_images=parity_max_images, method=method, activations=activations,
                           threads=threads)
    report = quantize_bundle(bundle_dir, opts)
    click.echo(f"INT8 model: {Path(bundle_dir) / 'model.int8.onnx'}: map rel L2 {report['map_rel_l2']:.3f}, score "
               f"rel L2 {report['score_rel_l2']:.3f}, image AUROC {report['auroc_fp32']:.4f} (FP32) -> "
               f"{report['auroc_int8']:.4f} (INT8) on {report['images']}")


@main.command("build", context_settings=_CTX)
@click.argument("bundle_dir", type=BUNDLE_FOLDER)
@click.option("--parity-images", required=True, type=click.Path(file_okay=False),
              help="Folder of real images: the engine must match ONNX Runtime FP32 on them or it is deleted.")
@click.option("--fp16/--fp32", default=True, help="Engine precision.")
@click.option("--int8", is_flag=True, help="INT8 engine from the bundle's QDQ model (grad-export quantize first): "
              "explicit quantisation, no calibrator; FP16 where not quantised.")
@click.option("--max-batch", type=int, default=8, help="Largest batch of the optimisation profile.")
@click.option("--opt-batch", type=int, default=1, help="Batch size TensorRT optimises for.")
@click.option("--profiles", type=click.IntRange(min=1), default=2, show_default=True,
              help="Optimisation profiles: the most batches grad-run keeps in flight on this engine (--in-flight).")
@click.option("--workspace-mib", type=int, default=2048, help="Builder workspace limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file, reused and updated "
              "[default: BUNDLE/timing.cache].")
@grad_command
def build_command(bundle_dir, parity_images, fp16, int8, max_batch, opt_batch, profiles, workspace_mib,
                  timing_cache) -> None:
    """Build a TensorRT engine for BUNDLE_DIR on this device (engines are specific to TensorRT version and GPU).

    The engine is compared with ONNX Runtime FP32 on --parity-images (relative L2 of maps and scores, the FP16
    gates) and deleted with the numbers when it misses. Without TensorRT or a GPU this exits with code 2 and
    says so; the bundle's ONNX files stay usable with ONNX Runtime (grad-run --backend onnxruntime).
    """
    from gradad.bundle import Bundle
    from gradad.export.engine import build_bundle_engine

    Bundle.load(bundle_dir)
    check_folder_writable(bundle_dir, "BUNDLE_DIR")
    stamp = build_bundle_engine(bundle_dir, parity_images, fp16=fp16, max_batch=max_batch, opt_batch=opt_batch,
                                workspace_mib=workspace_mib, timing_cache=timing_cache, int8=int8,
                                profiles=profiles)
    click.echo(f"engine: {Path(bundle_dir) / stamp.file} ({stamp.precision}, TensorRT "
               f"{stamp.tensorrt_version}, {stamp.gpu_name} sm{stamp.compute_capability})")


@main.command("inspect", context_settings=_CTX)
@click.argument("bundle_dir", type=BUNDLE_FOLDER)
@click.option("--json", "as_json", is_flag=True, help="Print the whole bundle.json (the calibration's full record "
              "included: rules, image lists, score quantiles).")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the files.")
@user_errors_as_exit
def inspect_command(bundle_dir, as_json, no_verify) -> None:
    """Print a bundle's summary: files and hashes, opset, precision, parity, calibration, engine stamps."""
    from gradad.bundle import Bundle, BundleError

    bundle = Bundle.load(bundle_dir)
    # every listed file and every engine (an engine its files do not list is as bad as a missing one)
    names = list(dict.fromkeys([*bundle.files, *(e.file for e in bundle.engines)]))
    problems: dict[str, str] = {}
    for name in [] if no_verify else names:  # file by file: one bad file hides nothing else
        try:
            bundle.verify([name])
        except BundleError as exc:
            problems[name] = str(exc)
    # json.dumps escapes control characters itself; printable() keeps the rule in one place for both forms
    click.echo(printable(json.dumps(bundle.to_dict(), indent=2) if as_json else summary_text(bundle_dir, problems)))
    if problems:
        raise GradError(f"{len(problems)} of {len(names)} bundle files failed verification: "
                        + "; ".join(problems.values()))


@main.command("trust", context_settings=_CTX)
@click.argument("bundle_dir", type=BUNDLE_FOLDER)
@user_errors_as_exit
def trust_command(bundle_dir) -> None:
    """Let this machine load BUNDLE_DIR's TensorRT engines although they were built elsewhere.

    \b
    An engine is native code: grad-run and grad-calibrate load only engines this machine built (grad-export build)
    or that you trusted here. Use this for engines built by someone you trust on an identical device, e.g. one
    build copied to a fleet of identical Jetsons. The files are verified against bundle.json first; their hashes
    are added to the trust list (GRADAD_TRUST_FILE, default ~/.config/gradad/trusted_engines.json).
    """
    from gradad.bundle import Bundle
    from gradad.engine_trust import trust, trust_file

    bundle = Bundle.load(bundle_dir)
    if not bundle.engines:
        raise GradError(f"bundle {bundle_dir} has no TensorRT engine to trust")
    bundle.verify([e.file for e in bundle.engines])
    for engine in bundle.engines:
        trust(bundle.files[engine.file].sha256, bundle.file(engine.file), "engine")
        # the engine's file name and stamp come from the bundle's author: escape what a terminal would act on
        click.echo(printable(f"trusted {engine.file} ({engine.precision}, TensorRT {engine.tensorrt_version}, "
                             f"{engine.gpu_name}) sha256 {bundle.files[engine.file].sha256}", newlines=False))
    click.echo(printable(f"trust list: {trust_file()}", newlines=False))


def _size_on_disk(bundle_dir: Path, name: str) -> str:
    """What a bundle file that failed verification is now: its size on disk, or why it has none."""
    from gradad.bundle import BundleError, bundle_file

    try:
        path = bundle_file(bundle_dir, name)
    except BundleError:
        return "outside the bundle"
    try:
        if not path.is_file():
            return "missing" if not path.exists() else "not a file"
        size = path.stat().st_size
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return f"{size} bytes on disk" if size < 2 ** 20 else f"{size / 2**20:.1f} MiB on disk"


def summary_text(bundle_dir: str | Path, problems: dict[str, str] | None = None) -> str:
    """Human-readable summary of a bundle; ``problems``: files that failed verification (marked).

    Terminal-safe (:func:`~gradad.cli_utils.printable`): every string in it but the folder comes from bundle.json,
    whose author could otherwise hide escape sequences in a name that rewrite the lines a user checks before
    ``grad-export trust``.
    """
    from gradad.bundle import Bundle, exposure_text

    m = Bundle.load(bundle_dir)
    inp = m.input
    grid_nodes = "?" if m.onnx.gridsample_nodes is None else m.onnx.gridsample_nodes
    problems = problems or {}
    lines = [
        f"bundle {m.name} at {bundle_dir} (schema {m.schema_version}, gradad {m.gradad_version}, "
        f"created {m.created})",
        f"  model: preset {m.preset}, backbone {m.backbone.name}"
        f"{exposure_text(m.backbone.exposure, m.backbone.exposure_max_gain)}, "
        f"classes {', '.join(m.classes)}",
        f"  input: {inp.name} {inp.layout} {inp.dtype} {inp.color} {inp.value_range} at "
        f"{inp.height}x{inp.width} (model {inp.model_height}x{inp.model_width})",
        f"  onnx: opset {m.onnx.opset}, {grid_nodes} GridSample nodes, simplified {m.onnx.simplified}",
        "  files:",
    ]
    width = max([24, *(len(name) for name in m.files)])
    for name, entry in m.files.items():
        mark = "  FAILED VERIFICATION" if name in problems else ""
        held = f" ({_size_on_disk(Path(bundle_dir), name)})" if name in problems else ""  # not the recorded size
        lines.append(f"    {name:{width}s} {entry.bytes / 2**20:8.1f} MiB  sha256 {entry.sha256[:16]}…{mark}{held}")
    p32 = m.parity["onnx_fp32_vs_pytorch"]
    lines.append(f"  parity ONNX FP32 vs PyTorch ({p32['n_images']} images): map max abs {p32['map_max_abs']:.2e}, "
                 f"mean {p32['map_mean_abs']:.2e}; score max abs {p32['score_max_abs']:.2e}")
    p16 = m.parity.get("onnx_fp16_vs_fp32")
    if p16:
        auroc = (f"; image AUROC {p16['auroc_fp32']:.4f} -> {p16['auroc_fp16']:.4f}"
                 if p16.get("auroc_fp32") is not None else "")
        lines.append(f"  parity FP16 vs FP32 ({p16['n_images']} images): map rel L2 {p16['map_rel_l2']:.2e}, "
                     f"max rel {p16['map_max_rel']:.2e}; score rel L2 {p16['score_rel_l2']:.2e}, "
                     f"max rel {p16['score_max_rel']:.2e}{auroc}")
    p8 = m.parity.get("onnx_int8_vs_fp32")
    if p8:
        lines.append(f"  parity INT8 vs FP32 ({p8['n_images']} images): map rel L2 {p8['map_rel_l2']:.2e}, score rel "
                     f"L2 {p8['score_rel_l2']:.2e}; image AUROC {p8['auroc_fp32']:.4f} -> {p8['auroc_int8']:.4f}")
    for e in m.engines:
        mark = ("  FAILED VERIFICATION" + ("" if e.file in m.files else " (not in the files list)")
                if e.file in problems else "")
        lines.append(f"  engine: {e.file} ({e.precision}, TensorRT {e.tensorrt_version}, {e.gpu_name}, "
                     f"sm{e.compute_capability}){mark}")
    if not m.engines:
        lines.append("  engines: none (build one on the target with grad-export build --fp16 BUNDLE --parity-images DIR)")
    # line by line: a newline inside a bundle string would otherwise forge a summary line of its own
    return "\n".join(printable(line, newlines=False) for line in lines + calibration_lines(m.calibration))


def _thr(value: Any) -> str:
    return "–" if value is None else f"{value:#.4g}"


def calibration_lines(cal: Any) -> list[str]:
    """The calibration as a reader wants it: method, thresholds, per-class thresholds as a small table, how many
    good and defect images from where, warnings (the full record, with every image path: inspect --json)."""
    if cal is None:
        return ["  calibration: none (run grad-calibrate)"]
    data = cal.data if isinstance(cal.data, dict) else {}
    lines = [f"  calibration: method {cal.method or '?'}, image threshold {_thr(cal.image_threshold)}, pixel "
             f"threshold {_thr(cal.pixel_threshold)} (raw scores; {cal.backend or 'backend ?'}, {cal.date or 'date ?'})"]
    good = f"{data.get('n_good', '?')} good images"
    if data.get("good_dirs"):
        good += " from " + ", ".join(str(d) for d in data["good_dirs"])
    if data.get("n_good_copies_ignored"):
        good += f" ({data['n_good_copies_ignored']} duplicates counted once)"
    defects = f"{data.get('n_defect') or 0} defect images"
    if data.get("defect_dir"):
        defects += f" from {data['defect_dir']}"
        if data.get("masks_dir"):
            defects += f", masks from {data['masks_dir']}"
    lines.append(f"    data: {good}; {defects}")
    classes = cal.classes if isinstance(cal.classes, dict) else {}
    if classes:
        width = max(5, *(len(str(c)) for c in classes))
        lines.append(f"    {'class':{width}s}  image thr  pixel thr  good images")
        for name, entry in classes.items():
            entry = entry if isinstance(entry, dict) else {}
            lines.append(f"    {str(name):{width}s}  {_thr(entry.get('image_threshold')):>9s}  "
                         f"{_thr(entry.get('pixel_threshold')):>9s}  {entry.get('n_good', '?')!s:>11s}")
    lines += [f"    warning: {w}" for w in cal.warnings or []]
    return lines + ["    (full calibration record: grad-export inspect --json)"]


if __name__ == "__main__":
    main()
