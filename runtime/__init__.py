"""Lean runtime: numpy + OpenCV + a backend (ONNX Runtime or TensorRT). Never imports torch or timm."""
