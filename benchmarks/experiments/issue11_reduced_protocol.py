"""Scratch, reduced protocol (1/3 of the good training images, 10 + 20 epochs) on MTD + tyre: full GRAD (normal +
fitted w*relu(d)) vs NORMAL-only (w = 0: the same normal branch) vs PatchCore (same reduced training images, same
extractor, its own head), scored on the report split (test halves minus the 3-per-type tuning split).
Usage: reduced_exp.py normal|fbp|real THREADS"""
import json, sys, time, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from gradad.training.config import preset_config
from gradad.training.model import GRADModel, AnomalyHead
from gradad.training import trainer as T
from gradad.training.validation import ValidationSet, selfcheck, fit_fusion_weight, heldout_auroc
from gradad.evaluation.metrics import auroc, pixel_auroc_aupr, pro_auc
part = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))
C, R = Path("work/cache256"), Path("work/results")
def load(n, s): return np.load(C/f"{n}_{s}_feats.npy"), np.load(C/f"{n}_{s}_masks.npy"), json.loads((C/f"{n}_{s}.json").read_text())
train, val, report, real_x, real_m = [], [], {}, [], []
for ds in ("mtd", "tyre"):
    f, _, _ = load(ds, "train"); v = np.arange(len(f)) % 10 == 5
    train.append(f[~v][::3]); val.append(f[v])
    tf, tm, meta = load(ds, "test"); seen = {}; tid, rid = [], []
    for i, m in enumerate(meta):
        if m["label"] == 1:
            seen[m["defect"]] = seen.get(m["defect"], 0) + 1
            (tid if seen[m["defect"]] <= 3 else rid).append(i)
        else: rid.append(i)
    report[ds] = (tf[rid], tm[rid], np.array([meta[i]["label"] for i in rid]))
    real_x.append(tf[tid]); real_m.append(tm[tid])
X = torch.from_numpy(np.concatenate(train)).float()
cfg = preset_config("edge")
n, c, h, w = X.shape
std = X[::4].transpose(0, 1).reshape(c, -1).std(1)
torch.manual_seed(0)
model = GRADModel(c, (h, w), cfg.model)
gen = torch.Generator()
def run(stage, epochs, real=None):
    gen.manual_seed(T.stage_seed(0, 0 if stage == "abnormal" else 1)); torch.manual_seed(T.stage_seed(0, 0 if stage == "abnormal" else 1))
    params = T.stage_parameters(model, stage, cfg); opt = T.make_optimizer(model, params, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, max(1, int(0.8 * epochs)), 0.1); t0 = time.time()
    for ep in range(epochs):
        T.set_stage_mode(model, stage); L = []
        for idx in T._batches(n, 16, gen):
            if stage == "abnormal":
                r = None
                if real is not None:
                    j = torch.randint(len(real[0]), (4,), generator=gen); r = (real[0][j], real[1][j])
                loss = T.abnormal_step(model, X[idx], cfg, std, gen, r)
            else:
                loss = T.normal_step(model, X[idx])
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 0.1); opt.step(); L.append(loss.item())
        sched.step(); print(part, stage, ep + 1, round(float(np.mean(L)), 4), round(time.time() - t0), flush=True)
if part == "normal":
    run("normal", 20)
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith(T.NORMAL_BRANCH_PREFIXES)}, R/"reduced_normal.pt")
    sys.exit(0)
real = None
if part == "real":
    rx = torch.from_numpy(np.concatenate(real_x)).float()
    rm = (F.adaptive_avg_pool2d(torch.from_numpy(np.concatenate(real_m)).float()[:, None], (h, w)) >= 0.25).float()
    real = (rx, rm)
run("abnormal", 10, real)
while not (R/"reduced_normal.pt").exists():
    time.sleep(10)
time.sleep(5)
model.load_state_dict(torch.load(R/"reduced_normal.pt", weights_only=True), strict=False)
model.eval()
head = AnomalyHead(cfg.model, (256, 256))
vs = ValidationSet.build(torch.from_numpy(np.concatenate(val)), cfg.fbp, std)
wfit, table = fit_fusion_weight(model, vs, head)
check = selfcheck(model, vs)
out = {"part": part, "n_train": n, "fusion_weight": wfit, "fit_table": table, "selfcheck": check, "heldout_auroc": heldout_auroc(check)}
def metrics(lowres, masks, labels):
    s, m = head.postprocess(lowres)
    m = m[:, 0].numpy(); pa, pp = pixel_auroc_aupr(masks, m)
    return {"image_auroc": round(auroc(labels, s.numpy()), 4), "pixel_auroc": round(pa, 4), "pixel_aupr": round(pp, 4),
            "pro": round(pro_auc(masks, m), 4)}
for ds, (fx, fm, lab) in report.items():
    en, d = [], []
    with torch.no_grad():
        for i in range(0, len(fx), 32):
            x = torch.from_numpy(fx[i:i+32]).float(); o = model(x)
            en.append(AnomalyHead.lowres_map(o.x_ref, x)); d.append(F.relu(o.abnormal_score))
    en, d = torch.cat(en), torch.cat(d)
    out[ds] = {"normal_only": metrics(en, fm, lab), "full": metrics(en + wfit * d, fm, lab), "abnormal_alone": metrics(d, fm, lab)}
    print(ds, out[ds], flush=True)
if part == "fbp":
    from gradad.benchmarks.patchcore import PatchCore, PatchCoreConfig, PATCHCORE_HEAD, patch_features
    pc = PatchCore(PatchCoreConfig(), AnomalyHead(PATCHCORE_HEAD, (256, 256))).fit(X)
    for ds, (fx, fm, lab) in report.items():
        x = torch.from_numpy(fx).float(); b = len(x)
        p = patch_features(x, 3); dist = torch.cat([torch.cdist(p[i:i+8192], pc.bank).amin(1) for i in range(0, len(p), 8192)]).view(b, 1, h, w)
        s, m = pc.head.postprocess(dist); m = m[:, 0].numpy(); pa, pp = pixel_auroc_aupr(fm, m)
        out[ds]["patchcore"] = {"image_auroc": round(auroc(lab, s.numpy()), 4), "pixel_auroc": round(pa, 4), "pixel_aupr": round(pp, 4), "pro": round(pro_auc(fm, m), 4)}
        print(ds, "patchcore", out[ds]["patchcore"], flush=True)
(R/f"reduced_{part}.json").write_text(json.dumps(out, indent=1))
