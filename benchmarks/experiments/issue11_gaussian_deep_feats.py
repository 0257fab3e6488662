"""Session 7 (work/s7/deep_feats.py when it ran): pooled statistics of every lite0 stage (strides 8,16,32 + conv_head) for the screen; cached per split."""
import json, sys, numpy as np, torch, timm
from pathlib import Path
from gradad.data.images import read_image_rgb, resize_image
from gradad.training.backbone import load_imagenet_classifier
torch.set_num_threads(2)
C = Path("work/cache256"); O = Path("work/s7"); O.mkdir(exist_ok=True)
clf = load_imagenet_classifier("tf_efficientnet_lite0", "packaged").eval()
mean = torch.tensor(clf.pretrained_cfg["mean"]).view(1,3,1,1); std = torch.tensor(clf.pretrained_cfg["std"]).view(1,3,1,1)
def stats(x): m = x.mean((2,3)); return torch.cat([m, (x - m[:,:,None,None]).pow(2).mean((2,3)).clamp_min(1e-12).sqrt()], 1)
@torch.no_grad()
def run(paths):
    outs = {k: [] for k in ("s4", "s5", "s6", "head")}
    for i in range(0, len(paths), 16):
        imgs = np.stack([resize_image(read_image_rgb(Path(p)), 256) for p in paths[i:i+16]])
        x = (torch.from_numpy(imgs).permute(0,3,1,2).float()/255 - mean)/std
        x = clf.bn1(clf.conv_stem(x))
        for bi, b in enumerate(clf.blocks):
            x = b(x)
            if bi == 4: outs["s4"].append(stats(x))   # 112 ch stride 16
            if bi == 5: outs["s5"].append(stats(x))   # 192 ch stride 32
            if bi == 6: outs["s6"].append(stats(x))   # 320 ch stride 32
        outs["head"].append(stats(clf.bn2(clf.conv_head(x))))
        print(i, len(paths), flush=True, file=sys.stderr)
    return {k: torch.cat(v).numpy() for k, v in outs.items()}
splits = {"mtd_train": json.loads((C/"mtd_train.json").read_text()), "mtd_test": json.loads((C/"mtd_test.json").read_text()),
          "tyre_train": json.loads((C/"tyre_train.json").read_text()), "tyre_test": json.loads((C/"tyre_test.json").read_text())}
paths = {k: [m["path"] for m in v] for k, v in splits.items()}
paths["tyre_val"] = sorted(str(p) for p in Path("../shared/datasets/mvtec3d/tire/validation/good").glob("*.png"))
for k, p in paths.items():
    r = run(p); np.savez(O/f"deep_{k}.npz", **r); print(k, {a: b.shape for a, b in r.items()}, flush=True)
