"""Probe (session 14): does whitening the normal branch's residual before its norm help on the tuning split?

map_k = gain_k * ||avgpool_k(W (x_ref - x))|| with W = identity (today), diag(1/rms_c) (per-channel RMS of the
residual on the trainer's validation goods) or the full inverse square root of the residual covariance there
(shrunk). Scored on work/tuneset (the 27 tuning defects + its goods; no reported number uses them): pixel AUROC,
pixel AUPR (at 256 px, binned like the evaluation) and image AUROC of the pooled-map score (no image Gaussian),
per class. Usage: python issue11_s14_residual_whitening_probe.py RUN [TUNESET]"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

import gradad.training.model as gm
import gradad.training.validation as gv
from gradad.data.datasets import load_samples_from_roots
from gradad.training.backbone import FeatureExtractor
from gradad.training.checkpoint import load_detector
from gradad.training.config import load_config
from gradad.training.features import FeatureCache, load_images
from gradad.training.trainer import prepare_training_data

torch.set_num_threads(2)
run = sys.argv[1]
tuneset = sys.argv[2] if len(sys.argv) > 2 else "work/tuneset"
cfg = load_config(run + "/config.yaml")
extractor = FeatureExtractor(cfg.backbone)
data = prepare_training_data(cfg, extractor, torch.device("cpu"))
samples = load_samples_from_roots([tuneset], "test")
feats, _ = FeatureCache(cfg.data.cache_dir).load_or_compute(extractor, samples, cfg.data.image_size, torch.device("cpu"))
_, masks = load_images(samples, cfg.data.image_size, desc="masks")
det, _ = load_detector(run + "/model.pt")
det.eval()
model = det.model
original = gm.residual_scale_maps


def residuals(features):
    out = []
    with torch.no_grad():
        for i in range(0, len(features), 32):
            x = torch.as_tensor(features[i:i + 32]).float()
            out.append(model(x).x_ref - x)
    return torch.cat(out)


val_r = residuals(data.val_features)  # (V, C, h, w)
flat = val_r.permute(0, 2, 3, 1).reshape(-1, val_r.shape[1]).double()
rms = flat.pow(2).mean(0).sqrt()
cov = (flat.T @ flat) / len(flat)
evals, evecs = torch.linalg.eigh(cov)
shrunk = evals.clamp_min(evals.mean() * 1e-2)
full_w = (evecs @ torch.diag(shrunk.rsqrt()) @ evecs.T).float()
print(f"residual rms per channel: min {rms.min():.3g} median {rms.median():.3g} max {rms.max():.3g}")


def make(transform):
    def maps(x_ref, x, scales):
        r = transform(x_ref - x)
        return original(r, torch.zeros_like(r), scales)
    return maps


variants = {
    "plain": lambda r: r,
    "channel_rms": lambda r: r / rms.float().view(1, -1, 1, 1),
    "full_whiten": lambda r: torch.einsum("dc,bchw->bdhw", full_w, r),
}
classes = np.array([s.class_name for s in samples])
labels = np.array([s.label for s in samples])
results = {}
for name, tf in variants.items():
    gm.residual_scale_maps = gv.residual_scale_maps = make(tf)
    gv.fit_map_scale_gains(model, data.features)  # gains in this variant's units
    scores, amaps = [], []
    with torch.no_grad():
        for i in range(0, len(feats), 16):
            x = torch.as_tensor(feats[i:i + 16]).float()
            s, a = det.head.postprocess(model.lowres_map(model(x), x))
            scores.append(s.numpy()); amaps.append(a[:, 0].numpy())
    scores, amaps = np.concatenate(scores), np.concatenate(amaps)
    row = {}
    for cls in sorted(set(classes)):
        m = classes == cls
        y = masks[m].reshape(-1)
        a = amaps[m].reshape(-1)
        row[cls] = (roc_auc_score(labels[m], scores[m]) * 100, roc_auc_score(y, a) * 100,
                    average_precision_score(y, a) * 100)
    row["mean"] = tuple(np.mean([row[c][k] for c in sorted(set(classes))]) for k in range(3))
    results[name] = row
    print(name, {k: tuple(round(v, 1) for v in vals) for k, vals in row.items()}, flush=True)
gm.residual_scale_maps = gv.residual_scale_maps = original
