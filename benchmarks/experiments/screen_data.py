"""What the issue-11 screen scripts share: the feature cache written by issue11_extract_features.py and the tuning
split (the first 3 defect images of every type; excluded from every reported number) with the held-out goods."""
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

CACHE = Path("work/cache256")
PER_TYPE = 3


def load(name, split):
    """(features (N, C, h, w) memory-mapped, pixel masks, metadata) of one cached split, e.g. load("mtd", "test")."""
    return (np.load(CACHE / f"{name}_{split}_feats.npy", mmap_mode="r"), np.load(CACHE / f"{name}_{split}_masks.npy"),
            json.loads((CACHE / f"{name}_{split}.json").read_text()))


def tuning_ids(meta, per_type=PER_TYPE):
    """Indices of the first ``per_type`` defect images of each defect type."""
    seen, ids = {}, []
    for i, m in enumerate(meta):
        if m["label"] == 1:
            seen[m["defect"]] = seen.get(m["defect"], 0) + 1
            if seen[m["defect"]] <= per_type:
                ids.append(i)
    return ids


class TuningSet(NamedTuple):
    train: np.ndarray  # all cached training features
    val: np.ndarray  # bool mask of the held-out training goods (every 10th image, offset 5)
    x: np.ndarray  # tuning defects, then the held-out goods
    masks: np.ndarray  # their pixel masks (all False for the goods)
    labels: np.ndarray  # 1 = defect
    n_defects: int


def tuning_set(name):
    """The tuning defects of ``name`` followed by its held-out training goods."""
    f, _, _ = load(name, "train")
    v = np.arange(len(f)) % 10 == 5
    tf, tm, meta = load(name, "test")
    tid = tuning_ids(meta)
    x = np.concatenate([tf[tid], f[v]])
    masks = np.concatenate([tm[tid], np.zeros((int(v.sum()),) + tm.shape[1:], tm.dtype)])
    labels = np.r_[np.ones(len(tid)), np.zeros(int(v.sum()))]
    return TuningSet(f, v, x, masks, labels, len(tid))
