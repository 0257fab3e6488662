# Issue 15, session 11: the s9 F2PAD bundle re-tuned with the F2PAD-or-coarse-mask rule, then scored.
#   bash benchmarks/experiments/issue15_s11_retune.sh
set -ex
source .venv/bin/activate
EXCLUDE=benchmarks/experiments/issue15_f2pad_exclude_unseen.json
B=models/unified_s9_f2pad_s11
rm -rf $B && cp -r models/unified_s9_f2pad_trim $B
date
grad-refine tune --bundle $B --data ../shared/datasets/mtd --split $EXCLUDE --good runs/calib_good/magnetic_tile --threads 2
date
grad-refine tune --bundle $B --data ../shared/datasets/mvtec3d --split $EXCLUDE --threads 2
date
grad-bench refine --bundle $B --data ../shared/datasets/mtd --exclude $EXCLUDE --per-defect 8 --threads 2 -o work/f2pad_s11 --name mtd_f2pad_unified_s9_s11
grad-bench refine --bundle $B --data ../shared/datasets/mvtec3d --exclude $EXCLUDE --per-defect 8 --threads 2 -o work/f2pad_s11 --name tyre_f2pad_unified_s9_s11
date
