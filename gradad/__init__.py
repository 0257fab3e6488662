"""GRAD edge inspection toolchain: train, export, calibrate and run bi-grid anomaly detectors."""

import logging
import os
import sys

__version__ = "0.1.0"

#: OpenCV refuses to decode images above this many pixels (a 400 KB PNG can decode to gigabytes and take an edge
#: device down); set before any gradad module decodes. A value already in the environment wins.
MAX_IMAGE_PIXELS = 100_000_000
if "OPENCV_IO_MAX_IMAGE_PIXELS" not in os.environ:
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_IMAGE_PIXELS)
    if "cv2" in sys.modules:  # OpenCV read the variable when it loaded: the cap is not in force in this process
        logging.getLogger(__name__).warning(
            "cv2 was imported before gradad, so decoded images are not capped at %d pixels: import gradad first or "
            "set OPENCV_IO_MAX_IMAGE_PIXELS before starting Python", MAX_IMAGE_PIXELS)
