"""Session 7 screen (work/s7/deep_screen.py when it ran): which pooled features in the image Gaussian. Tuning split only (3 defects/type) vs held-out val goods;
tyre also vs tire/validation/good. GRAD map score from runs/unified_s6 (Gaussian bypassed)."""
import json, sys, numpy as np, torch
from pathlib import Path
from gradad.training.checkpoint import load_detector
from gradad.training.image_gaussian import ledoit_wolf, whitening, mahalanobis, pooled_statistics
from gradad.evaluation.metrics import auroc
from screen_data import tuning_ids
torch.set_num_threads(2)
C = Path("work/cache256"); S = Path("work/s7")
det, meta = load_detector("runs/unified_s6/model.pt"); det.eval()
def mapscore(x):
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 32):
            xb = torch.from_numpy(np.asarray(x[i:i+32])).float()
            out.append(det.head.postprocess(det.model.lowres_map(det.model(xb), xb))[0])
    return torch.cat(out).double()
def base(x):
    return torch.cat([pooled_statistics(torch.from_numpy(np.asarray(x[i:i+64])).float()) for i in range(0, len(x), 64)]).double()
def feats(name, idx, kinds, cachefeats):
    d = np.load(S/f"deep_{name}.npz"); parts = []
    for k in kinds:
        parts.append(base(cachefeats[idx]) if k == "base" else torch.from_numpy(d[k][idx]).double())
    return torch.cat(parts, 1)
combos = [("base",), ("base", "s6"), ("base", "s5", "s6"), ("base", "head"), ("s6",), ("head",), ("s4", "s6"), ("base", "s4", "s5", "s6")]
res = {}
for ds in ("mtd", "tyre"):
    ftr = np.load(C/f"{ds}_train_feats.npy", mmap_mode="r"); n = len(ftr)
    v = np.where(np.arange(n) % 10 == 5)[0]; tr = np.where(np.arange(n) % 10 != 5)[0]
    fte = np.load(C/f"{ds}_test_feats.npy", mmap_mode="r"); mte = json.loads((C/f"{ds}_test.json").read_text()); tid = tuning_ids(mte)
    va, vb = v[0::2], v[1::2]
    ga = mapscore(ftr[va]); gev = mapscore(np.concatenate([fte[tid], ftr[vb]]))
    lab = np.r_[np.ones(len(tid)), np.zeros(len(vb))]
    negsets = [("valgoods", lab, gev, lambda k: torch.cat([feats(f"{ds}_test", tid, k, fte), feats(f"{ds}_train", vb, k, ftr)]))]
    if ds == "tyre":
        fv = np.load(C/"tyre_val_feats.npy", mmap_mode="r"); b = np.arange(1, 29, 2)
        lab2 = np.r_[np.ones(len(tid)), np.zeros(len(b))]
        negsets.append(("tire/validation/good", lab2, mapscore(np.concatenate([fte[tid], fv[b]])),
                        lambda k: torch.cat([feats(f"{ds}_test", tid, k, fte), feats("tyre_val", b, k, fv)])))
    for kinds in combos:
        f_tr = feats(f"{ds}_train", tr, kinds, ftr); mu, cov, sh = ledoit_wolf(f_tr); W = whitening(cov)
        ma = mahalanobis(feats(f"{ds}_train", va, kinds, ftr), mu, W)
        for nname, lb, ge, fe in negsets:
            me = mahalanobis(fe(kinds), mu, W)
            comb = (ge - ga.mean()) / ga.std() + (me - ma.mean()) / ma.std()
            row = (round(100*auroc(lb, ge.numpy()), 1), round(100*auroc(lb, me.numpy()), 1), round(100*auroc(lb, comb.numpy()), 1))
            print(ds, nname, "+".join(kinds), "dim", f_tr.shape[1], "shrink", round(sh, 3), "map/gauss/sum", row, flush=True)
