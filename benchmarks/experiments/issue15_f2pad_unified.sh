# F2PAD on a unified MTD + tyre run: bash benchmarks/experiments/issue15_f2pad_unified.sh NAME
# (runs/NAME/model.pt -> models/NAME_f2pad, results {mtd,tyre}_f2pad_NAME in work/f2pad_NAME).
# Session 5 ran it as NAME=unified_smooth (output folder work/f2pad_smooth), session 6 as NAME=unified_s6.
set -ex
NAME=${1:?usage: issue15_f2pad_unified.sh NAME}
source .venv/bin/activate
date
grad-export onnx runs/$NAME/model.pt -o models/${NAME}_f2pad --no-fp16 --parity-images runs/parity_imgs --overwrite
grad-calibrate models/${NAME}_f2pad --good runs/calib_good/magnetic_tile --good ../shared/datasets/mvtec3d/tire/validation/good --threads 2
grad-refine prepare --bundle models/${NAME}_f2pad --checkpoint runs/$NAME/model.pt --data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d
grad-refine tune --bundle models/${NAME}_f2pad --data ../shared/datasets/mtd --split runs/split/split.json --good runs/calib_good/magnetic_tile --threads 2
grad-refine tune --bundle models/${NAME}_f2pad --data ../shared/datasets/mvtec3d --split runs/split/split.json
grad-bench refine --bundle models/${NAME}_f2pad --data ../shared/datasets/mtd --exclude benchmarks/experiments/issue15_f2pad_exclude.json --per-defect 8 -o work/f2pad_$NAME --name mtd_f2pad_$NAME
grad-bench refine --bundle models/${NAME}_f2pad --data ../shared/datasets/mvtec3d --exclude benchmarks/experiments/issue15_f2pad_exclude.json --per-defect 8 -o work/f2pad_$NAME --name tyre_f2pad_$NAME
date
