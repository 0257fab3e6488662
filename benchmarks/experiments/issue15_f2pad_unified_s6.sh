set -ex
source .venv/bin/activate
date
grad-export onnx runs/unified_s6/model.pt -o models/unified_s6_f2pad --no-fp16 --parity-images runs/parity_imgs --overwrite
grad-calibrate models/unified_s6_f2pad --good runs/calib_good/magnetic_tile --good ../shared/datasets/mvtec3d/tire/validation/good --threads 2
grad-refine prepare --bundle models/unified_s6_f2pad --checkpoint runs/unified_s6/model.pt --data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d
grad-refine tune --bundle models/unified_s6_f2pad --data ../shared/datasets/mtd --split runs/split/split.json --good runs/calib_good/magnetic_tile --threads 2
grad-refine tune --bundle models/unified_s6_f2pad --data ../shared/datasets/mvtec3d --split runs/split/split.json
grad-bench refine --bundle models/unified_s6_f2pad --data ../shared/datasets/mtd --exclude benchmarks/experiments/issue15_f2pad_exclude.json --per-defect 8 -o work/f2pad_s6 --name mtd_f2pad_unified_s6
grad-bench refine --bundle models/unified_s6_f2pad --data ../shared/datasets/mvtec3d --exclude benchmarks/experiments/issue15_f2pad_exclude.json --per-defect 8 -o work/f2pad_s6 --name tyre_f2pad_unified_s6
date
