# Issue 15, session 11: the demo and s9 F2PAD bundles re-tuned with the F2PAD-or-coarse-mask rule and the fixed
# tuning iteration count (the demo bundle twice: identical settings), then scored.
#   bash benchmarks/experiments/issue15_s11_retune.sh
set -ex
source .venv/bin/activate
date
for i in a b; do
  rm -rf models/demo_f2pad_s11$i && cp -r models/demo_f2pad_final models/demo_f2pad_s11$i
  grad-refine tune --bundle models/demo_f2pad_s11$i --data demo_data --per-defect 1
done
date
EXCLUDE=benchmarks/experiments/issue15_f2pad_exclude_unseen.json
B=models/unified_s9_f2pad_s11
rm -rf $B && cp -r models/unified_s9_f2pad_trim $B
grad-refine tune --bundle $B --data ../shared/datasets/mtd --split $EXCLUDE --good runs/calib_good/magnetic_tile --threads 2
grad-refine tune --bundle $B --data ../shared/datasets/mvtec3d --split $EXCLUDE --threads 2
date
grad-bench refine --bundle $B --data ../shared/datasets/mtd --exclude $EXCLUDE --per-defect 8 --threads 2 -o work/f2pad_s11b --name mtd_f2pad_unified_s9_s11
grad-bench refine --bundle $B --data ../shared/datasets/mvtec3d --exclude $EXCLUDE --per-defect 8 --threads 2 -o work/f2pad_s11b --name tyre_f2pad_unified_s9_s11
grad-bench refine --bundle models/demo_f2pad_s11a --data demo_data --per-defect 2 -o work/f2pad_s11b --name demo_f2pad_s11
date
