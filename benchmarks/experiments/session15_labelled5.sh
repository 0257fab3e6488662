#!/bin/bash
# Session 15: does the abnormal branch gain more from 5 labelled defects per type than from 3?
# The headline command with runs/split5 (`grad-bench split --per-type 5`: the first 5 of every type, a superset of
# runs/split's first 3; tyre `combined` gives 4 of its 5), its NORMAL-only, and both the k=5 and the k=3 headline
# models (runs/s14_unified) scored on the same images: everything in runs/split5 left out.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
LOGS="${LOGS:-work/s15}"
mkdir -p "$LOGS"
D="--data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d"
[ -f runs/split5/split.json ] || grad-bench split $D --per-type 5 -o runs/split5
grad-train $D --defects runs/split5/defects --masks runs/split5/masks -o runs/s15_k5 > "$LOGS/k5_train.log" 2>&1
grad-train $D --normal-from runs/s15_k5/model.pt --set model.abnormal_branch=false -o runs/s15_k5_normal_only \
  > "$LOGS/k5_normal_only.log" 2>&1
grad-bench accuracy $D --checkpoint runs/s15_k5/model.pt --backend pytorch --normal-only runs/s15_k5_normal_only/model.pt \
  --patchcore --exclude runs/split5/split.json --threads 2 -o work/bench_s15 --name unified_mtd_tyre_s15_k5 \
  > "$LOGS/k5_bench.log" 2>&1
grad-bench accuracy $D --checkpoint runs/s14_unified/model.pt --backend pytorch --normal-only runs/s14_normal_only/model.pt \
  --exclude runs/split5/split.json --threads 2 -o work/bench_s15 --name unified_mtd_tyre_s14_on_split5 \
  > "$LOGS/k3_on_split5_bench.log" 2>&1
