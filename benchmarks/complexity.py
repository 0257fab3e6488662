"""Model size of each preset: GFLOP per image and parameter counts, per part (extractor, GRAD, head).

FLOPs are counted by ``torch.utils.flop_counter`` (2 x multiply-accumulates of convolutions and matrix
products); grid_sample, pooling and element-wise ops are not counted (they are < 1% here).

    python -m gradad.benchmarks.complexity -o benchmarks/results/complexity.json
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import click
import torch
from torch.utils.flop_counter import FlopCounterMode

from gradad.cli_utils import CLI_CONTEXT, setup_logging, user_errors_as_exit
from gradad.benchmarks.models import random_detector
from gradad.benchmarks.results_io import command_line
from gradad.training.config import PRESETS, RunConfig, preset_config

log = logging.getLogger(__name__)


def _flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def preset_complexity(cfg: RunConfig) -> dict[str, Any]:
    """GFLOP and parameters of the whole eval-mode detector for one image of the configured size."""
    detector = random_detector(cfg)  # random weights: the count does not depend on their values
    extractor, model = detector.extractor, detector.model
    size = cfg.data.image_size
    image = torch.zeros(1, 3, size, size)
    total = _flops(detector, image)
    extractor_flops = _flops(extractor, image)
    return {
        "preset": cfg.preset,
        "backbone": cfg.backbone.name,
        "image_size": size,
        "feature_shape": [model.channels, *model.feat_hw],
        "gflop_total": round(total / 1e9, 3),
        "gflop_extractor": round(extractor_flops / 1e9, 3),
        "gflop_grad": round((total - extractor_flops) / 1e9, 3),
        "params_extractor_m": round(_params(extractor) / 1e6, 3),
        "params_grad_m": round(_params(model) / 1e6, 3),
        "params_grids_m": round(sum(p.numel() for g in (model.normal_grid, getattr(model, "abnormal_grid", None))
                                    if g is not None for p in g.parameters()) / 1e6, 3),
    }


@click.command(context_settings=CLI_CONTEXT)
@click.option("--preset", "presets", multiple=True, type=click.Choice(PRESETS), help="Presets [default: all].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="benchmarks/results/complexity.json",
              show_default=True)
@user_errors_as_exit
def main(presets: tuple[str, ...], output: str) -> None:
    """Count GFLOP and parameters of each preset and write them as JSON."""
    setup_logging()
    rows = [preset_complexity(preset_config(name)) for name in (presets or PRESETS)]
    result = {"torch": torch.__version__, "machine": platform.machine(), "presets": rows,
              "command": command_line(sys.argv[1:], "python -m gradad.benchmarks.complexity")}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        click.echo(f"{r['preset']:6s} {r['gflop_total']:8.2f} GFLOP  (extractor {r['gflop_extractor']:.2f}, "
                   f"GRAD {r['gflop_grad']:.2f})  params: extractor {r['params_extractor_m']:.2f} M, "
                   f"GRAD {r['params_grad_m']:.2f} M")


if __name__ == "__main__":
    main()
