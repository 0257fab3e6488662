"""Diagnostic: can a simple supervised cell classifier on backbone features (or on the normal branch's residual)
transfer from the 18 training real defects to the 9 held-out ones? Cell AUROC on the held-out defect images."""
import torch, numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.linear_model import LogisticRegression
from gradad.training.config import load_config
from gradad.training.trainer import prepare_training_data
from gradad.training.backbone import FeatureExtractor

torch.set_num_threads(2)
cfg = load_config("runs/unified_s9/config.yaml")
dev = torch.device("cpu")
data = prepare_training_data(cfg, FeatureExtractor(cfg.backbone), dev)
tr, ho = data.defects, data.heldout_defects
print(len(tr.samples), len(ho.samples))
def cells(ds):
    f = ds.features.float(); m = ds.masks
    X = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy(); y = m.reshape(-1).numpy()
    return X, y
Xtr, ytr = cells(tr); Xho, yho = cells(ho)
# extra normal cells from good training images
g = data.features[::40].float(); Xg = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).numpy()
mu, sd = Xg.mean(0), Xg.std(0) + 1e-6
for C in (0.01, 0.1, 1.0):
    clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
    clf.fit(np.concatenate([(Xtr - mu) / sd, (Xg[::4] - mu) / sd]), np.concatenate([ytr, np.zeros(len(Xg[::4]))]))
    s = clf.decision_function((Xho - mu) / sd)
    print("logreg x C", C, "held-out cell AUROC", round(roc_auc_score(yho, s), 4))
# residual of the normal branch
from gradad.training.model import GRADModel
payload = torch.load("runs/unified_s9/model.pt", map_location="cpu", weights_only=True)

from gradad.training.checkpoint import load_detector
det, _ = load_detector("runs/unified_s9/model.pt")
det.eval()
with torch.no_grad():
    def resid(f):
        f = f.float(); out = det.model(f)
        return det.model.residual_map(out.x_ref, f), out.abnormal_score, (out.x_ref - f)
    r_ho, d_ho, res_ho = resid(ho.features); r_tr, d_tr, res_tr = resid(tr.features)
print("normal map held-out cell AUROC", round(roc_auc_score(yho, r_ho.reshape(-1).numpy()), 4))
print("abnormal d held-out cell AUROC", round(roc_auc_score(yho, d_ho.reshape(-1).numpy()), 4))
print("abnormal d train cell AUROC", round(roc_auc_score(ytr, d_tr.reshape(-1).numpy()), 4))
clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
clf.fit(np.concatenate([(Xtr - mu) / sd, (Xg[::4] - mu) / sd]), np.concatenate([ytr, np.zeros(len(Xg[::4]))]))
s = clf.decision_function((Xho - mu) / sd)
from scipy.stats import rankdata
rn = r_ho.reshape(-1).numpy()
for a in (0.0, 0.25, 0.5, 1.0):
    z = (rn - rn.mean()) / rn.std() + a * np.maximum(0, (s - s.mean()) / s.std())
    print("map + a*relu(z logreg)", a, round(roc_auc_score(yho, z), 4))
# residual-vector classifier
def cellsT(t): return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).numpy()
Rtr, Rho = cellsT(res_tr), cellsT(res_ho)
for C in (0.1, 1.0):
    c2 = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(np.concatenate([Xtr, Rtr], 1), ytr)
    print("logreg [x,res] (defect images only) C", C, round(roc_auc_score(yho, c2.decision_function(np.concatenate([Xho, Rho], 1))), 4))
