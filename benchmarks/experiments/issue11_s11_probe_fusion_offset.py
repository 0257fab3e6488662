"""Held-out real defects (9) + validation goods: does a fusion offset (relu(d - b), b a quantile of d on clean
validation cells) let the abnormal score add to the normal map? Cell AUROC within defect images, and pooled with
the validation goods' cells (closer to pixel AUROC), per (b quantile, w relative to the median normal map)."""
import torch, numpy as np
from sklearn.metrics import roc_auc_score, average_precision_score
from gradad.training.config import load_config
from gradad.training.trainer import prepare_training_data
from gradad.training.backbone import FeatureExtractor
from gradad.training.checkpoint import load_detector
torch.set_num_threads(2)
cfg = load_config("runs/unified_s9/config.yaml")
data = prepare_training_data(cfg, FeatureExtractor(cfg.backbone), torch.device("cpu"))
det, _ = load_detector("runs/unified_s9/model.pt"); det.eval()
def maps(f):
    with torch.no_grad():
        f = f.float(); out = det.model(f)
        return det.model.residual_map(out.x_ref, f).numpy().ravel(), out.abnormal_score.numpy().ravel()
e_c, d_c = maps(data.val_features); e_h, d_h = maps(data.heldout_defects.features)
y_h = data.heldout_defects.masks.numpy().ravel() > 0
y_all = np.r_[np.zeros(len(e_c), bool), y_h]
med = np.median(e_c)
print("clean d quantiles", np.quantile(d_c, [0.5, 0.9, 0.99, 0.999]).round(3))
for q in (None, 0.5, 0.9, 0.99):
    b = 0.0 if q is None else float(np.quantile(d_c, q))
    row = []
    for w in (0, 0.125, 0.25, 0.5, 1, 2):
        fh = e_h + w * med * np.maximum(0, d_h - b); fc = e_c + w * med * np.maximum(0, d_c - b)
        row.append(f"w{w}: {roc_auc_score(y_h, fh):.4f}/{roc_auc_score(y_all, np.r_[fc, fh]):.4f}/{average_precision_score(y_all, np.r_[fc, fh]):.4f}")
    print("b", q, round(b, 3), " | ".join(row))
