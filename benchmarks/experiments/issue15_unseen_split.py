"""Issue 15, session 8: the F2PAD tuning split of images no stage 1 trained on.

Writes runs/f2pad_split/split.json: every image of benchmarks/experiments/issue15_f2pad_exclude.json (the 27-image
stage-1 split, of which `grad-refine tune` now leaves out the 18 the model trained on, and the 20 MTD images looked
at while designing the mask rules) plus 2 more tyre defects per type (seed 8) for contamination, cut and hole, so the
tyre has unseen tuning images beyond stage 1's 4 held-out ones (combined has 2 images left and keeps them for scoring).
The same file is the benchmarks' --exclude: nothing in it is scored.

    python benchmarks/experiments/issue15_unseen_split.py
"""
import json
from pathlib import Path

import numpy as np

from gradad.data.datasets import load_samples

OLD = Path("benchmarks/experiments/issue15_f2pad_exclude.json")
OUT = Path("runs/f2pad_split/split.json")

held = list(json.loads(OLD.read_text())["held_out"])
rng = np.random.default_rng(8)
for defect in ("contamination", "cut", "hole"):
    pool = sorted(str(s.image_path.resolve()) for s in load_samples("../shared/datasets/mvtec3d", "test", ["tire"])
                  if s.label == 1 and s.defect_type == defect and str(s.image_path.resolve()) not in held)
    held += [pool[i] for i in sorted(rng.choice(len(pool), 2, replace=False))]
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps({"per_type": None, "roots": ["../shared/datasets/mtd", "../shared/datasets/mvtec3d"],
                           "held_out": held, "note": "issue15_unseen_split.py: " + __doc__.splitlines()[0]}, indent=1))
print(f"{len(held)} images -> {OUT}")
