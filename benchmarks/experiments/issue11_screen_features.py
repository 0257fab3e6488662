"""Scratch screen (issue 11): NORMAL-only stage 2 on cached 256-px features (1/3 of train goods), variants of the
features the branch reconstructs, scored on TRAINING-SIDE data only: the tuning split (first 3 defects per type,
excluded from every report) + held-out validation goods (every 10th train good). Usage: issue11_screen_features.py VARIANT THREADS EPOCHS [section.key=value ...]
(work/screen.py when it ran)."""
import json, sys, time, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from gradad.training.config import preset_config
from gradad.training.model import GRADModel, AnomalyHead
from gradad.training import trainer as T
from gradad.evaluation.metrics import auroc, pixel_auroc_aupr
variant, threads, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
C, R = Path("work/cache256"), Path("work/screen")
def load(n, s): return np.load(C/f"{n}_{s}_feats.npy"), np.load(C/f"{n}_{s}_masks.npy"), json.loads((C/f"{n}_{s}.json").read_text())
def prep(a):
    x = torch.from_numpy(np.asarray(a)).float()
    if variant.startswith("cat3"):
        return torch.cat([x, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)], 1)
    if variant.startswith("agg3"):
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if variant.startswith("agg5"):
        x = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    return x
train, evals = [], {}
for ds in ("mtd", "tyre"):
    f, _, _ = load(ds, "train"); v = np.arange(len(f)) % 10 == 5
    train.append(f[~v][::3])
    tf, tm, meta = load(ds, "test"); seen = {}; tid = []
    for i, m in enumerate(meta):
        if m["label"] == 1:
            seen[m["defect"]] = seen.get(m["defect"], 0) + 1
            if seen[m["defect"]] <= 3: tid.append(i)
    ex = np.concatenate([tf[tid], f[v]]); em = np.concatenate([tm[tid], np.zeros((int(v.sum()),) + tm.shape[1:], tm.dtype)])
    evals[ds] = (prep(ex), em, np.r_[np.ones(len(tid)), np.zeros(int(v.sum()))])
X = prep(np.concatenate(train))
cfg = preset_config("edge")
for kv in sys.argv[4:]:
    k, v = kv.split("="); sec, name = k.split("."); setattr(getattr(cfg, sec), name, type(getattr(getattr(cfg, sec), name))(v))
n, c, h, w = X.shape
if variant == "patchcore":
    from gradad.benchmarks.patchcore import PatchCore, PatchCoreConfig, PATCHCORE_HEAD, patch_features
    pc = PatchCore(PatchCoreConfig(), AnomalyHead(PATCHCORE_HEAD, (256, 256))).fit(X); out = {"variant": variant}
    for ds, (fx, fm, lab) in evals.items():
        b = len(fx); p = patch_features(fx, 3)
        dist = torch.cat([torch.cdist(p[i:i+8192], pc.bank).amin(1) for i in range(0, len(p), 8192)]).view(b, 1, h, w)
        for hn, head in {"own": pc.head, "g4p16": AnomalyHead(cfg.model, (256, 256))}.items():
            s, m = head.postprocess(dist); pa, pp = pixel_auroc_aupr(fm, m[:, 0].numpy())
            out[f"{ds}_{hn}"] = [round(100 * auroc(lab, s.numpy()), 1), round(100 * pa, 1), round(100 * pp, 1)]
    print(json.dumps(out)); (R/"patchcore.json").write_text(json.dumps(out)); sys.exit(0)
torch.manual_seed(0)
model = GRADModel(c, (h, w), cfg.model)
gen = torch.Generator(); gen.manual_seed(1); torch.manual_seed(1)
params = T.stage_parameters(model, "normal", cfg); opt = T.make_optimizer(model, params, cfg)
sched = torch.optim.lr_scheduler.StepLR(opt, max(1, int(0.8 * epochs)), 0.1); t0 = time.time()
for ep in range(epochs):
    T.set_stage_mode(model, "normal"); L = []
    for idx in T._batches(n, 16, gen):
        loss = T.normal_step(model, X[idx]); opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1); opt.step(); L.append(loss.item())
    sched.step(); print(variant, ep + 1, round(float(np.mean(L)), 4), round(time.time() - t0), flush=True)
model.eval(); out = {"variant": variant, "epochs": epochs, "sets": sys.argv[4:], "seconds": round(time.time() - t0)}
heads = {"g4p16": AnomalyHead(cfg.model, (256, 256))}
for ds, (fx, fm, lab) in evals.items():
    maps = {"l2": [], "l2pool3": []}
    with torch.no_grad():
        for i in range(0, len(fx), 32):
            x = fx[i:i+32]; o = model(x); maps["l2"].append(AnomalyHead.lowres_map(o.x_ref, x))
            maps["l2pool3"].append(AnomalyHead.lowres_map(F.avg_pool2d(o.x_ref - x, 3, 1, 1, count_include_pad=False), 0 * x))
    for mn, en in maps.items():
        en = torch.cat(en)
        for hn, head in heads.items():
            s, m = head.postprocess(en); pa, pp = pixel_auroc_aupr(fm, m[:, 0].numpy())
            out[f"{ds}_{mn}_{hn}"] = [round(100 * auroc(lab, s.numpy()), 1), round(100 * pa, 1), round(100 * pp, 1)]
print(json.dumps(out), flush=True)
torch.save(model.state_dict(), R/f"{variant}{'_'.join(sys.argv[4:])}_{epochs}.pt")
(R/f"{variant}{'_'.join(sys.argv[4:])}_{epochs}.json").write_text(json.dumps(out))
