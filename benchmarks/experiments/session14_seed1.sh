#!/bin/bash
# Session 14: the headline command again with --set train.seed=1, its NORMAL-only, scored (no PatchCore row).
# SEED=2 bash ...: the same with another seed (session 15: seed 2, on an otherwise idle CPU for the training time).
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
SEED="${SEED:-1}"
LOGS="${LOGS:-work/s14}"
RUN="runs/s14_seed$SEED"
mkdir -p "$LOGS"
D="--data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d"
grad-train $D --defects runs/split/defects --masks runs/split/masks \
  --set train.seed=$SEED -o $RUN > "$LOGS/seed${SEED}_train.log" 2>&1
grad-train $D --normal-from $RUN/model.pt \
  --set model.abnormal_branch=false --set train.seed=$SEED -o ${RUN}_normal_only > "$LOGS/seed${SEED}_normal_only.log" 2>&1
grad-bench accuracy $D --checkpoint $RUN/model.pt \
  --backend pytorch --normal-only ${RUN}_normal_only/model.pt --exclude runs/split/split.json --threads 2 \
  -o work/bench_s14 --name unified_mtd_tyre_s14_seed$SEED > "$LOGS/seed${SEED}_bench.log" 2>&1
