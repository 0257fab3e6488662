"""Diagnostic (issue 11, session 12): an abnormal branch trained on image-space synthetic defects only
(runs/s12_synth_fg, `grad-train ... --defects work/s12/synth_fg/defects --normal-from runs/unified_s9/model.pt`):
how does its score d rank the cells of the 27 real tuning-split defects, none of which it saw? Compared with
runs/unified_s9's branch (18 of the 27 trained) and the normal map.

    python benchmarks/experiments/issue11_s12_synth_branch_transfer.py runs/s12_synth_fg
"""
import sys

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from gradad.training.backbone import FeatureExtractor
from gradad.training.checkpoint import load_detector
from gradad.training.config import load_config
from gradad.training.trainer import prepare_training_data

torch.set_num_threads(2)
cfg = load_config("runs/unified_s9/config.yaml")  # its defects: the 27 real tuning-split images
data = prepare_training_data(cfg, FeatureExtractor(cfg.backbone), torch.device("cpu"))
groups = {"trained by s9 (18)": data.defects, "held out by s9 (9)": data.heldout_defects}
for run in ["runs/unified_s9"] + sys.argv[1:]:
    det, _ = load_detector(f"{run}/model.pt")
    det.eval()
    for name, ds in groups.items():
        with torch.no_grad():
            f = ds.features.float()
            out = det.model(f)
            d = out.abnormal_score.reshape(-1).numpy()
            r = det.model.residual_map(out.x_ref, f).reshape(-1).numpy()
            fused = det.model.lowres_map(out, f).reshape(-1).numpy()
        y = ds.masks.reshape(-1).numpy() > 0
        line = (f"{run} | {name}: d {roc_auc_score(y, d):.4f} relu(d) {roc_auc_score(y, np.maximum(d, 0)):.4f} "
                f"normal map {roc_auc_score(y, r):.4f}")
        z = (r - r.mean()) / r.std()
        dz = (d - d.mean()) / d.std()
        line += f" fused map {roc_auc_score(y, fused):.4f}"
        line += " | z(map)+a*relu(z(d)) " + " ".join(f"{a}:{roc_auc_score(y, z + a * np.maximum(dz, 0)):.4f}"
                                                    for a in (0.25, 0.5, 1.0))
        print(line)
