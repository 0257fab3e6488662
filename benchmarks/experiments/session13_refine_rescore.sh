#!/bin/bash
# Session 13: the F2PAD results re-scored with the calibrated baseline at the bundle's calibrated pixel threshold
# (it used a class's tuned coarse threshold) and the resolution / amortisation recorded; same bundles as session 12.
set -euo pipefail
source .venv/bin/activate
date
grad-bench refine --bundle models/unified_s9_f2pad_s11 --data ../shared/datasets/mtd --exclude benchmarks/experiments/issue15_f2pad_exclude_unseen.json --per-defect 8 --threads 2 -o work/f2pad_s13 --name mtd_f2pad_unified_s9_s11
grad-bench refine --bundle models/unified_s9_f2pad_s11 --data ../shared/datasets/mvtec3d --exclude benchmarks/experiments/issue15_f2pad_exclude_unseen.json --per-defect 8 --threads 2 -o work/f2pad_s13 --name tyre_f2pad_unified_s9_s11
grad-bench refine --bundle models/demo_f2pad_s11a --data demo_data --per-defect 2 -o work/f2pad_s13 --name demo_f2pad_s11
date
