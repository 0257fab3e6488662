"""Paired bootstrap: image Gaussian of per-channel means (152 d) vs means + stds (304 d), summed with the map's z."""
import numpy as np, torch
from pathlib import Path
from gradad.training.image_gaussian import ledoit_wolf, whitening, mahalanobis
from gradad.evaluation.metrics import auroc
O = Path("work/s9"); rng = np.random.default_rng(0)
def z(v, ref): return (v - ref.mean()) / ref.std()
for ds in ("mtd", "tyre"):
    tr = dict(np.load(O/f"{ds}_train.npz")); tu = dict(np.load(O/f"{ds}_tune.npz"))
    vi = np.where(tr["val"])[0]; ti = np.where(~tr["val"])[0]
    negs = [("heldout", {k: tr[k][vi] for k in tu})] if ds == "mtd" else [("valgood", dict(np.load(O/"tyre_valgood.npz")))]
    ref = {k: tr[k][vi] for k in tu}; D = tr["base"].shape[1] // 2
    for nname, neg in negs:
        lab = np.r_[np.ones(len(tu["map"])), np.zeros(len(neg["map"]))]; mp = np.r_[tu["map"], neg["map"]]
        s = {}
        for name, sl in (("mean", slice(0, D)), ("all", slice(None))):
            m_, cov, sh = ledoit_wolf(torch.from_numpy(tr["base"][ti][:, sl])); W = whitening(cov)
            f = lambda A: mahalanobis(torch.from_numpy(A[:, sl]), m_, W).numpy()
            s[name] = z(mp, ref["map"]) + z(np.r_[f(tu["base"]), f(neg["base"])], f(ref["base"]))
            print(ds, nname, name, "shrink", round(sh, 3), "sum", round(100*auroc(lab, s[name]), 1))
        pos, ng = np.where(lab == 1)[0], np.where(lab == 0)[0]; d = []
        for _ in range(4000):
            i = np.r_[rng.choice(pos, len(pos)), rng.choice(ng, len(ng))]
            d.append(auroc(lab[i], s["mean"][i]) - auroc(lab[i], s["all"][i]))
        d = np.array(d); print("  mean - all:", round(100*d.mean(), 2), "90% CI", np.round(100*np.percentile(d, [5, 95]), 2), "P(<=0)", round(float((d <= 0).mean()), 3))
