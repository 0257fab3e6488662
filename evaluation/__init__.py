"""Metrics (image/pixel AUROC, AUPR, PRO), reports and figures (numpy + OpenCV only)."""
