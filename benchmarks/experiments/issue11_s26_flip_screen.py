"""Screen (session 26): flipped good images as more normal data, with PatchCore (1 % coreset per class, its own
head) on the tuning split as a dataset (work/tuneset, `tuning_dataset.py`); extractor with the headline's exposure
rule (`backbone.exposure=gain`). No test image is read.

    python benchmarks/experiments/issue11_s26_flip_screen.py none flips

``none``: each class's memory bank from its train goods (today); ``flips``: MTD's bank also from the horizontal and
vertical flips of its train goods (the tyre's pose is fixed: its bank is unchanged). Decision rule:
work/s26/rule.md, rule 2 (quoted in the experiments README, session 26).
"""
import json
import sys

import numpy as np
import torch

from gradad.benchmarks.patchcore import PATCHCORE_HEAD, PatchCore, PatchCoreConfig
from gradad.data.datasets import load_samples_from_roots
from gradad.evaluation.evaluate import evaluate_predictions
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import BackboneConfig
from gradad.training.features import load_images, to_tensor
from gradad.training.model import AnomalyHead

SIZE = 256
FLIPPED_CLASSES = {"magnetic_tile"}
torch.set_num_threads(2)


def features_of(ext: FeatureExtractor, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([ext(to_tensor(images[i:i + 16], ext.mean, ext.std)) for i in range(0, len(images), 16)])


def screen(variant: str, ext: FeatureExtractor) -> dict:
    train = [s for s in load_samples_from_roots(["work/tuneset"], "train", None) if s.label == 0]
    test = load_samples_from_roots(["work/tuneset"], "test", None)
    results = {}
    for cls in sorted({s.class_name for s in test}):
        images, _ = load_images([s for s in train if s.class_name == cls], SIZE)
        if variant == "flips" and cls in FLIPPED_CLASSES:
            images = np.concatenate([images, images[:, :, ::-1], images[:, ::-1]])
        model = PatchCore(PatchCoreConfig(), AnomalyHead(PATCHCORE_HEAD, (SIZE, SIZE))).fit(
            features_of(ext, np.ascontiguousarray(images)))
        cls_test = [s for s in test if s.class_name == cls]
        test_images, masks = load_images(cls_test, SIZE)
        scores, maps = [], []
        with torch.no_grad():
            for i in range(0, len(cls_test), 16):
                sc, mp = model.predict(features_of(ext, test_images[i:i + 16]))
                scores.append(sc.numpy())
                maps.append(mp[:, 0].numpy())
        met = evaluate_predictions(cls_test, np.concatenate(scores), np.concatenate(maps), masks)
        results[cls] = {k: round(100 * met[cls][k], 1) for k in ("image_auroc", "pixel_auroc", "pixel_aupr", "pro")}
        results[cls]["bank_images"] = len(images)
    return results


if __name__ == "__main__":
    extractor = FeatureExtractor(BackboneConfig(exposure="gain")).eval()
    for v in sys.argv[1:]:
        print(v, json.dumps(screen(v, extractor)), flush=True)
