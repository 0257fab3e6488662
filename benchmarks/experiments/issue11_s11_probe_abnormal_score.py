"""Raw abnormal score d (before relu) on the held-out real defects: cell AUROC within the defect images, and
the share of defect / normal cells with d > 0, per model."""
import sys, torch, numpy as np
from sklearn.metrics import roc_auc_score
from gradad.training.config import load_config
from gradad.training.trainer import prepare_training_data
from gradad.training.backbone import FeatureExtractor
from gradad.training.checkpoint import load_detector
torch.set_num_threads(2)
cfg = load_config(sys.argv[1] + "/config.yaml")
data = prepare_training_data(cfg, FeatureExtractor(cfg.backbone), torch.device("cpu"))
for name, ds in (("train", data.defects), ("held-out", data.heldout_defects)):
    det, _ = load_detector(sys.argv[1] + "/model.pt"); det.eval()
    with torch.no_grad():
        f = ds.features.float(); out = det.model(f)
        d = out.abnormal_score.reshape(-1).numpy(); y = ds.masks.reshape(-1).numpy() > 0
        r = det.model.residual_map(out.x_ref, f).reshape(-1).numpy()
    print(name, "d AUROC", round(roc_auc_score(y, d), 4), "relu(d) AUROC", round(roc_auc_score(y, np.maximum(d, 0)), 4),
          "normal map", round(roc_auc_score(y, r), 4), "d>0 defect", round((d[y] > 0).mean(), 3), "d>0 normal", round((d[~y] > 0).mean(), 3))
