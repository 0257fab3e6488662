"""Links the tuning split as a dataset of its own (MVTec layout, symlinks only), so `grad-bench accuracy` can score
model options on images no reported number uses (session 10):

- <cls>/train/good: the good training images grad-train trains on (the validation hold-out removed), so the
  PatchCore row's memory bank is built from the same images as the GRAD model;
- <cls>/test/good: the good images grad-train holds out for validation (every 10th of a class,
  `gradad.training.validation.validation_indices`), never trained on;
- <cls>/test/<type> and <cls>/ground_truth/<type>/<stem>_mask.png: the tuning split's defects (`runs/split`, 3 per
  type, excluded from every reported number). 18 of the 27 train stage 1 of a full GRAD model (its abnormal
  branch has seen them), so full-GRAD rows here are optimistic; NORMAL-only and PatchCore rows are not.

    python benchmarks/experiments/tuning_dataset.py [-o work/tuneset]
"""
import json
import sys
from pathlib import Path

from gradad.data.datasets import load_samples_from_roots
from gradad.training.config import RunConfig
from gradad.training.validation import validation_indices

out = Path(sys.argv[sys.argv.index("-o") + 1] if "-o" in sys.argv else "work/tuneset")
split = json.loads(Path("runs/split/split.json").read_text())
goods = [s for s in load_samples_from_roots(split["roots"], "train", None, "auto") if s.label == 0]
held = set(validation_indices(goods, RunConfig().data.val_fraction).tolist())
links = {}
for i, s in enumerate(goods):
    links[out / s.class_name / ("test" if i in held else "train") / "good" / s.image_path.name] = s.image_path
tests = [s for s in load_samples_from_roots(split["roots"], "test", None, "auto") if s.label == 1]
chosen = {str(Path(p).resolve()) for p in split["held_out"]}
for s in tests:
    if str(s.image_path.resolve()) in chosen:
        links[out / s.class_name / "test" / s.defect_type / s.image_path.name] = s.image_path
        links[out / s.class_name / "ground_truth" / s.defect_type / f"{s.image_path.stem}_mask.png"] = s.mask_path
for link, target in links.items():
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(Path(target).resolve())
n_defects = sum(1 for p in links if p.parent.parent.name == "ground_truth")
print(f"{out}: {len(goods) - len(held)} training goods, {len(held)} validation goods, {n_defects} tuning defects")
