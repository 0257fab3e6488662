"""Image preprocessing and the on-disk feature cache of the frozen extractor.

The extractor is frozen, so its features are computed once per (backbone, weights, normalisation, image size,
image files) and stored as float16 .npy; every training epoch then costs only the grid model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from gradad.data.datasets import Sample
from gradad.data.images import load_sample_arrays
from gradad.files import atomic_file
from gradad.training.backbone import FeatureExtractor

log = logging.getLogger(__name__)

#: 2: images shrinking along one axis and growing along the other are anti-aliased along the shrinking one
CACHE_FORMAT_VERSION = 2


def to_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3) -> normalised float32 tensor (N, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def load_images(samples: Sequence[Sample], size: int, desc: str = "reading images") -> tuple[np.ndarray, np.ndarray]:
    """Read and resize every sample: images (N, size, size, 3) uint8 and masks (N, size, size) bool."""
    images = np.empty((len(samples), size, size, 3), np.uint8)
    masks = np.zeros((len(samples), size, size), bool)
    for i, sample in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, disable=len(samples) < 50)):
        images[i], masks[i] = load_sample_arrays(sample, size)
    return images, masks


def cache_key(extractor: FeatureExtractor, image_size: int, samples: Sequence[Sample]) -> str:
    """Hash of everything that changes the features: backbone, weights, normalisation, size, the image files."""
    identity = cache_identity(extractor, image_size, samples)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def cache_identity(extractor: FeatureExtractor, image_size: int, samples: Sequence[Sample]) -> dict[str, Any]:
    """What :func:`cache_key` hashes."""
    files = []
    for s in samples:
        st = s.image_path.stat()
        files.append([str(s.image_path.resolve()), st.st_size, st.st_mtime_ns])
    return {
        "version": CACHE_FORMAT_VERSION,
        "backbone": extractor.spec.name,
        "out_indices": list(extractor.spec.out_indices),
        "weights": extractor.weights_fingerprint,
        # only when set: the keys of caches written before the option stay valid
        **({"exposure": extractor.spec.exposure} if extractor.spec.exposure != "none" else {}),
        # only for a limited gain: the keys of unlimited-gain caches (session 22) stay valid
        **({"exposure_max_gain": extractor.exposure_max_gain} if extractor.exposure_max_gain is not None else {}),
        "mean": list(extractor.mean),
        "std": list(extractor.std),
        "image_size": image_size,
        "files": files,
    }


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    samples: Sequence[Sample],
    image_size: int,
    device: torch.device,
    batch_size: int = 16,
) -> np.ndarray:
    """Run the extractor over ``samples``; returns float16 (N, C, H/8, W/8)."""
    extractor = extractor.to(device)
    chunks = []
    for start in tqdm(range(0, len(samples), batch_size), desc="extracting features", unit="batch"):
        images, _ = load_images(samples[start : start + batch_size], image_size)
        x = to_tensor(images, extractor.mean, extractor.std).to(device)
        chunks.append(extractor(x).to(torch.float16).cpu().numpy())
    # C order, as a cached array loads: the extractor's output may be channels-last, and the memory layout changes
    # the floating-point summation order downstream, so a cold and a warm cache would train different models
    return np.ascontiguousarray(np.concatenate(chunks, axis=0))


class FeatureCache:
    """Directory of ``<key>.npy`` feature arrays with ``<key>.json`` descriptions."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def load_or_compute(
        self,
        extractor: FeatureExtractor,
        samples: Sequence[Sample],
        image_size: int,
        device: torch.device,
    ) -> tuple[np.ndarray, bool]:
        """Return (features, hit). A miss computes the features and writes them atomically."""
        key = cache_key(extractor, image_size, samples)
        path = self.path_for(key)
        if path.is_file():
            try:
                feats = np.load(path, mmap_mode=None)
                if feats.shape[0] == len(samples):
                    log.info("feature cache hit: %s", path)
                    return np.ascontiguousarray(feats), True
            except (OSError, ValueError) as exc:  # truncated or corrupt cache file: recompute
                log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
        log.info("feature cache miss: extracting %d images -> %s", len(samples), path)
        feats = extract_features(extractor, samples, image_size, device)
        meta = {"backbone": extractor.spec.name, "image_size": image_size, "n": len(samples),
                "shape": list(feats.shape), "first_file": str(samples[0].image_path) if samples else None}
        self._store(path, feats, meta)
        return feats, False

    def _store(self, path: Path, feats: np.ndarray, meta: dict) -> None:
        """Write a cache entry; a failed write (full disk, read-only cache folder) is a warning, not the end of
        the run: the features are in memory, only the next run extracts them again. No partial file is left
        (numpy's own "Not enough free space" OSError carries no errno, so it would otherwise be a traceback)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as fh:  # removes its temporary file when the write fails
                np.save(fh, feats)
            path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        except OSError as exc:
            for leftover in (path, path.with_suffix(".json")):
                with contextlib.suppress(OSError):  # a .npy without its .json (or half a .json) helps no one
                    leftover.unlink(missing_ok=True)
            log.warning("could not write the feature cache %s (%s; disk full?): training goes on with the "
                        "features in memory; the next run extracts them again", path, exc.strerror or exc)
