"""Screen (session 22): how an image of another aspect ratio reaches the square model input, with PatchCore (1 %
coreset, its own head) on the tuning split as a dataset (work/tuneset, `tuning_dataset.py`). No test image is read.

MTD's tiles come in aspect ratios 1.0-2.8 (short sides 100-400 px); the product stretches every image to 256 x 256,
so the texture's scale differs by up to 2.8x between the axes and from image to image. Variants:

- ``stretch``: today's rule (each axis resized on its own);
- ``tiles``: the short side to 256 (aspect kept), then ceil(long / 256) evenly spaced 256 x 256 windows along the long
  side; the windows' maps are averaged where they overlap, the image score is the highest window score;
- ``letterbox``: the long side to 256 (aspect kept), the short side reflect-padded to 256; the map is cropped to the
  image and the score pooled on the crop.

Every variant's map is brought back to the stretched 256 x 256 frame, so all are scored against the same masks.

    python benchmarks/experiments/issue11_s22_aspect_screen.py stretch tiles letterbox

A second screen on the same footing normalises each stretched image's exposure (``gain``: mean grey 128) or
exposure and contrast (``standardize``: mean 128, std 40) before the extractor:

    python benchmarks/experiments/issue11_s22_aspect_screen.py gain standardize

Session 24 (a third screen): the gain held to 1/c .. c, so a class far from mid-grey (the tyre, ~0.078) is not
brightened several times over:

    python benchmarks/experiments/issue11_s22_aspect_screen.py gain_cap1.5 gain_cap2 gain_cap3
"""
import json
import math
import sys

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gradad.benchmarks.patchcore import PATCHCORE_HEAD, PatchCore, PatchCoreConfig
from gradad.data.datasets import load_samples_from_roots
from gradad.data.images import read_image_rgb, resize_hw
from gradad.evaluation.evaluate import evaluate_predictions
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import BackboneConfig
from gradad.training.features import load_images, to_tensor
from gradad.training.model import AnomalyHead

SIZE = 256
torch.set_num_threads(2)


def _gain(img: np.ndarray) -> np.ndarray:
    """Exposure normalised: every image scaled to the same mean grey level (128)."""
    x = img.astype(np.float32)
    return np.clip(x * (128.0 / max(float(x.mean()), 1.0)), 0, 255).astype(np.uint8)


def _standardize(img: np.ndarray) -> np.ndarray:
    """Exposure and contrast normalised: every image to mean 128, standard deviation 40 (all channels together)."""
    x = img.astype(np.float32)
    return np.clip((x - x.mean()) / max(float(x.std()), 1.0) * 40.0 + 128.0, 0, 255).astype(np.uint8)


def _capped_gain(limit: float):
    """Session 24: the gain held to 1/limit .. limit (MVTec 3D's tyres are ~0.078 of full grey: `gain` brightens
    them 6.4x, clipping their highlights; a cap leaves a dark class almost as it was and still evens MTD's groups)."""
    def gain(img: np.ndarray) -> np.ndarray:
        x = img.astype(np.float32)
        factor = min(max(128.0 / max(float(x.mean()), 1.0), 1.0 / limit), limit)
        return np.clip(x * factor, 0, 255).astype(np.uint8)
    return gain


#: photometric variants (session 22, second screen): the stretched image, then normalised per image
PHOTOMETRIC = {"gain": _gain, "standardize": _standardize,
               "gain_cap1.5": _capped_gain(1.5), "gain_cap2": _capped_gain(2.0), "gain_cap3": _capped_gain(3.0)}


def windows(img: np.ndarray, variant: str) -> tuple[list[np.ndarray], dict]:
    """The square model inputs of one image and how to put their maps back together."""
    h, w = img.shape[:2]
    if variant == "stretch":
        return [resize_hw(img, SIZE, SIZE)], {"kind": "stretch"}
    if variant in PHOTOMETRIC:
        return [PHOTOMETRIC[variant](resize_hw(img, SIZE, SIZE))], {"kind": "stretch"}
    tall = h > w
    short, long_ = (w, h) if tall else (h, w)
    if variant == "tiles":
        scaled_long = max(SIZE, int(round(long_ * SIZE / short)))
        big = resize_hw(img, scaled_long, SIZE) if tall else resize_hw(img, SIZE, scaled_long)
        n = math.ceil(scaled_long / SIZE)
        offsets = [0] if n == 1 else [round(i * (scaled_long - SIZE) / (n - 1)) for i in range(n)]
        crops = [big[o:o + SIZE] if tall else big[:, o:o + SIZE] for o in offsets]
        return crops, {"kind": "tiles", "tall": tall, "offsets": offsets, "long": scaled_long}
    scaled_short = max(1, int(round(short * SIZE / long_)))
    small = resize_hw(img, SIZE, scaled_short) if tall else resize_hw(img, scaled_short, SIZE)
    pad = SIZE - scaled_short
    before = pad // 2
    border = (0, 0, before, pad - before) if tall else (before, pad - before, 0, 0)
    return [cv2.copyMakeBorder(small, *border, cv2.BORDER_REFLECT_101)], {
        "kind": "letterbox", "tall": tall, "before": before, "short": scaled_short}


def merge(maps: list[torch.Tensor], scores: list[float], how: dict, head: AnomalyHead) -> tuple[float, np.ndarray]:
    """Window maps (1, 1, S, S) -> (image score, map in the stretched S x S frame)."""
    if how["kind"] == "stretch":
        return scores[0], maps[0][0, 0].numpy()
    if how["kind"] == "tiles":
        shape = (how["long"], SIZE) if how["tall"] else (SIZE, how["long"])
        total, count = torch.zeros(shape), torch.zeros(shape)
        for m, o in zip(maps, how["offsets"]):
            sl = (slice(o, o + SIZE), slice(None)) if how["tall"] else (slice(None), slice(o, o + SIZE))
            total[sl] += m[0, 0]
            count[sl] += 1
        full = (total / count)[None, None]
        score = max(scores)
    else:
        b, s = how["before"], how["short"]
        full = maps[0][:, :, b:b + s] if how["tall"] else maps[0][:, :, :, b:b + s]
        pool = min(head.score_pool, *full.shape[-2:])
        score = float(F.avg_pool2d(full, pool, stride=1).amax())
    return score, F.interpolate(full, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()


def features_of(ext: FeatureExtractor, crops: list[np.ndarray]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), 16):
            out.append(ext(to_tensor(np.stack(crops[i:i + 16]), ext.mean, ext.std)))
    return torch.cat(out)


def screen(variant: str, ext: FeatureExtractor) -> dict:
    train = [s for s in load_samples_from_roots(["work/tuneset"], "train", None) if s.label == 0]
    test = load_samples_from_roots(["work/tuneset"], "test", None)
    results = {}
    for cls in sorted({s.class_name for s in test}):
        crops = [c for s in train if s.class_name == cls for c in windows(read_image_rgb(s.image_path), variant)[0]]
        head = AnomalyHead(PATCHCORE_HEAD, (SIZE, SIZE))
        model = PatchCore(PatchCoreConfig(), head).fit(features_of(ext, crops))
        cls_test = [s for s in test if s.class_name == cls]
        _, masks = load_images(cls_test, SIZE)  # masks in the stretched frame, as grad-bench scores them
        scores, maps = [], []
        for s in cls_test:
            wins, how = windows(read_image_rgb(s.image_path), variant)
            sc, mp = model.predict(features_of(ext, wins))
            score, amap = merge(list(mp.split(1)), sc.tolist(), how, head)
            scores.append(score)
            maps.append(amap)
        met = evaluate_predictions(cls_test, np.array(scores), np.stack(maps), masks)
        results[cls] = {k: round(100 * met[cls][k], 1) for k in ("image_auroc", "pixel_auroc", "pixel_aupr", "pro")}
        results[cls]["windows_per_image"] = round(len(crops) / sum(s.class_name == cls for s in train), 2)
    return results


if __name__ == "__main__":
    extractor = FeatureExtractor(BackboneConfig()).eval()
    for v in sys.argv[1:]:
        print(v, json.dumps(screen(v, extractor)), flush=True)
