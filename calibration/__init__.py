"""Image and pixel thresholds from held-out images, computed through the runtime backend (no torch)."""
