"""GRAD edge inspection toolchain: train, export, calibrate and run bi-grid anomaly detectors."""

import os

__version__ = "0.1.0"

#: OpenCV refuses to decode images above this many pixels (a 400 KB PNG can decode to gigabytes and take an edge
#: device down); set before any gradad module decodes. A value already in the environment wins.
MAX_IMAGE_PIXELS = 100_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
