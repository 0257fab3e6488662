"""Dataset readers, image I/O and the demo data generator (numpy + OpenCV only, no torch)."""
