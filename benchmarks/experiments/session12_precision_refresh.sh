#!/bin/bash
# Session 12: FP32 / FP16 / INT8 (int8 and uint8 activations) rows for the headline model runs/unified_s9.
# NAME=s14_unified OUT=work/prec_s15 bash ...: the same for another run (session 15: the s14 headline).
set -euo pipefail
NAME=${NAME:-unified_s9}
OUT=${OUT:-work/prec_s12}
source .venv/bin/activate
D="--data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d"
C="--calib ../shared/datasets/mtd/magnetic_tile/train/good --calib ../shared/datasets/mvtec3d/tire/validation/good"
date
grad-export onnx runs/$NAME/model.pt -o models/$NAME --parity-images runs/parity_imgs --overwrite
rm -rf models/${NAME}_u8 && cp -r models/$NAME models/${NAME}_u8
grad-export quantize models/$NAME $C $D --threads 2
grad-export quantize models/${NAME}_u8 --activations uint8 $C $D --threads 2
date
grad-bench accuracy $D --bundle models/$NAME --backend onnxruntime-fp32 --backend onnxruntime-fp16 --backend onnxruntime-int8 --exclude runs/split/split.json --threads 2 -o $OUT --name unified_precision_accuracy
grad-bench accuracy $D --bundle models/${NAME}_u8 --backend onnxruntime-int8 --exclude runs/split/split.json --threads 2 -o $OUT --name unified_precision_accuracy_uint8
date
# latency rows (run alone: timing-sensitive)
grad-bench latency --bundle models/$NAME --backend onnxruntime-fp32 --backend onnxruntime-fp16 --backend onnxruntime-int8 --today --no-patchcore --threads 2 --batches 1,4 --images runs/parity_imgs -o $OUT --name unified_precision_latency
grad-bench latency --bundle models/${NAME}_u8 --backend onnxruntime-fp32 --backend onnxruntime-int8 --today --no-patchcore --threads 2 --batches 1,4 --images runs/parity_imgs -o $OUT --name unified_precision_latency_uint8
