"""Checkpoint -> model bundle: ONNX export, FP16 conversion, lint, parity gates, TensorRT engines."""
