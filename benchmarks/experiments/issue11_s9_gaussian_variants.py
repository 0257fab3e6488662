"""Session 9 screen on work/s9/*.npz (issue11_s9_pooled_features.py): tuning split + held-out goods only."""
import numpy as np, torch
from pathlib import Path
from gradad.training.image_gaussian import ledoit_wolf, whitening, mahalanobis
from gradad.evaluation.metrics import auroc
O = Path("work/s9")
def z(v, ref): return (v - ref.mean()) / ref.std()
for ds in ("mtd", "tyre"):
    tr = dict(np.load(O/f"{ds}_train.npz")); tu = dict(np.load(O/f"{ds}_tune.npz"))
    val = tr["val"]; vi = np.where(val)[0]; ti = np.where(~val)[0]
    negs = [("heldout", {k: tr[k][vi] for k in tu})]
    if ds == "tyre": negs.append(("valgood", dict(np.load(O/"tyre_valgood.npz"))))
    ref = {k: tr[k][vi] for k in tu}
    for nname, neg in negs:
        lab = np.r_[np.ones(len(tu["map"])), np.zeros(len(neg["map"]))]
        mp = np.r_[tu["map"], neg["map"]]
        X = tr["base"][ti]; mu, sd = X.mean(0), X.std(0) + 1e-6
        def knn(A, k):
            d = torch.cdist(torch.from_numpy((A - mu)/sd), torch.from_numpy((X - mu)/sd))
            return d.topk(k, largest=False).values.mean(1).numpy()
        for k in (1, 3, 10):
            g = np.r_[knn(tu["base"], k), knn(neg["base"], k)]; r = knn(ref["base"], k)
            s = z(mp, ref["map"]) + z(g, r)
            print(ds, nname, f"knn{k} gauss/sum", round(100*auroc(lab, g),1), round(100*auroc(lab, s),1))
        D = X.shape[1] // 2
        for name, sl in (("mean", slice(0, D)), ("std", slice(D, None)), ("all", slice(None))):
            m_, cov, _ = ledoit_wolf(torch.from_numpy(X[:, sl])); W = whitening(cov)
            f = lambda A: mahalanobis(torch.from_numpy(A[:, sl]), m_, W).numpy()
            g = np.r_[f(tu["base"]), f(neg["base"])]; r = f(ref["base"])
            for w in (0.5, 1.0, 2.0):
                s = z(mp, ref["map"]) + w*z(g, r)
                print(ds, nname, f"gauss-{name} w{w} gauss/sum", round(100*auroc(lab, g),1), round(100*auroc(lab, s),1))
            s = np.maximum(z(mp, ref["map"]), z(g, r)); print(ds, nname, f"gauss-{name} max", round(100*auroc(lab, s),1))
