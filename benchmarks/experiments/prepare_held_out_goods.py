"""Links the held-out good images the F2PAD and precision scripts use (made by hand before session 8):

- runs/calib_good/magnetic_tile: the 76 MTD good training images grad-train holds out for validation (every 10th of
  the class, `gradad.training.validation.validation_indices`), never trained on: calibration and `--good` for
  `grad-refine tune`;
- runs/parity_imgs: 23 of those + the first 23 of `tire/validation/good`, the export's parity images.

    python benchmarks/experiments/prepare_held_out_goods.py
"""
from pathlib import Path

from gradad.data.datasets import list_image_files, load_samples
from gradad.training.config import RunConfig
from gradad.training.validation import validation_indices

goods = [s for s in load_samples("../shared/datasets/mtd", "train") if s.label == 0]
held = [goods[i].image_path.resolve() for i in validation_indices(goods, RunConfig().data.val_fraction)]
tyre = [p.resolve() for p in list_image_files(Path("../shared/datasets/mvtec3d/tire/validation/good"))][:23]
links = {Path("runs/calib_good/magnetic_tile") / p.name: p for p in held}
links |= {Path("runs/parity_imgs") / f"mtd_{p.name}": p for p in held[:23]}
links |= {Path("runs/parity_imgs") / f"tyre_{p.name}": p for p in tyre}
for link, target in links.items():
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(target)
print(f"{len(held)} MTD validation goods -> runs/calib_good/magnetic_tile; 46 parity images -> runs/parity_imgs")
