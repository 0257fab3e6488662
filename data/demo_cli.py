"""``grad-demo-data``: write the procedural demo data set (MVTec AD layout) to a folder."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from gradad.cli_utils import CLI_CONTEXT, grad_command
from gradad.data.demo import (
    ALL_CLASSES,
    DEFAULT_CLASSES,
    DEFECT_TYPES,
    MARKER_NAME,
    DemoDataConfig,
    generate_demo_dataset,
)
from gradad.errors import DatasetError

logger = logging.getLogger(__name__)

_DEFAULTS = DemoDataConfig()


def _names(text: str, option: str) -> tuple[str, ...]:
    """Split a comma list into names; an empty list is a user error naming the option."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise DatasetError(f"{option} is empty; give a comma-separated list of names")
    return names


@click.command(
    context_settings={**CLI_CONTEXT, "show_default": False, "max_content_width": 100},
    epilog=(
        "Layout: OUT_DIR/<class>/train/good/*.png, OUT_DIR/<class>/test/{good,<defect>}/*.png, "
        f"OUT_DIR/<class>/ground_truth/<defect>/*_mask.png, plus OUT_DIR/{MARKER_NAME} with the settings. "
        "Example: grad-demo-data demo_data --size 256 --seed 0"
    ),
)
@click.argument("out_dir", type=click.Path(file_okay=False, dir_okay=True, path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=_DEFAULTS.seed, show_default=True,
              help="Master seed; the same seed gives byte-identical files.")
@click.option("--size", type=click.IntRange(32, 4096), default=_DEFAULTS.image_size, show_default=True,
              help="Side of the square images in pixels.")
@click.option("--train", "train_good", type=click.IntRange(min=1), default=_DEFAULTS.train_good, show_default=True,
              help="Defect-free training images per class.")
@click.option("--test-good", type=click.IntRange(min=0), default=_DEFAULTS.test_good, show_default=True,
              help="Defect-free test images per class.")
@click.option("--test-per-defect", type=click.IntRange(min=0), default=_DEFAULTS.test_per_defect, show_default=True,
              help="Defective test images per class and defect type.")
@click.option("--classes", default=",".join(DEFAULT_CLASSES), show_default=True,
              help=f"Comma-separated classes, from: {', '.join(ALL_CLASSES)}.")
@click.option("--defects", default=",".join(DEFECT_TYPES), show_default=True,
              help=f"Comma-separated defect types, from: {', '.join(DEFECT_TYPES)}.")
@click.option("--overwrite", is_flag=True,
              help=f"Replace OUT_DIR if it is a demo data set written before (it holds {MARKER_NAME}); "
                   "any other non-empty folder is never touched.")
@grad_command
def main(
    out_dir: Path,
    seed: int,
    size: int,
    train_good: int,
    test_good: int,
    test_per_defect: int,
    classes: str,
    defects: str,
    overwrite: bool,
) -> None:
    """Generate a small synthetic inspection data set with exact defect masks into OUT_DIR.

    Classes: a woven fabric texture (and an optional wood texture) and two objects (a hex nut and a capsule)
    with pose, lighting and noise variation. Defects: scratch, spot, crack and color, each with an exact
    ground-truth mask. Needs only numpy and OpenCV.
    """
    config = DemoDataConfig(
        classes=_names(classes, "--classes"),
        image_size=size,
        train_good=train_good,
        test_good=test_good,
        test_per_defect=test_per_defect,
        defect_types=_names(defects, "--defects"),
        seed=seed,
    )
    out = generate_demo_dataset(out_dir, config, overwrite=overwrite, progress=True)
    logger.info(
        "demo data set ready at %s (classes %s; %d train, %d test good, %d per defect type per class)",
        out, ", ".join(config.classes), train_good, test_good, test_per_defect,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
