"""PyTorch training: frozen extractor, GRAD model, feature cache, two-stage training."""
