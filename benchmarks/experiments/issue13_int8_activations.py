"""Session 7: ONNX Runtime CPU latency of the headline model FP32 vs symmetric-int8 vs uint8-activation QDQ (model only,
batch 1, 2 threads). Needs models/unified_s6 with its model.int8.onnx: python benchmarks/experiments/issue13_int8_activations.py"""
import sys, time, numpy as np, onnx, onnxruntime as ort, tempfile
from pathlib import Path
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from gradad.export.int8 import int8_fp32_nodes, calibration_batches, _Reader, OPS_TO_QUANTIZE
src = Path("models/unified_s6/model.onnx")
model = onnx.load(src); keep = int8_fp32_nodes(model)
batches = calibration_batches(["../shared/datasets/mtd/magnetic_tile/train/good"], (256, 256), 32)
with tempfile.TemporaryDirectory() as tmp:
    pre = Path(tmp) / "pre.onnx"; quant_pre_process(str(src), str(pre), skip_optimization=True)
    quantize_static(str(pre), "/tmp/u8s8.onnx", _Reader("image", batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=keep, op_types_to_quantize=list(OPS_TO_QUANTIZE),
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibMovingAverage": True})
x = batches[0]
for name in ("models/unified_s6/model.onnx", "models/unified_s6/model.int8.onnx", "/tmp/u8s8.onnx"):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(name, so, providers=["CPUExecutionProvider"])
    for _ in range(5): s.run(None, {"image": x})
    ts = []
    for _ in range(30):
        t = time.perf_counter(); s.run(None, {"image": x}); ts.append(time.perf_counter() - t)
    print(name, "p50 ms", round(1e3 * float(np.median(ts)), 2))
