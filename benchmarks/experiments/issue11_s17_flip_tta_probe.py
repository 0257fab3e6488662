"""Probe (session 17): does test-time flip averaging help the unified headline model? Tuning data only.

Scores, with the PyTorch detector of a checkpoint, the tuning split's 27 labelled defects (``runs/split``, never in
the report half) against held-out good images the model never trained on (MTD: the 76 validation goods of
``runs/calib_good/magnetic_tile``; tyre: ``tire/validation/good``), once plainly and with the anomaly maps and
image scores averaged over flipped views (each view's map flipped back before averaging). Reports image AUROC,
pixel AUROC and pixel AUPR per class for each view set. The public test halves are not read.

    python benchmarks/experiments/issue11_s17_flip_tta_probe.py runs/s14_unified/model.pt [OUT.json]
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from gradad.data.datasets import Sample, list_image_files, load_samples_from_roots
from gradad.training.checkpoint import load_detector
from gradad.training.features import load_images, to_tensor

VIEWS = {"none": [()], "hflip": [(), (3,)], "vflip": [(), (2,)], "hvflip": [(), (3,), (2,), (2, 3)]}
GOODS = {"magnetic_tile": "runs/calib_good/magnetic_tile", "tire": "../shared/datasets/mvtec3d/tire/validation/good"}


def tuning_samples() -> list[Sample]:
    held = set(json.load(open("runs/split/split.json"))["held_out"])
    defects = [s for s in load_samples_from_roots(["../shared/datasets/mtd", "../shared/datasets/mvtec3d"], "test")
               if str(s.image_path.resolve()) in held]
    goods = [Sample(p, cls, "val", 0, "good", None) for cls, d in GOODS.items() for p in list_image_files(d)]
    return defects + goods


@torch.no_grad()
def views_output(detector, x: torch.Tensor) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
    out = {}
    for dims in {d for v in VIEWS.values() for d in v}:
        s, m = detector(torch.flip(x, dims) if dims else x)
        m = torch.flip(m, dims) if dims else m
        out[dims] = (s.float().numpy(), m[:, 0].float().numpy())
    return out


def main() -> None:
    detector, payload = load_detector(sys.argv[1])
    cfg, norm = payload["resolved_config"], payload["normalisation"]
    samples = tuning_samples()
    images, masks = load_images(samples, cfg.data.image_size)
    per_view: dict[tuple[int, ...], list] = {}
    for i in range(0, len(samples), 8):
        x = to_tensor(images[i:i + 8], norm["mean"], norm["std"])
        for dims, (s, m) in views_output(detector, x).items():
            per_view.setdefault(dims, []).append((s, m))
    stacked = {d: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for d, v in per_view.items()}
    labels = np.array([s.label for s in samples])
    classes = np.array([s.class_name for s in samples])
    result = {"checkpoint": sys.argv[1], "n": {c: {"defects": int(((classes == c) & (labels == 1)).sum()),
                                                   "goods": int(((classes == c) & (labels == 0)).sum())}
                                               for c in GOODS}}
    for name, dims_list in VIEWS.items():
        scores = np.mean([stacked[d][0] for d in dims_list], axis=0)
        maps = np.mean([stacked[d][1] for d in dims_list], axis=0)
        row = {}
        for c in GOODS:
            k = classes == c
            gt = masks[k].ravel()
            row[c] = {"image_auroc": round(100 * roc_auc_score(labels[k], scores[k]), 2),
                      "map_max_auroc": round(100 * roc_auc_score(labels[k], maps[k].reshape(k.sum(), -1).max(1)), 2),
                      "pixel_auroc": round(100 * roc_auc_score(gt, maps[k].ravel()), 2),
                      "pixel_aupr": round(100 * average_precision_score(gt, maps[k].ravel()), 2)}
        result[name] = row
        print(name, json.dumps(row))
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
