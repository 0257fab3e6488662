"""Session 6 screen (work/s6/gauss*.py when it ran): an image-level Gaussian of pooled features (per-channel mean and std,
Ledoit-Wolf, per class) alone and added to GRAD's image score (sum of z-scores), on runs/unified_smooth.
Part 1: tuning split (3 defects/type, excluded from every report) against half B of the validation goods, z-scored on
half A. Part 2 (tyre): negatives tire/validation/good (captured like the test images; the train goods are not),
z-scored on train validation goods or on the other half of tire/validation/good."""
import sys, numpy as np, torch
from pathlib import Path
from gradad.training.checkpoint import load_detector
from gradad.evaluation.metrics import auroc
from screen_data import load, tuning_ids
torch.set_num_threads(2)
C = Path("work/cache256")
det, meta = load_detector(sys.argv[1] if len(sys.argv) > 1 else "runs/unified_smooth/model.pt"); model = det.model.eval()
def pooled(x, kind):
    x = torch.from_numpy(np.asarray(x)).double()
    return x.mean((2, 3)) if kind == "gap" else torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
def ledoit_wolf(X):
    n, p = X.shape; Xc = X - X.mean(0); S = Xc.T @ Xc / n; mu = S.diagonal().mean()
    d2 = ((S - mu * torch.eye(p, dtype=X.dtype)) ** 2).sum()
    b2 = sum(((Xc[i:i+1].T @ Xc[i:i+1] - S) ** 2).sum() for i in range(n)) / n**2
    sh = float(min(b2, d2) / d2)
    return X.mean(0), (1 - sh) * S + sh * mu * torch.eye(p, dtype=X.dtype), sh
def maha(mu, P, f): z = f - mu; return (z @ P * z).sum(1).sqrt()
def grad_scores(x):
    with torch.no_grad():
        return torch.cat([det.from_features(torch.from_numpy(np.asarray(x[i:i+32])).float())[0] for i in range(0, len(x), 32)]).double()
for kind in ("gap", "gap+std"):
    fits = {}; data = {}
    for ds in ("mtd", "tyre"):
        f, _, _ = load(ds, "train"); v = np.where(np.arange(len(f)) % 10 == 5)[0]; tr = np.where(np.arange(len(f)) % 10 != 5)[0]
        mu, cov, sh = ledoit_wolf(pooled(f[tr], kind)); fits[ds] = (mu, torch.linalg.inv(cov))
        tf, tm, mt = load(ds, "test"); tid = tuning_ids(mt)
        data[ds] = (f[v[0::2]], f[v[1::2]], tf[tid]); print(kind, ds, "LW shrinkage", round(sh, 3))
    for ds, (va, vb, dfx) in data.items():
        fa, fe = pooled(va, kind), pooled(np.concatenate([dfx, vb]), kind)
        lab = np.r_[np.ones(len(dfx)), np.zeros(len(vb))]
        all_d = torch.stack([maha(*fits[k], fe) for k in fits]); nearest = all_d.min(0).values
        ok = (all_d.argmin(0) == list(fits).index(ds)).double().mean()
        m_own = maha(*fits[ds], fe); ma = maha(*fits[ds], fa)
        ge, ga = grad_scores(np.concatenate([dfx, vb])), grad_scores(va)
        comb = (ge - ga.mean()) / ga.std() + (m_own - ma.mean()) / ma.std()
        print(kind, ds, "GRAD", round(100 * auroc(lab, ge.numpy()), 1), "Gauss", round(100 * auroc(lab, m_own.numpy()), 1),
              "nearest-class right", float(ok), "GRAD+Gauss z-sum", round(100 * auroc(lab, comb.numpy()), 1), f"n={len(dfx)}+{len(vb)}", flush=True)

# ---- part 2: tyre with tire/validation/good negatives
for kind in ("gap", "gap+std"):
    f, _, _ = load("tyre", "train"); v = np.where(np.arange(len(f)) % 10 == 5)[0]; tr = np.where(np.arange(len(f)) % 10 != 5)[0]
    mu, cov, sh = ledoit_wolf(pooled(f[tr], kind)); P = torch.linalg.inv(cov)
    tf, tm, mt = load("tyre", "test"); tid = tuning_ids(mt)
    xv = np.load(C/"tyre_val_feats.npy", mmap_mode="r"); a, b = xv[0::2], xv[1::2]
    for zname, za in (("z from train val-split", f[v]), ("z from validation/good half A", a)):
        ma = maha(mu, P, pooled(za, kind)); ga = grad_scores(za)
        xe = np.concatenate([tf[tid], b]); lab = np.r_[np.ones(len(tid)), np.zeros(len(b))]
        me = maha(mu, P, pooled(xe, kind)); ge = grad_scores(xe)
        comb = (ge - ga.mean()) / ga.std() + (me - ma.mean()) / ma.std()
        print(kind, zname, "| negatives validation/good half B:", "GRAD", round(100*auroc(lab, ge.numpy()), 1), "Gauss", round(100*auroc(lab, me.numpy()), 1), "sum", round(100*auroc(lab, comb.numpy()), 1))
