# Session 9 (work/s9/deep_screen.py when it ran); writes work/s9/*.npz read by the other issue11_s9_* scripts.
"""Session 9 screen: pooled statistics of shallow (the extractor's 152 ch) and deep lite0 stages for the image Gaussian,
on validation data only: train goods (fit), held-out goods (every 10th, the trainer's split), tuning split defects
(runs/split, excluded from every report), tyre validation/good. Map score from runs/unified_s8 with the Gaussian bypassed."""
import json, sys, numpy as np, torch
from pathlib import Path
from gradad.data.datasets import load_samples
from gradad.data.images import read_image_rgb, resize_image
from gradad.training.checkpoint import load_detector
from gradad.training.image_gaussian import pooled_statistics
from gradad.training.validation import validation_indices
torch.set_num_threads(2)
O = Path("work/s9"); O.mkdir(exist_ok=True, parents=True)
det, meta = load_detector("runs/unified_s8/model.pt"); det.eval()
clf = det.extractor
@torch.no_grad()
def run(paths):
    out = {k: [] for k in ("base", "s4", "s5", "s6", "map")}
    from timm import create_model
    for i in range(0, len(paths), 16):
        imgs = np.stack([resize_image(read_image_rgb(Path(p)), 256) for p in paths[i:i+16]])
        x = (torch.from_numpy(imgs).permute(0,3,1,2).float()/255 - torch.tensor(clf.mean).view(1,3,1,1))/torch.tensor(clf.std).view(1,3,1,1)
        f = clf(x)
        out["base"].append(pooled_statistics(f))
        m = det.head.postprocess(det.model.lowres_map(det.model(f), f))[0]
        out["map"].append(m)
        y = full.bn1(full.conv_stem(x))
        for bi, b in enumerate(full.blocks):
            y = b(y)
            if bi in (4, 5, 6): out[f"s{bi}"].append(pooled_statistics(y))
        print(i, len(paths), flush=True, file=sys.stderr)
    return {k: torch.cat(v).numpy() for k, v in out.items()}
from gradad.training.backbone import load_imagenet_classifier
full = load_imagenet_classifier("tf_efficientnet_lite0", "packaged").eval()
split = json.load(open("runs/split/split.json"))["held_out"]
for name, root in (("mtd", "../shared/datasets/mtd"), ("tyre", "../shared/datasets/mvtec3d")):
    s = [x for x in load_samples(root, "train") if x.label == 0]
    v = set(validation_indices(s, 0.1).tolist())
    paths = [str(x.image_path) for x in s]
    r = run(paths); np.savez(O/f"{name}_train.npz", val=np.array([i in v for i in range(len(s))]), **r)
    pos = [p for p in split if ("/mtd/" in p) == (name == "mtd")]
    r = run(pos); np.savez(O/f"{name}_tune.npz", **r)
vg = sorted(str(p) for p in Path("../shared/datasets/mvtec3d/tire/validation/good").glob("*.png"))
np.savez(O/"tyre_valgood.npz", **run(vg))
print("done")
