"""Session 9 screen on work/s9/*.npz (issue11_s9_pooled_features.py): tuning split + held-out goods only."""
import numpy as np, torch
from pathlib import Path
from gradad.training.image_gaussian import ledoit_wolf, whitening, mahalanobis
from gradad.evaluation.metrics import auroc
O = Path("work/s9"); rng = np.random.default_rng(0)
combos = [("base",), ("base","s6"), ("base","s5","s6"), ("base","s4","s5","s6"), ("s6",), ("s5","s6"), ("base","s5")]
def F(d, kinds, idx=slice(None)): return torch.from_numpy(np.concatenate([d[k][idx] for k in kinds], 1)).double()
def boot(lab, a, b, n=2000):
    pos, neg = np.where(lab == 1)[0], np.where(lab == 0)[0]; ds = []
    for _ in range(n):
        i = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        ds.append(auroc(lab[i], a[i]) - auroc(lab[i], b[i]))
    ds = np.array(ds); return round(100*ds.mean(), 1), round(100*np.percentile(ds, 5), 1), round(float((ds <= 0).mean()), 3)
for ds in ("mtd", "tyre"):
    tr = dict(np.load(O/f"{ds}_train.npz")); tu = dict(np.load(O/f"{ds}_tune.npz"))
    val = tr["val"]; vi = np.where(val)[0]; ti = np.where(~val)[0]
    negsets = [("heldout", {k: tr[k][vi] for k in tu})]
    if ds == "tyre": negsets.append(("valgood", dict(np.load(O/"tyre_valgood.npz"))))
    for nname, neg in negsets:
        halves = [np.arange(len(neg["map"]))[0::2], np.arange(len(neg["map"]))[1::2]]
        ref = {k: tr[k][vi] for k in tu}  # normalisation on held-out goods (as the product)
        lab = np.r_[np.ones(len(tu["map"])), np.zeros(len(neg["map"]))]
        mp = np.r_[tu["map"], neg["map"]]; zs = {}
        for kinds in combos:
            mu, cov, sh = ledoit_wolf(F(tr, kinds, ti)); W = whitening(cov)
            r = mahalanobis(F(ref, kinds), mu, W).numpy(); g = np.r_[mahalanobis(F(tu, kinds), mu, W).numpy(), mahalanobis(F(neg, kinds), mu, W).numpy()]
            z = (mp - ref["map"].mean())/ref["map"].std() + (g - r.mean())/r.std(); zs[kinds] = z
            print(ds, nname, "+".join(kinds), "n+", len(tu["map"]), "n-", len(neg["map"]), "map/gauss/sum",
                  round(100*auroc(lab, mp),1), round(100*auroc(lab, g),1), round(100*auroc(lab, z),1), flush=True)
        for kinds in combos[1:]:
            print("   boot", "+".join(kinds), "- base: mean diff, 5th pct, P(<=0)", boot(lab, zs[kinds], zs[("base",)]))
