"""``grad-bench``: accuracy and latency benchmarks with peer baselines, and the results page.

    grad-bench accuracy --data demo_data --checkpoint runs/demo/model.pt --bundle models/demo --patchcore \\
        --normal-only runs/demo-normal-only/model.pt -o benchmarks/results --name demo_accuracy
    grad-bench latency --preset edge --preset paper --threads 2 -o benchmarks/results --name cpu_latency
    grad-bench refine --bundle models/demo --data demo_data --per-defect 3 -o benchmarks/results --name demo_f2pad
    grad-bench gpu -o benchmarks/results --name gpu_check      # CUDA-only rows; skipped with reasons elsewhere
    grad-bench split --data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d --per-type 3 -o runs/split
    grad-bench report benchmarks/results
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import click

from gradad.cli_utils import CLI_CONTEXT, grad_command

log = logging.getLogger("gradad.bench")

DEFAULT_OUT = "benchmarks/results"
RAW_ARGS = "gradad.bench.raw_args"
CONTEXT = CLI_CONTEXT


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _batches(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated integers, e.g. 1,2,4,8") from None


def _plain_name(command: Callable[..., Any]) -> Callable[..., Any]:
    """Check ``--name`` before the command runs: a file stem inside the -o folder (one 'error:' line otherwise)."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        from gradad.benchmarks.results_io import check_result_name

        check_result_name(kwargs["name"])
        return command(*args, **kwargs)

    return checked


def output_options(default_name: str, what: str = "JSON/markdown files"):
    """-o/--output, --name, -v and the one-line user errors of every command that writes result files."""

    def wrap(command):
        command = grad_command(_plain_name(command))
        command = click.option("--name", default=default_name, help=f"Base name of the {what}.")(command)
        return click.option("-o", "--output", "out_dir", default=DEFAULT_OUT,
                            type=click.Path(file_okay=False))(command)

    return wrap


class RecordingGroup(click.Group):
    """A group that remembers its raw arguments, so result files can store the exact command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[RAW_ARGS] = list(args)
        return super().parse_args(ctx, args)


def _command() -> str:
    from gradad.benchmarks.results_io import command_line

    return command_line(click.get_current_context().meta.get(RAW_ARGS, []))


@click.group(cls=RecordingGroup, context_settings=CONTEXT)
def main() -> None:
    """Benchmarks: accuracy (GRAD backends + PatchCore + NORMAL-only), latency, results page."""


@main.command(context_settings=CONTEXT)
@click.option("--data", "data_roots", required=True, multiple=True, type=click.Path(),
              help="Dataset root (any supported layout); repeat for a unified model over several roots.")
@click.option("--exclude", type=click.Path(), help="Tuning split (split.json from `grad-bench split`): its images "
              "are left out of scoring.")
@click.option("--classes", help="Comma-separated classes [default: the model's, else all].")
@click.option("--layout", default="auto", help="auto, mvtec, visa, goodsad, folder.")
@click.option("--checkpoint", type=click.Path(), help="GRAD model.pt: the PyTorch row.")
@click.option("--bundle", type=click.Path(), help="Bundle dir: ONNX Runtime FP32/FP16 and TensorRT rows.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["pytorch", "onnxruntime-fp32",
              "onnxruntime-fp16", "onnxruntime-int8", "tensorrt"]),
              help="Rows to run [default: all whose model is given; onnxruntime-int8 when the bundle has "
                   "model.int8.onnx from grad-export quantize].")
@click.option("--normal-only", type=click.Path(), help="NORMAL-only GRAD model.pt: the ablation row.")
@click.option("--patchcore", is_flag=True, help="Add the PatchCore row (same extractor and map head).")
@click.option("--coreset-ratio", type=float, default=0.01, help="PatchCore coreset fraction (1-10%).")
@click.option("--cache-dir", default="cache/features", help="Feature cache for PatchCore's memory bank.")
@click.option("--batch-size", type=int, default=8)
@click.option("--threads", type=int, default=0, help="torch and ONNX Runtime CPU threads (0 = default).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="PyTorch rows' device.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Paired bootstrap resamples of the test images for every row's difference to the first row "
                   "(image AUROC, pixel AUROC, pixel AUPR, with intervals); 0 = none.")
@output_options("accuracy")
def accuracy(data_roots, exclude, classes, layout, checkpoint, bundle, backends, normal_only, patchcore,
             coreset_ratio, cache_dir, batch_size, threads, device, bootstrap, out_dir, name) -> None:
    """Per-class and mean image/pixel AUROC, AUPR, PRO and F1 of every row on one test set (unified protocol)."""
    from gradad.benchmarks.accuracy import BACKENDS, AccuracyConfig, accuracy_markdown, run_accuracy
    from gradad.benchmarks.results_io import KIND_ACCURACY, result_header, write_result_files

    cfg = AccuracyConfig(data_roots=list(data_roots), exclude=exclude, classes=_csv(classes), layout=layout,
                         checkpoint=checkpoint, bundle=bundle, backends=tuple(backends) or BACKENDS, normal_only=normal_only,
                         patchcore=patchcore, coreset_ratio=coreset_ratio, cache_dir=cache_dir,
                         batch_size=batch_size, threads=threads, device=device, bootstrap=bootstrap)
    result = {**result_header(KIND_ACCURACY, name, _command()), **run_accuracy(cfg)}
    json_path, md_path = write_result_files(out_dir, name, result, accuracy_markdown(result))
    click.echo(accuracy_markdown(result))
    click.echo(f"results: {json_path} and {md_path}")


@main.command(context_settings=CONTEXT)
@click.option("--preset", "presets", multiple=True, type=click.Choice(["edge", "paper", "tiny"]),
              help="Random-weight preset (repeatable).")
@click.option("--bundle", type=click.Path(), help="Bundle dir: its ONNX Runtime files and TensorRT engine.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["pytorch", "onnxruntime-fp32",
              "onnxruntime-fp16", "onnxruntime-int8", "tensorrt"]), help="Rows to run [default: all available].")
@click.option("--today", is_flag=True, help="With --bundle: add today's float path (the graph taking float32 "
              "frames, float32 preprocessing) to compare the uint8 rows with, in the same run.")
@click.option("--grad-run", "grad_run_frames", type=int, default=0, help="With --bundle: grad-run --benchmark rows "
              "of this many frames per batch size: today's serial loop on a float32-input copy vs the pipelined loop "
              "per precision (0 = none).")
@click.option("--pace", "pace_fps", type=float, default=0.0, help="grad-run rows: frames per second of the paced "
              "batch-1 run that measures end-to-end latency below saturation (0 = half the row's batch-1 FPS).")
@click.option("--patchcore/--no-patchcore", default=True, help="Add the PatchCore comparison row.")
@click.option("--patchcore-bank", "bank_size", type=int, default=None,
              help="PatchCore memory-bank rows [default: 7782, the 1% coreset of MTD].")
@click.option("--images", type=click.Path(), help="Image folder for the decode stage [default: synthetic PNGs].")
@click.option("--batches", default="1,2,4,8", help="Batch sizes; FPS is reported at 1 and at the best one.")
@click.option("--threads", type=int, default=2, help="torch intra-op and ONNX Runtime intra-op threads.")
@click.option("--warmup", type=int, default=5, help="Warm-up iterations per batch size.")
@click.option("--iters", type=int, default=100, help="Timed iterations per batch size (at most).")
@click.option("--min-iters", type=int, default=5, help="Timed iterations per batch size (at least).")
@click.option("--max-seconds", type=float, default=20.0, help="Stop a batch size after this long (past --min-iters).")
@output_options("latency")
def latency(presets, bundle, backends, today, grad_run_frames, pace_fps, patchcore, bank_size, images, batches,
            threads, warmup, iters, min_iters, max_seconds, out_dir, name) -> None:
    """Per-stage p50/p95/p99, FPS (batch 1 and best), peak RSS, GFLOP and parameters per backend and precision.

    \b
    With --bundle --today --grad-run N: today's path against the new one in the same run (uint8 graph input,
    INT8, pipelined grad-run loop), with their ratios:
      grad-bench latency --bundle models/demo --today --grad-run 300 --threads 2 --no-patchcore --name edge_speed
    """
    from gradad.benchmarks.latency import (BACKENDS, MTD_CORESET_BANK, LatencyConfig, failed_rows,
                                           latency_markdown, run_latency)
    from gradad.benchmarks.results_io import KIND_LATENCY, result_header, write_result_files
    from gradad.errors import GradError

    cfg = LatencyConfig(presets=list(presets), bundle=bundle, backends=tuple(backends) or BACKENDS,
                        patchcore=patchcore, bank_size=MTD_CORESET_BANK if bank_size is None else bank_size,
                        images=images, batches=_batches(batches), threads=threads, warmup=warmup, iters=iters,
                        min_iters=min_iters, max_seconds=max_seconds, today=today, grad_run_frames=grad_run_frames,
                        pace_fps=pace_fps)
    result = {**result_header(KIND_LATENCY, name, _command()), **run_latency(cfg)}
    json_path, md_path = write_result_files(out_dir, name, result, latency_markdown(result))
    click.echo(latency_markdown(result))
    click.echo(f"results: {json_path} and {md_path}")
    failed = failed_rows(result)
    if failed:  # the files hold every row that finished; the exit status tells a script that some did not
        raise GradError(f"{len(failed)} latency row(s) failed ({'; '.join(f['label'] for f in failed)}); the "
                        f"{len(result['rows'])} row(s) that finished and the errors are in {json_path}")


@main.command(context_settings=CONTEXT)
@click.option("--smoke", is_flag=True, help="Tiny sizes (tiny preset, batches 1,2, short budgets): a quick end-to-end "
              "pass; options given explicitly still apply.")
@click.option("--preset", "presets", multiple=True, type=click.Choice(["edge", "paper", "tiny"]),
              help="Latency presets (repeatable) [default: edge, paper; --smoke: tiny].")
@click.option("--batches", help="Latency batch sizes [default: 1,8,32; --smoke: 1,2].")
@click.option("--train-preset", "train_presets", multiple=True, type=click.Choice(["edge", "paper", "tiny"]),
              help="Training-speed presets (repeatable) [default: edge, paper; --smoke: tiny].")
@click.option("--train-images", type=int, help="Feature maps per training epoch [default: 760, MTD's size].")
@click.option("--cpu-train/--no-cpu-train", default=True, help="Add the CPU training row (a few batches, "
              "extrapolated to an epoch) for comparison.")
@click.option("--f2pad-budget", type=float, help="F2PAD time budget per frame, seconds [default: 1.5, the product's].")
@click.option("--time-budget", type=float, help="Skip rows that would start after this many seconds; a worker still "
              "running then (plus 20 s) is stopped [default: 390; --smoke: 240].")
@click.option("--allow-cpu", is_flag=True, help="Testing without a GPU: run the CUDA rows on the CPU (labelled 'CPU "
              "stand-in'; not GPU numbers). Rows that need CUDA (graphs, FP16 autocast, TensorRT) stay skipped.")
@click.option("--threads", type=int, default=0, help="torch CPU threads in the workers (0 = torch default).")
@output_options("gpu_check", "JSON/markdown/log files")
def gpu(smoke, presets, batches, train_presets, train_images, cpu_train, f2pad_budget, time_budget, allow_cpu, threads,
        out_dir, name) -> None:
    """Everything that needs a CUDA machine, in one run (~4 min on an H100), into one JSON: training s/epoch,
    PyTorch eager/FP16/CUDA-graph latency, ONNX Runtime CUDA/TensorRT EP, TensorRT build + latency, F2PAD s/frame.

    Every row that cannot run here is recorded as skipped with its reason; the JSON is rewritten after every row.
    On a machine where gradad is not installed use benchmarks/gpu_check.sh (same options).
    """
    import os

    from gradad.benchmarks.gpu_check import GpuCheckConfig, gpu_markdown, run_gpu_check

    given = {"presets": tuple(presets) or None, "batches": _batches(batches) if batches else None,
             "train_presets": tuple(train_presets) or None, "train_images": train_images,
             "f2pad_budget_s": f2pad_budget, "time_budget_s": time_budget}
    given = {k: v for k, v in given.items() if v is not None}
    common = dict(out_dir=out_dir, name=name, cpu_train=cpu_train, allow_cpu=allow_cpu, threads=threads,
                  command=_command(), wrapper_command=os.environ.get("GRAD_GPU_CHECK_WRAPPER") or None, **given)
    cfg = GpuCheckConfig.smoke_config(**common) if smoke else GpuCheckConfig(**common)
    result = run_gpu_check(cfg)
    click.echo(gpu_markdown(result))
    click.echo(f"results: {out_dir}/{name}.json and {name}.md (log: {name}.log)")


@main.command(context_settings=CONTEXT)
@click.option("--data", "data_roots", required=True, multiple=True, type=click.Path(),
              help="Dataset root (repeatable).")
@click.option("--per-type", type=int, default=3, help="Defect images taken out of each defect type's test images.")
@click.option("--layout", default="auto", help="auto, mvtec, visa, goodsad, folder.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Split folder: defects/, masks/ (links) and split.json.")
@grad_command
def split(data_roots, per_type, layout, out_dir) -> None:
    """Take the first K defect images of every type out of the test halves (never all of a type: at least one stays
    scored): labelled defects for `grad-train --defects`, the only real defects to tune on, and `--exclude` for
    `grad-bench accuracy`."""
    from gradad.benchmarks.split import write_split

    result = write_split(list(data_roots), per_type, out_dir, layout)
    click.echo(f"{len(result['held_out'])} images held out (up to {per_type} per type) -> {out_dir}/split.json")


@main.command(context_settings=CONTEXT)
@click.argument("results_dir", default=DEFAULT_OUT, type=click.Path(file_okay=False))
@grad_command
def report(results_dir) -> None:
    """Regenerate RESULTS_DIR/README.md and the accuracy-vs-latency plot from the JSON files there."""
    from gradad.benchmarks.report_page import write_report

    readme, plot = write_report(results_dir)
    click.echo(f"wrote {readme}" + (f" and {plot}" if plot else ""))


def _add_refine_command() -> None:
    from gradad.benchmarks.refine_masks import main as refine_command

    main.add_command(refine_command, "refine")  # checks its own --name


_add_refine_command()

if __name__ == "__main__":
    main()
