#!/bin/bash
# Session 14: the headline command again with --set train.seed=1, its NORMAL-only, scored (no PatchCore row).
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
LOGS="${LOGS:-work/s14}"
mkdir -p "$LOGS"
grad-train --data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d --defects runs/split/defects --masks runs/split/masks \
  --set train.seed=1 -o runs/s14_seed1 > "$LOGS/seed1_train.log" 2>&1
grad-train --data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d --normal-from runs/s14_seed1/model.pt \
  --set model.abnormal_branch=false --set train.seed=1 -o runs/s14_seed1_normal_only > "$LOGS/seed1_normal_only.log" 2>&1
grad-bench accuracy --data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d --checkpoint runs/s14_seed1/model.pt \
  --backend pytorch --normal-only runs/s14_seed1_normal_only/model.pt --exclude runs/split/split.json --threads 2 \
  -o work/bench_s14 --name unified_mtd_tyre_s14_seed1 > "$LOGS/seed1_bench.log" 2>&1
