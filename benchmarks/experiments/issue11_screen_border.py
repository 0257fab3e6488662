"""Session 5 scratch: border handling of the multi-scale residual map (normal branch of runs/unified_cos_pc, the
refitted smooth-refinement model); scored on the tuning split + validation goods. Not adopted (see README)."""
import numpy as np, torch, torch.nn.functional as F
from gradad.training.checkpoint import load_detector
from gradad.training.model import AnomalyHead
from gradad.training.config import ModelConfig
from gradad.evaluation.metrics import auroc, pixel_auroc_aupr
from screen_data import load, tuning_set
torch.set_num_threads(1)
det, meta = load_detector("runs/unified_cos_pc/model.pt"); model = det.model.eval()
S = (1, 3, 5, 7)
def scale_maps(r, pad):
    return [r.norm(dim=1, keepdim=True)] + [F.avg_pool2d(r, k, 1, k // 2, count_include_pad=pad).norm(dim=1, keepdim=True) for k in S[1:]]
def resid(x):
    with torch.no_grad():
        return torch.cat([model.normal_refined(x[i:i+32]) - x[i:i+32] for i in range(0, len(x), 32)])
# gains on train goods (not validation): every 4th non-validation image of both classes
tr = []
for ds in ("mtd", "tyre"):
    f = load(ds, "train")[0]; idx = [i for i in range(len(f)) if i % 10 != 5][::4]; tr.append(f[idx])
rt = resid(torch.from_numpy(np.concatenate(tr)).float())
G = {}
for pad in (False, True):
    st = scale_maps(rt, pad)
    G[f"pad{pad}"] = [float(st[0].mean() / s.mean()) for s in st]
    G[f"pos{pad}"] = [st[0].mean(0, keepdim=True) / s.mean(0, keepdim=True) for s in st]  # per-position gain
print({k: v for k, v in G.items() if k.startswith("pad")})
head = AnomalyHead(ModelConfig(), (256, 256))
for ds in ("mtd", "tyre"):
    _, _, x, fm, lab, n_def = tuning_set(ds); x = torch.from_numpy(x).float()
    r = resid(x)
    maps = {"plain": scale_maps(r, False)[0]}
    for pad in (False, True):
        st = scale_maps(r, pad)
        maps[f"ms pad={pad}"] = torch.stack([g * s for g, s in zip(G[f"pad{pad}"], st)]).amax(0)
        maps[f"ms pad={pad} per-position gain"] = torch.stack([g * s for g, s in zip(G[f"pos{pad}"], st)]).amax(0)
    for name, m in maps.items():
        s, mp = head.postprocess(m); pa, pp = pixel_auroc_aupr(fm, mp[:, 0].numpy())
        am = mp[:, 0].flatten(1).argmax(1); rr, cc = am // 256, am % 256
        border = ((rr < 24) | (rr > 231) | (cc < 24) | (cc > 231)).numpy()
        print(ds, f"{name:32s}", [round(100 * auroc(lab, s.numpy()), 1), round(100 * pa, 1), round(100 * pp, 1)],
              "argmax at border: goods", border[n_def:].mean().round(2), "defects", border[:n_def].mean().round(2), flush=True)
