"""Accuracy, latency and model-size measurements that write JSON results to benchmarks/results/."""
