"""Diagnostic (issue 11, session 12): do *image-space* synthetic defects (DRAEM / CutPaste-style: smooth-noise blobs
and thin polylines, filled with darkened, brightened, blurred, noised or foreign texture) teach a cell classifier
something that transfers to the 27 real labelled defects of the tuning split (runs/split)?

Training side only: the synthetic defects are painted on train goods (the trainer's validation goods excluded); the
real defects are the tuning split's 27 images (excluded from every reported number). Cell AUROC within the defect
images, as in issue11_s11_probe_transfer.py (there: a probe trained on 18 real defects ranked the 9 held-out ones at
0.69-0.72; the normal map 0.73).

    python benchmarks/experiments/issue11_s12_image_synthesis_probe.py [RUN=runs/unified_s9] [N_PER_CLASS=240]
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from gradad.data.images import read_image_rgb, resize_hw
from gradad.training.backbone import FeatureExtractor
from gradad.training.checkpoint import load_detector
from gradad.training.config import load_config
from gradad.training.defects import cell_masks, defect_samples
from gradad.training.features import FeatureCache
from gradad.training.trainer import prepare_training_data
from gradad.training.validation import validation_indices
from gradad.training.features import load_images

RUN = sys.argv[1] if len(sys.argv) > 1 else "runs/unified_s9"
N_PER_CLASS = int(sys.argv[2]) if len(sys.argv) > 2 else 240
OUT = Path(sys.argv[3] if len(sys.argv) > 3 else "work/s12/synth")
ON_OBJECT = "fg" in OUT.name  # place defects on the textured object, not on an empty background
KINDS = ("dark", "bright", "texture", "blur", "noise")
torch.set_num_threads(2)


def blob_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One smooth-noise blob of 0.1-3 % of the image, at a random place."""
    size = rng.integers(3, 9)
    noise = cv2.resize(rng.random((size, size)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    frac = float(np.exp(rng.uniform(np.log(0.001), np.log(0.03))))
    mask = (noise > np.quantile(noise, 1 - frac)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    if n > 2:  # keep one component: a defect is usually one region
        keep = 1 + int(rng.integers(n - 1))
        mask = (labels == keep).astype(np.uint8)
    return mask


def line_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A thin random polyline (crack / fray-like), 1-5 px thick, 20-120 px long."""
    pts = [rng.uniform([0, 0], [w, h])]
    length, angle = rng.uniform(20, 120), rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 7))):
        angle += rng.normal(0, 0.6)
        step = length / 5
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    mask = np.zeros((h, w), np.uint8)
    cv2.polylines(mask, [np.int32(pts)], False, 1, thickness=int(rng.integers(1, 6)))
    return mask


def foreground(img: np.ndarray) -> np.ndarray:
    """Cells of the textured object: local grey-level std above Otsu's threshold (the whole image when that is
    under 5 % of it: a texture such as a tile)."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.GaussianBlur(grey, (0, 0), 4)
    std = np.sqrt(np.maximum(cv2.GaussianBlur(grey * grey, (0, 0), 4) - mean * mean, 0))
    s8 = cv2.normalize(std, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, fg = cv2.threshold(s8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return fg if fg.mean() >= 0.05 else np.ones_like(fg)


def place_on(mask: np.ndarray, fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``mask`` shifted so its centroid sits on a random foreground pixel."""
    ys, xs = np.nonzero(mask)
    fy, fx = np.nonzero(fg)
    k = int(rng.integers(len(fy)))
    dy, dx = int(fy[k] - ys.mean()), int(fx[k] - xs.mean())
    return np.roll(np.roll(mask, dy, 0), dx, 1) * fg


def paint(img: np.ndarray, other: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Fill ``mask`` of ``img`` with one kind of anomaly, soft-edged."""
    f = img.astype(np.float32)
    if kind == "dark":
        fill = f * rng.uniform(0.2, 0.7)
    elif kind == "bright":
        fill = f + (255 - f) * rng.uniform(0.3, 0.8)
    elif kind == "texture":
        fill = np.rot90(other, int(rng.integers(4))).astype(np.float32)
        fill = np.roll(fill, (int(rng.integers(img.shape[0])), int(rng.integers(img.shape[1]))), (0, 1))
    elif kind == "blur":
        fill = cv2.GaussianBlur(f, (0, 0), rng.uniform(3, 8))
        fill = fill * rng.uniform(0.7, 1.3)
    else:  # noise
        fill = f + rng.normal(0, rng.uniform(20, 60), f.shape)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)[..., None] * rng.uniform(0.6, 1.0)
    return np.clip(f * (1 - alpha) + fill * alpha, 0, 255).astype(np.uint8)


def synthesise(samples, keep, size: int) -> None:
    rng = np.random.default_rng(0)
    by_class: dict[str, list] = {}
    for i in keep:
        by_class.setdefault(samples[i].class_name, []).append(samples[i])
    for cls, members in by_class.items():
        picks = rng.choice(len(members), N_PER_CLASS, replace=len(members) < N_PER_CLASS)
        for j, p in enumerate(picks):
            kind = KINDS[j % len(KINDS)]
            img = resize_hw(read_image_rgb(members[p].image_path), size, size)
            other = resize_hw(read_image_rgb(members[int(rng.integers(len(members)))].image_path), size, size)
            mask = (line_mask if rng.random() < 0.4 else blob_mask)(size, size, rng)
            if ON_OBJECT:
                mask = place_on(mask, foreground(img), rng)
            if mask.sum() < 20:
                mask = blob_mask(size, size, rng)
            out = paint(img, other, mask, kind, rng)
            for sub, arr in (("defects", out), ("masks", mask * 255)):
                path = OUT / sub / cls / kind / f"{j:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr)


def cells(feats: torch.Tensor, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return feats.float().permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).numpy(), masks.reshape(-1).numpy() > 0


def main() -> None:
    cfg = load_config(f"{RUN}/config.yaml")
    extractor = FeatureExtractor(cfg.backbone)
    data = prepare_training_data(cfg, extractor, torch.device("cpu"))
    val = set(validation_indices(data.samples, cfg.data.val_fraction).tolist())
    keep = [i for i in range(len(data.samples)) if i not in val]
    if not (OUT / "defects").is_dir():
        synthesise(data.samples, keep, cfg.data.image_size)
    classes = {s.class_name for s in data.samples}
    syn = defect_samples(OUT / "defects", OUT / "masks", classes)
    feats, _ = FeatureCache(cfg.data.cache_dir).load_or_compute(extractor, syn, cfg.data.image_size, torch.device("cpu"))
    _, pm = load_images(syn, cfg.data.image_size, desc="masks")
    syn_masks = cell_masks(torch.from_numpy(pm), tuple(feats.shape[-2:]), [True] * len(syn))
    syn_feats = torch.from_numpy(feats)
    kinds = np.array([s.defect_type for s in syn])
    print(f"synthetic: {len(syn)} images, {100 * float(syn_masks.mean()):.2f}% defective cells")

    real_f = torch.cat([data.defects.features, data.heldout_defects.features])
    real_m = torch.cat([data.defects.masks, data.heldout_defects.masks])
    held_f, held_m = data.heldout_defects.features, data.heldout_defects.masks
    det, _ = load_detector(f"{RUN}/model.pt")
    det.eval()

    def branch(f: torch.Tensor):
        with torch.no_grad():
            f = f.float()
            out = det.model(f)
            return det.model.residual_map(out.x_ref, f), out.abnormal_score, out.x_ref - f

    r_real, d_real, res_real = branch(real_f)
    r_syn, d_syn, res_syn = branch(syn_feats)
    X_real, y_real = cells(real_f, real_m)
    X_held, y_held = cells(held_f, held_m)
    X_syn, y_syn = cells(syn_feats, syn_masks)
    g = data.features[::20].float()
    X_good = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).numpy()[::3]
    mu, sd = X_good.mean(0), X_good.std(0) + 1e-6
    rn = r_real.reshape(-1).numpy()
    print("real 27: normal map cell AUROC", round(roc_auc_score(y_real, rn), 4),
          "abnormal d", round(roc_auc_score(y_real, d_real.reshape(-1).numpy()), 4))
    print("synthetic: normal map cell AUROC", round(roc_auc_score(y_syn, r_syn.reshape(-1).numpy()), 4),
          "abnormal d", round(roc_auc_score(y_syn, d_syn.reshape(-1).numpy()), 4))
    cell_kind = np.repeat(kinds, syn_masks.shape[-1] * syn_masks.shape[-2])
    for k in KINDS:
        sel = cell_kind == k
        print(f"  synthetic {k}: normal map {roc_auc_score(y_syn[sel], r_syn.reshape(-1).numpy()[sel]):.4f}")

    def probe(name: str, Xtr, ytr, Xte, yte, extra=None):
        for C in (0.01, 0.1):
            clf = LogisticRegression(C=C, max_iter=3000, class_weight="balanced")
            clf.fit(np.concatenate([Xtr, X_good_z]), np.concatenate([ytr, np.zeros(len(X_good_z))]))
            s = clf.decision_function(Xte)
            line = f"{name} C={C}: real cell AUROC {roc_auc_score(yte, s):.4f}"
            if extra is not None:
                z = (extra - extra.mean()) / extra.std()
                sz = (s - s.mean()) / s.std()
                line += " | map+a*relu(probe) " + " ".join(
                    f"{a}:{roc_auc_score(yte, z + a * np.maximum(sz, 0)):.4f}" for a in (0.25, 0.5, 1.0))
            print(line)

    X_good_z = (X_good - mu) / sd
    probe("probe on synthetic (all kinds) -> real 27", (X_syn - mu) / sd, y_syn, (X_real - mu) / sd, y_real, rn)
    probe("probe on synthetic (all kinds) -> held 9", (X_syn - mu) / sd, y_syn, (X_held - mu) / sd, y_held,
          r_real.reshape(-1).numpy()[-len(y_held):])
    for k in KINDS:
        sel = cell_kind == k
        probe(f"probe on synthetic {k} -> real 27", ((X_syn - mu) / sd)[sel], y_syn[sel], (X_real - mu) / sd, y_real)
    # residual-based probe: what the abnormal branch sees besides x
    R_syn = res_syn.permute(0, 2, 3, 1).reshape(-1, res_syn.shape[1]).numpy()
    R_real = res_real.permute(0, 2, 3, 1).reshape(-1, res_real.shape[1]).numpy()
    X_good_z = np.zeros((0, R_syn.shape[1]))
    probe("residual probe on synthetic -> real 27", R_syn, y_syn, R_real, y_real, rn)


if __name__ == "__main__":
    main()
