"""Session 5 scratch (work/s5/refscreen.py when it ran): inference-time variants of the similarity refinement and the image score on the product
model runs/unified_ms (normal branch), scored on the tuning split (3 defects/type) + the product's validation goods."""
import json, sys, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from gradad.training.checkpoint import load_detector
from gradad.training.model import AnomalyHead, residual_scale_maps
from gradad.training.config import ModelConfig
from gradad.evaluation.metrics import auroc, pixel_auroc_aupr
from screen_data import tuning_set
torch.set_num_threads(2)
det, meta = load_detector(sys.argv[1] if len(sys.argv) > 1 else "runs/unified_ms/model.pt")
model = det.model.eval(); cfg = model.cfg

print("cfg scales", cfg.map_scales, "gain", meta.get("map_scale_gain"))
G = model.map_scale_gain
def refine(xh, x, a, b, thr):
    m = (xh - x).pow(2).mean(1, keepdim=True)
    M = (m < thr).float() if thr is not None else torch.zeros_like(m)
    cos = F.cosine_similarity(xh, x, dim=1, eps=1e-8).unsqueeze(1)
    s = a * M + b * cos
    return s * x + (1 - s) * xh, m, cos
def msmap(xr, x):
    return torch.stack([g * t for g, t in zip(G, residual_scale_maps(xr, x, cfg.map_scales))]).amax(0)
variants = {"product(0.3,0.7,10)": (0.3, 0.7, 10.0), "plain(S=0)": (0, 0, None), "cos only(0,0.7)": (0, 0.7, None),
            "cos1(0,1)": (0, 1.0, None), "thr5": (0.3, 0.7, 5.0), "thr20": (0.3, 0.7, 20.0), "thr_inf": (0.3, 0.7, 1e9)}
heads = {"g4p16": ModelConfig(), "g4p8": ModelConfig(score_pool=8), "g4p32": ModelConfig(score_pool=32), "g2p16": ModelConfig(smoothing_sigma=2.0)}
out = {}
for ds in ("mtd", "tyre"):
    _, _, fx, fm, lab, n_def = tuning_set(ds); fx = torch.from_numpy(fx).float()
    with torch.no_grad():
        xh = torch.cat([model(fx[i:i+32]).x_hat_normal for i in range(0, len(fx), 32)])
    msk = torch.from_numpy(fm).float()[:, None]
    cell = F.adaptive_max_pool2d(msk, (32, 32)) > 0.5 if msk.shape[-1] != 32 else msk > 0.5
    for vn, (a, b, thr) in variants.items():
        xr, m, cos = refine(xh, fx, a, b, thr)
        if vn.startswith("product"):
            print(ds, "m quantiles good cells", np.quantile(m[n_def:].numpy(), [0.5, 0.9, 0.99]).round(2),
                  "defect cells", np.quantile(m[:n_def][cell[:n_def]].numpy(), [0.1, 0.5, 0.9]).round(2),
                  "cos good", np.quantile(cos[n_def:].numpy(), [0.01, 0.5]).round(3), "cos defect", np.quantile(cos[:n_def][cell[:n_def]].numpy(), [0.5]).round(3))
        amap = msmap(xr, fx)
        for hn, hc in heads.items():
            s, mp = AnomalyHead(hc, (256, 256)).postprocess(amap)
            pa, pp = pixel_auroc_aupr(fm, mp[:, 0].numpy())
            out[f"{ds} {vn} {hn}"] = [round(100 * auroc(lab, s.numpy()), 1), round(100 * pa, 1), round(100 * pp, 1)]
            print(f"{ds} {vn} {hn}", out[f"{ds} {vn} {hn}"], flush=True)
Path("work/s5/refscreen.json").write_text(json.dumps(out, indent=1))
