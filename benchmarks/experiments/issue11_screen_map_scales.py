"""Scratch: re-score saved screen models (work/screen/*.pt) with several map forms and heads, same training-side
eval set as screen.py (tuning split + validation goods). Usage: issue11_screen_map_scales.py NAME.pt [key=value ...]
(work/screen_eval4.py when it ran; map forms l2 and m<scales>_<norm>: max over scales of the pooled residual norm
divided by its mean / quantile on 200 train goods)."""
import os, json, sys, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from gradad.training.config import preset_config, ModelConfig
from gradad.training.model import GRADModel, AnomalyHead
from gradad.evaluation.metrics import auroc, pixel_auroc_aupr
from screen_data import load, tuning_set
torch.set_num_threads(1)
name = sys.argv[1]; variant = name
def prep(a):
    x = torch.from_numpy(np.asarray(a)).float()
    if variant.startswith("cat3"): return torch.cat([x, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)], 1)
    if variant.startswith("agg3"): x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x
cfg = preset_config("edge")
for kv in sys.argv[2:]:
    k, v = kv.split("="); sec, nm = k.split("."); setattr(getattr(cfg, sec), nm, type(getattr(getattr(cfg, sec), nm))(v))
model = GRADModel(304 if variant.startswith('cat3') else 152, (32, 32), cfg.model); model.load_state_dict(torch.load(f"work/screen/{name}", weights_only=True), strict=False); model.eval()  # saved before map_scale_gain
heads = {"g4p16": ModelConfig(), }
out = {"model": name}
def scales(x):
    with torch.no_grad():
        r = model(x).x_ref - x
        return [r.norm(dim=1, keepdim=True)] + [F.avg_pool2d(r, k, 1, k // 2, count_include_pad=False).norm(dim=1, keepdim=True) for k in (3, 5, 7)]
tr = torch.cat([prep(load(ds, "train")[0][np.arange(len(load(ds, "train")[0])) % 10 != 5][::7][:100]) for ds in ("mtd", "tyre")])
st = [torch.cat([scales(tr[i:i+32])[j] for i in range(0, len(tr), 32)]) for j in range(4)]
Q = {q: [float(s.flatten().quantile(q)) for s in st] for q in (0.5, 0.9, 0.99)}; Q["mean"] = [float(s.mean()) for s in st]; print(Q)
POSITION_NORM = os.environ.get("POSITION_NORM") == "1"  # the per-position normalisation screen instead
def msmap(sc, qv): return torch.stack([sc[j] / qv[j] for j in range(4)]).amax(0)
if POSITION_NORM:
    trmaps = msmap(st, Q["mean"]); MU, SD = trmaps.mean(0, keepdim=True), trmaps.std(0, keepdim=True)
    MU1 = st[0].mean(0, keepdim=True); print("pos mean range", float(MU.min()), float(MU.max()))
for ds in ("mtd", "tyre"):
    _, _, fx, fm, lab, _ = tuning_set(ds); fx = prep(fx)
    combos = {"m15": (0, 2), "m135": (0, 1, 2), "m157": (0, 2, 3), "m17": (0, 3), "m1357": (0, 1, 2, 3)}
    maps = {"l2": []}
    with torch.no_grad():
        for i in range(0, len(fx), 32):
            x = fx[i:i+32]; sc = scales(x); maps["l2"].append(sc[0])
            if POSITION_NORM:
                m = msmap(sc, Q["mean"])
                for k, v in {"ms": m, "ms_sub": m - MU + MU.mean(), "ms_div": m / MU * MU.mean(),
                             "ms_z": (m - MU) / (SD + 1e-6) + 10, "l2_div": sc[0] / MU1 * MU1.mean()}.items():
                    maps.setdefault(k, []).append(v)
                continue
            for qn, qv in Q.items():
                for cn, idx in combos.items():
                    maps.setdefault(f"{cn}_{qn}", []).append(torch.stack([sc[j] / qv[j] for j in idx]).amax(0))
    for mn, en in maps.items():
        en = torch.cat(en)
        for hn, hc in heads.items():
            s, m = AnomalyHead(hc, (256, 256)).postprocess(en); pa, pp = pixel_auroc_aupr(fm, m[:, 0].numpy())
            out[f"{ds}_{mn}_{hn}"] = [round(100 * auroc(lab, s.numpy()), 1), round(100 * pa, 1), round(100 * pp, 1)]
for k, v in out.items(): print(k, v)
Path(f"work/screen/{'evalpos' if POSITION_NORM else 'eval4'}_{name}.json").write_text(json.dumps(out))
