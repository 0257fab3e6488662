#!/bin/bash
set -euo pipefail
source .venv/bin/activate
date
grad-bench refine --bundle models/unified_s9_f2pad_s11 --data ../shared/datasets/mtd --exclude benchmarks/experiments/issue15_f2pad_exclude_unseen.json --per-defect 8 --threads 2 -o "${OUT:-work/f2pad_s12}" --name mtd_f2pad_unified_s9_s11
grad-bench refine --bundle models/unified_s9_f2pad_s11 --data ../shared/datasets/mvtec3d --exclude benchmarks/experiments/issue15_f2pad_exclude_unseen.json --per-defect 8 --threads 2 -o "${OUT:-work/f2pad_s12}" --name tyre_f2pad_unified_s9_s11
grad-bench refine --bundle models/demo_f2pad_s11a --data demo_data --per-defect 2 -o "${OUT:-work/f2pad_s12}" --name demo_f2pad_s11
date
