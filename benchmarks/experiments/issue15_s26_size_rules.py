"""Session 26 screen: F2PAD's mask rule chosen per defect-size group (small / large start mask) instead of per class.

    python benchmarks/experiments/issue15_s26_size_rules.py BUNDLE OUT.json

BUNDLE is copied to work/s26/size_rules and `grad-refine tune` runs on MTD and the tyre exactly as
`issue15_s25_fill_screen.py` ran it (same tuning images, `issue15_f2pad_exclude_unseen.json`), with the tuner's
rule search observed: for every start fraction, each flagged tuning defect's IoU under every mask rule and the
area of its start mask. From those, the per-class choice (the product's, with its leave-one-out estimate) and the
per-size choice (groups split at the median start-mask area; leave one out within the group, the cutoff recomputed
without the image) are compared. No scored image is read. The rule deciding adoption: work/s26/rule.md (quoted in
the experiments README, session 26).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import gradad.refine.tuning as tuning
from gradad.refine.cli import tune

EXCLUDE = "benchmarks/experiments/issue15_f2pad_exclude_unseen.json"
CLASSES = {"magnetic_tile": ["--data", "../shared/datasets/mtd", "--good", "runs/calib_good/magnetic_tile"],
           "tire": ["--data", "../shared/datasets/mvtec3d"]}
RECORDS: list[dict] = []


def _observed_best_tau(original):
    """best_tau, also recording the per-image IoU of every rule and the start masks' areas."""
    def best_tau(refiner, images, truths, maps, config, candidates, threshold=None):
        thr = refiner.pixel_threshold if threshold is None else threshold
        areas = [int(tuning.start_and_core(m, thr, config.start_peak_fraction, config.core_threshold_factor)[0].sum())
                 for m in maps]
        seen = {}
        held_out = tuning.held_out_rule_iou

        def observe(per_image, choices, margin):
            seen.update(per_image=per_image, choices=choices, margin=margin)
            return held_out(per_image, choices, margin)
        tuning.held_out_rule_iou = observe
        try:
            result = original(refiner, images, truths, maps, config, candidates, threshold)
        finally:
            tuning.held_out_rule_iou = held_out
        RECORDS.append({"fraction": float(config.start_peak_fraction), "areas": areas, **seen})
        return result
    return best_tau


def _choose(scores: np.ndarray, keys: list[str], choices: dict, margin: float, images: list[int]) -> str:
    return tuning._pick_rule(dict(zip(keys, scores[:, images].mean(axis=1))), choices, margin)


def compare(record: dict) -> dict:
    """Per-class vs per-size leave-one-out IoU of one observed rule search."""
    keys = list(record["choices"])
    scores = np.array([record["per_image"][k] for k in keys])
    areas = np.array(record["areas"], float)
    n = len(areas)
    everyone = list(range(n))
    per_class, per_size = [], []
    for i in everyone:
        others = [j for j in everyone if j != i]
        class_key = _choose(scores, keys, record["choices"], record["margin"], others)
        per_class.append(scores[keys.index(class_key), i])
        cut = float(np.median(areas[others]))
        group = [j for j in others if (areas[j] <= cut) == (areas[i] <= cut)]
        key = _choose(scores, keys, record["choices"], record["margin"], group) if group else class_key
        per_size.append(scores[keys.index(key), i])
    cut = float(np.median(areas))
    small = [j for j in everyone if areas[j] <= cut]
    large = [j for j in everyone if areas[j] > cut]
    in_sample = {name: (_choose(scores, keys, record["choices"], record["margin"], g), g) for name, g in
                 (("small", small), ("large", large)) if g}
    return {"fraction": record["fraction"], "images": n, "cutoff_px": cut,
            "per_class_held_out": round(float(np.mean(per_class)), 4),
            "per_size_held_out": round(float(np.mean(per_size)), 4),
            "per_size_rules": {name: {"rule": key, "images": len(g),
                                      "iou": round(float(scores[keys.index(key), g].mean()), 4)}
                               for name, (key, g) in in_sample.items()},
            "per_image_class": [round(float(v), 4) for v in per_class],
            "per_image_size": [round(float(v), 4) for v in per_size], "areas": [int(a) for a in areas]}


def main() -> None:
    bundle, out_path = sys.argv[1:3]
    target = Path("work/s26/size_rules")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target)
    tuning.best_tau = _observed_best_tau(tuning.best_tau)
    out = {}
    for name, args in CLASSES.items():
        RECORDS.clear()
        result = CliRunner().invoke(tune, ["--bundle", str(target), *args, "--split", EXCLUDE, "--threads", "2"],
                                    catch_exceptions=False)
        if result.exit_code:
            raise SystemExit(result.output)
        record = json.loads((target / "bundle.json").read_text())["refine"]["tuning"][name]
        out[name] = {"product": {k: record.get(k) for k in ("coarse_iou", "f2pad_iou", "f2pad_held_out_iou",
                                                             "use_f2pad", "settings")},
                     "by_fraction": [compare(r) for r in RECORDS]}
        print(name, json.dumps(out[name]["product"]), flush=True)
        for row in out[name]["by_fraction"]:
            print(" ", {k: row[k] for k in ("fraction", "images", "cutoff_px", "per_class_held_out",
                                             "per_size_held_out", "per_size_rules")}, flush=True)
        Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
