"""Probe (session 14): one calibrated threshold for a unified bundle vs one per class.

Scores the bundle's calibration goods (as recorded in bundle.json) and the public test halves (the tuning split's
27 images left out) with ONNX Runtime, sets the FAR image threshold (1 %) and the good-only pixel threshold (0.1 %)
on all goods together (today) and on each class's goods, and reports, per class at each threshold: false-alarm
rate on test goods, recall on test defects, F1, and the coarse-mask IoU (pooled over the defect images).
Usage: python session14_class_thresholds_probe.py BUNDLE"""
import json
import sys
from pathlib import Path

import numpy as np

from gradad.bundle import Bundle
from gradad.calibration.calibrate import score_images
from gradad.calibration.thresholds import far_threshold, pixel_threshold_good_only
from gradad.data.datasets import list_image_files, load_samples_from_roots
from gradad.data.images import read_mask
from gradad.runtime.loader import load_backend

bundle_dir = sys.argv[1]
bundle = Bundle.load(bundle_dir)
backend, _ = load_backend(bundle_dir, backend="onnxruntime", threads=1)
data = bundle.calibration.data
good_dirs = data["good_dirs"]
cls_of = {"runs/calib_good/magnetic_tile": "magnetic_tile", "../shared/datasets/mvtec3d/tire/validation/good": "tire"}
calib = {}
for d in good_dirs:
    s, m, _ = score_images(backend, list_image_files(d, "--good"), desc=d)
    calib[cls_of[d]] = (s, m)
all_s = np.concatenate([v[0] for v in calib.values()])
all_m = np.concatenate([v[1] for v in calib.values()])
glob_t = far_threshold(all_s, 0.01)[0]
glob_p = pixel_threshold_good_only(all_m, 0.001)
held = set(json.load(open("runs/split/split.json"))["held_out"])
samples = [s for s in load_samples_from_roots(["../shared/datasets/mtd", "../shared/datasets/mvtec3d"], "test")
           if str(s.image_path.resolve()) not in held]
hw = backend.input_hw
out = {"global": {"image": glob_t, "pixel": glob_p}}
for cls, (cs, cm) in calib.items():
    mine = [s for s in samples if s.class_name == cls]
    scores, maps, sizes = score_images(backend, [s.image_path for s in mine], desc=cls)
    labels = np.array([s.label for s in mine])
    import cv2
    gts = np.zeros((len(mine), *hw), bool)
    for i, s in enumerate(mine):
        if s.mask_path is not None:
            gts[i] = cv2.resize(read_mask(s.mask_path, sizes[i]).astype(np.uint8), hw[::-1],
                                interpolation=cv2.INTER_NEAREST) > 0
    class_t = far_threshold(cs, 0.01)[0]
    class_p = pixel_threshold_good_only(cm, 0.001)
    row = {"n_calib_goods": len(cs), "thresholds": {"class": [class_t, class_p]}}
    for name, (t, p) in (("global", (glob_t, glob_p)), ("class", (class_t, class_p))):
        flagged = scores > t
        tp = (flagged & (labels == 1)).sum(); fp = (flagged & (labels == 0)).sum(); fn = (~flagged & (labels == 1)).sum()
        defect = labels == 1
        pred = maps[defect] >= p
        inter = (pred & gts[defect]).sum(axis=(1, 2)); union = (pred | gts[defect]).sum(axis=(1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean()
        row[name] = {"false_alarm_rate": round(fp / max((labels == 0).sum(), 1), 3),
                     "recall": round(tp / max(defect.sum(), 1), 3), "f1": round(2 * tp / max(2 * tp + fp + fn, 1), 3),
                     "coarse_iou_mean": round(float(iou) * 100, 1)}
    out[cls] = row
    print(cls, json.dumps(row), flush=True)
print(json.dumps(out["global"]))
