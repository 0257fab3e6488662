"""Session 25 screen: F2PAD's start fill fixed to one method, tuned with the product tuner on the tuning defects.

    python benchmarks/experiments/issue15_s25_fill_screen.py BUNDLE OUT.json METHOD[:MEDIAN_PX] ...

For each METHOD (telea, shift, median:9, ...), BUNDLE is copied to work/s25/fill_<method>, the tuner's compared
fills are narrowed to that one method, and `grad-refine tune` runs on MTD and the tyre with the same tuning images
as `issue15_f2pad_unseen.sh` (`issue15_f2pad_exclude_unseen.json`). The tuner's held-out IoU of its kept rule, its
in-sample IoU and the coarse mask's IoU per class go to OUT.json. No scored image is read.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from click.testing import CliRunner

import gradad.refine.tuning as tuning
from gradad.refine.cli import tune

EXCLUDE = "benchmarks/experiments/issue15_f2pad_exclude_unseen.json"
CLASSES = {"magnetic_tile": ["--data", "../shared/datasets/mtd", "--good", "runs/calib_good/magnetic_tile"],
           "tire": ["--data", "../shared/datasets/mvtec3d"]}


def screen(bundle: Path, spec: str) -> dict:
    method, _, median = spec.partition(":")
    target = Path("work/s25") / f"fill_{method}{median}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target)
    tuning.COMPARED_INPAINTS = (method,)
    extra = ["--set", f"median_px={median}"] if median else []
    out = {}
    for name, args in CLASSES.items():
        started = time.perf_counter()
        result = CliRunner().invoke(tune, ["--bundle", str(target), *args, "--split", EXCLUDE, "--threads", "2",
                                           *extra], catch_exceptions=False)
        if result.exit_code:
            raise SystemExit(result.output)
        record = json.loads((target / "bundle.json").read_text())["refine"]["tuning"][name]
        out[name] = {k: record.get(k) for k in ("coarse_iou", "f2pad_iou", "f2pad_held_out_iou", "use_f2pad",
                                                  "flagged_tuning_images", "start_peak_iou", "settings")}
        out[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(spec, name, out[name], flush=True)
    return out


def main() -> None:
    bundle, out_path, *specs = sys.argv[1:]
    path = Path(out_path)
    results = json.loads(path.read_text()) if path.exists() else {}
    for spec in specs:
        results[spec] = screen(Path(bundle), spec)
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
