"""Session 7 screen (work/s7/floor_screen.py when it ran; CH=s8|s16 selected the channels of the second screen):
eigenvalue floor of the image Gaussian's whitening (1e-3 today) and how z-parts combine.
Tuning split (3 defects/type) vs held-out val goods; tyre also vs tire/validation/good. runs/unified_s6 map."""
import json, os, numpy as np, torch
from pathlib import Path
from gradad.training.checkpoint import load_detector
from gradad.training.image_gaussian import ledoit_wolf, mahalanobis, pooled_statistics
from gradad.evaluation.metrics import auroc
from screen_data import tuning_ids
torch.set_num_threads(2)
C = Path("work/cache256")
det, _ = load_detector("runs/unified_s6/model.pt"); det.eval()
def mapscore(x):
    with torch.no_grad():
        return torch.cat([det.head.postprocess(det.model.lowres_map(det.model(torch.from_numpy(np.asarray(x[i:i+32])).float()),
               torch.from_numpy(np.asarray(x[i:i+32])).float()))[0] for i in range(0, len(x), 32)]).double()
CH = {"s8": slice(0, 40), "s16": slice(40, 152)}.get(os.environ.get("CH", ""), slice(0, 152))  # feature channels pooled
def pooled(x): return torch.cat([pooled_statistics(torch.from_numpy(np.asarray(x[i:i+64, CH])).float()) for i in range(0, len(x), 64)]).double()
def whit(cov, floor):
    v, U = torch.linalg.eigh(cov); return U @ torch.diag(v.clamp_min(floor * v.clamp_min(0).mean()).rsqrt()) @ U.T
for ds in ("mtd", "tyre"):
    ftr = np.load(C/f"{ds}_train_feats.npy", mmap_mode="r"); n = len(ftr)
    v = np.where(np.arange(n) % 10 == 5)[0]; tr = np.where(np.arange(n) % 10 != 5)[0]; va, vb = v[0::2], v[1::2]
    fte = np.load(C/f"{ds}_test_feats.npy", mmap_mode="r"); tid = tuning_ids(json.loads((C/f"{ds}_test.json").read_text()))
    sets = [("valgoods", np.concatenate([fte[tid], ftr[vb]]), len(vb))]
    if ds == "tyre":
        fv = np.load(C/"tyre_val_feats.npy", mmap_mode="r"); b = np.arange(1, 29, 2); sets.append(("tire/val/good", np.concatenate([fte[tid], fv[b]]), len(b)))
    P = pooled(ftr[tr]); mu, cov, sh = ledoit_wolf(P); Pa = pooled(ftr[va]); ga = mapscore(ftr[va])
    v_, _ = torch.linalg.eigh(cov); print(ds, "shrink", round(sh, 4), "eig max/mean/min", float(v_.max()), float(v_.mean()), float(v_.min()))
    for name, X, nn in sets:
        lab = np.r_[np.ones(len(tid)), np.zeros(nn)]; ge = mapscore(X); Pe = pooled(X)
        zmap = (ge - ga.mean()) / ga.std()
        for floor in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0):
            W = whit(cov, floor); ma = mahalanobis(Pa, mu, W); me = mahalanobis(Pe, mu, W); zg = (me - ma.mean()) / ma.std()
            print(ds, name, f"floor {floor:g}", "map", round(100*auroc(lab, ge.numpy()), 1), "gauss", round(100*auroc(lab, me.numpy()), 1),
                  "sum", round(100*auroc(lab, (zmap + zg).numpy()), 1), "max", round(100*auroc(lab, torch.maximum(zmap, zg).numpy()), 1), flush=True)
