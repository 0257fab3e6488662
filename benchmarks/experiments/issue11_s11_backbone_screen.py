"""Screen: PatchCore (1 % coreset, its own head) on the tuning split as a dataset (work/tuneset), with the
EfficientNet-Lite0/1/2 extractors at 256 px. Tuning images only; no test image is read."""
import json, sys, time, numpy as np, torch
from gradad.benchmarks.patchcore import PatchCore, PatchCoreConfig, PATCHCORE_HEAD
from gradad.data.datasets import load_samples_from_roots
from gradad.evaluation.evaluate import evaluate_predictions
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import BackboneConfig
from gradad.training.features import FeatureCache, load_images, to_tensor
from gradad.training.model import AnomalyHead
torch.set_num_threads(2)
name = sys.argv[1]; size = int(sys.argv[2]) if len(sys.argv) > 2 else 256
ext = FeatureExtractor(BackboneConfig(name=name)).eval()
train = [s for s in load_samples_from_roots(["work/tuneset"], "train", None) if s.label == 0]
feats, _ = FeatureCache("cache/features").load_or_compute(ext, train, size, torch.device("cpu"))
t0 = time.perf_counter()
model = PatchCore(PatchCoreConfig(), AnomalyHead(PATCHCORE_HEAD, (size, size))).fit(torch.from_numpy(feats))
test = load_samples_from_roots(["work/tuneset"], "test", None)
images, masks = load_images(test, size)
scores, maps = [], []
with torch.no_grad():
    for i in range(0, len(test), 16):
        s, m = model.predict(ext(to_tensor(images[i:i + 16], ext.mean, ext.std)))
        scores.append(s.numpy()); maps.append(m[:, 0].numpy())
met = evaluate_predictions(test, np.concatenate(scores), np.concatenate(maps), masks)
keys = ("image_auroc", "pixel_auroc", "pixel_aupr", "pro")
out = {c: {k: round(100 * met[c][k], 1) for k in keys if k in met[c]} for c in met}
print(name, size, feats.shape, json.dumps(out))
