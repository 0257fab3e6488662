"""GRAD edge inspection toolchain: train, export, calibrate and run bi-grid anomaly detectors."""

__version__ = "0.1.0"
