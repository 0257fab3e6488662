"""Scratch: extract lite0 features for MTD + tyre splits into work/cache (not committed)."""
import sys, numpy as np, torch, json
from pathlib import Path
from gradad.data.datasets import load_samples
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import preset_config
from gradad.training.features import load_images, to_tensor
torch.set_num_threads(2)
size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
out = Path(f"work/cache{size}"); out.mkdir(parents=True, exist_ok=True)
ext = FeatureExtractor(preset_config("edge").backbone).eval()
roots = {"mtd": "../shared/datasets/mtd", "tyre": "../shared/datasets/mvtec3d"}
for name, root in roots.items():
    for split in ("train", "test"):
        samples = load_samples(root, split)
        if split == "train":
            samples = [s for s in samples if s.label == 0]
        imgs, masks = load_images(samples, size)
        feats = []
        with torch.no_grad():
            for i in range(0, len(samples), 16):
                feats.append(ext(to_tensor(imgs[i:i+16], ext.mean, ext.std)).half().numpy())
        meta = [{"path": str(s.image_path), "label": s.label, "defect": s.defect_type, "cls": s.class_name} for s in samples]
        np.save(out / f"{name}_{split}_feats.npy", np.concatenate(feats))
        np.save(out / f"{name}_{split}_masks.npy", masks)
        (out / f"{name}_{split}.json").write_text(json.dumps(meta))
        print(name, split, len(samples), flush=True)
# tyre validation/good (held-out good images)
from gradad.data.images import read_image_rgb, resize_image
vdir = Path(roots["tyre"]) / "tire/validation/good"
files = sorted(vdir.glob("*.png"))
imgs = np.stack([resize_image(read_image_rgb(f), size) for f in files])
with torch.no_grad():
    f = np.concatenate([ext(to_tensor(imgs[i:i+16], ext.mean, ext.std)).half().numpy() for i in range(0, len(files), 16)])
np.save(out / "tyre_val_feats.npy", f)
print("tyre val", len(files))
