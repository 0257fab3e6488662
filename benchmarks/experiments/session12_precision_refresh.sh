#!/bin/bash
# Session 12: FP32 / FP16 / INT8 (int8 and uint8 activations) rows for the headline model runs/unified_s9.
set -euo pipefail
source .venv/bin/activate
D="--data ../shared/datasets/mtd --data ../shared/datasets/mvtec3d"
C="--calib ../shared/datasets/mtd/magnetic_tile/train/good --calib ../shared/datasets/mvtec3d/tire/validation/good"
date
grad-export onnx runs/unified_s9/model.pt -o models/unified_s9 --parity-images runs/parity_imgs --overwrite
rm -rf models/unified_s9_u8 && cp -r models/unified_s9 models/unified_s9_u8
grad-export quantize models/unified_s9 $C $D --threads 2
grad-export quantize models/unified_s9_u8 --activations uint8 $C $D --threads 2
date
grad-bench accuracy $D --bundle models/unified_s9 --backend onnxruntime-fp32 --backend onnxruntime-fp16 --backend onnxruntime-int8 --exclude runs/split/split.json --threads 2 -o work/prec_s12 --name unified_precision_accuracy
grad-bench accuracy $D --bundle models/unified_s9_u8 --backend onnxruntime-int8 --exclude runs/split/split.json --threads 2 -o work/prec_s12 --name unified_precision_accuracy_uint8
date
# latency rows (run alone: timing-sensitive)
grad-bench latency --bundle models/unified_s9 --backend onnxruntime-fp32 --backend onnxruntime-fp16 --backend onnxruntime-int8 --today --no-patchcore --threads 2 --batches 1,4 --images runs/parity_imgs -o work/prec_s12 --name unified_precision_latency
grad-bench latency --bundle models/unified_s9_u8 --backend onnxruntime-fp32 --backend onnxruntime-int8 --today --no-patchcore --threads 2 --batches 1,4 --images runs/parity_imgs -o work/prec_s12 --name unified_precision_latency_uint8
