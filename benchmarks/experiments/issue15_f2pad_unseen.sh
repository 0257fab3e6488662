# F2PAD on a unified MTD + tyre run, tuned on defects no stage 1 trained on (session 8):
#   bash benchmarks/experiments/issue15_f2pad_unseen.sh NAME [old]
# runs/NAME/model.pt -> models/NAME_f2pad[_old], results {mtd,tyre}_f2pad_NAME[_old] in work/f2pad_NAME.
# "old" repeats the session-6 protocol on the same model (tune on runs/split, --include-trained) for comparison;
# both score the same images: everything in issue15_f2pad_exclude_unseen.json (the tuning images) is left out.
set -ex
NAME=${1:?usage: issue15_f2pad_unseen.sh NAME [old]}
MODE=${2:-new}
EXCLUDE=benchmarks/experiments/issue15_f2pad_exclude_unseen.json
if [ "$MODE" = old ]; then SUFFIX=_old; TUNE="--split runs/split/split.json --include-trained"
else SUFFIX=; TUNE="--split $EXCLUDE"; fi
B=models/${NAME}_f2pad$SUFFIX
source .venv/bin/activate
date
grad-export onnx runs/$NAME/model.pt -o $B --no-fp16 --parity-images runs/parity_imgs --overwrite
grad-calibrate $B --good runs/calib_good/magnetic_tile --good ../shared/datasets/mvtec3d/tire/validation/good --threads 2
grad-refine prepare --bundle $B --checkpoint runs/$NAME/model.pt --data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d
grad-refine tune --bundle $B --data ../shared/datasets/mtd $TUNE --good runs/calib_good/magnetic_tile --threads 2
grad-refine tune --bundle $B --data ../shared/datasets/mvtec3d $TUNE
grad-bench refine --bundle $B --data ../shared/datasets/mtd --exclude $EXCLUDE --per-defect 8 -o work/f2pad_$NAME --name mtd_f2pad_$NAME$SUFFIX
grad-bench refine --bundle $B --data ../shared/datasets/mvtec3d --exclude $EXCLUDE --per-defect 8 -o work/f2pad_$NAME --name tyre_f2pad_$NAME$SUFFIX
date
