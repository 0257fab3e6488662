"""Image-level Gaussian of the extractor's pooled features, added to the map's image score.

GRAD's map is local: a cell is scored by how well the grids reconstruct it. Image-level detection also gains from
the global statistics of an image (Rippel et al., "Modeling the distribution of normal data in pre-trained deep
features", 2020): per class, a Gaussian over the per-channel means and standard deviations of the features (the
means alone with ``model.image_gaussian_stats = "mean"``), with
Ledoit-Wolf shrinkage (fewer good images than dimensions is the normal case). Conceptually the image score is the
sum of two z-scores,

    z = (map score - map_center) / map_scale + (Mahalanobis distance - gauss_center) / gauss_scale,

normalised on held-out good images of the class whose Gaussian is nearest (a unified model is not told the class at
run time). The runtime's thresholds and normalised score assume a finite score >= 0 in the map's units, so the
bundle outputs ``map_center + map_scale * z`` clamped at 0:

    score = max(0, map score + map_scale * (distance - gauss_center) / gauss_scale)

which ranks the images of a class exactly as z does (the clamp only touches images far below any threshold). An
image can therefore be flagged by the Gaussian alone, with no map region above the pixel threshold (a change spread
over the whole image). The map is unchanged; the module holds no weights that training learns, only statistics
fitted after stage 3, and runs in the exported graph (kept FP32: the whitening amplifies reduced-precision error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

#: fewer held-out good images of a class than this and both parts are normalised on its training images too
MIN_REFERENCE_IMAGES = 8
#: fewer training images of a class than this and no Gaussian can be fitted (checked before training starts)
MIN_TRAIN_IMAGES = 4
#: folds of the cross-fitted distances of the fallback normalisation (each image scored by a fit without it:
#: in-sample distances are far smaller than a new good image's when images are few for the dimensions)
FOLDS = 5
#: smallest eigenvalue of a covariance, as a fraction of the mean one: with few images Ledoit-Wolf may leave the
#: covariance singular (2 images: shrinkage 0), and the whitening must stay finite
EIGEN_FLOOR = 1e-3


def require_training_images(train_classes: list[str]) -> None:
    """Raise ValueError naming every class with fewer than :data:`MIN_TRAIN_IMAGES` training images."""
    counts = {c: train_classes.count(c) for c in sorted(set(train_classes))}
    few = {c: n for c, n in counts.items() if n < MIN_TRAIN_IMAGES}
    if few:
        listed = ", ".join(f"{c} ({n})" for c, n in few.items())
        raise ValueError(f"model.image_gaussian needs at least {MIN_TRAIN_IMAGES} training images per class (after "
                         f"the validation hold-out); too few: {listed}. Add good images or "
                         "--set model.image_gaussian=false")


def statistics_dims(channels: int, stats: str) -> int:
    """Dimensions of :func:`pooled_statistics` of features with ``channels`` channels."""
    return channels * (2 if stats == "mean_std" else 1)


def pooled_statistics(x: torch.Tensor, stats: str = "mean_std") -> torch.Tensor:
    """(B, C, H, W) features -> per-channel spatial means (B, C) (``stats="mean"``) or means and (population)
    standard deviations (B, 2C) (``"mean_std"``)."""
    mean = x.mean(dim=(2, 3))
    if stats == "mean":
        return mean
    std = (x - mean[:, :, None, None]).pow(2).mean(dim=(2, 3)).clamp_min(1e-12).sqrt()
    return torch.cat([mean, std], dim=1)


def ledoit_wolf(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean (D,), shrunk covariance (D, D), shrinkage) of samples f (N, D), Ledoit & Wolf's (2004) estimate."""
    f = f.double()
    n, d = f.shape
    mean = f.mean(0)
    centred = f - mean
    cov = centred.T @ centred / n
    mu = cov.diagonal().mean()
    eye = torch.eye(d, dtype=f.dtype, device=f.device)
    target_dist = (cov - mu * eye).pow(2).sum()
    # mean squared distance of the one-sample covariances from cov, in chunks (N x D x D at once is too big)
    spread = sum((torch.einsum("ni,nj->nij", c, c) - cov).pow(2).sum() for c in centred.split(64)) / n**2
    shrink = float(min(spread, target_dist) / target_dist) if target_dist > 0 else 1.0
    return mean, (1 - shrink) * cov + shrink * mu * eye, shrink


def whitening(cov: torch.Tensor) -> torch.Tensor:
    """cov^(-1/2) (symmetric), so ||W (f - mean)|| is the Mahalanobis distance."""
    values, vectors = torch.linalg.eigh(cov.double())
    scale = float(values.clamp_min(0).mean())
    floor = EIGEN_FLOOR * scale if scale > 0 else 1.0  # identical images: unit whitening
    return vectors @ torch.diag(values.clamp_min(floor).rsqrt()) @ vectors.T


def mahalanobis(f: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """Distances (N,) of samples f (N, D) from one Gaussian."""
    return ((f.double() - mean.double()) @ whiten.double().T).norm(dim=1)


def cross_fitted_distances(f: torch.Tensor, folds: int = FOLDS) -> torch.Tensor:
    """Distance of every sample from a Gaussian fitted without its fold."""
    n = len(f)
    folds = max(2, min(folds, n // 2))
    out = torch.empty(n, dtype=torch.float64)
    for k in range(folds):
        held = torch.arange(k, n, folds)
        kept = torch.tensor([i for i in range(n) if i % folds != k])
        mean, cov, _ = ledoit_wolf(f[kept])
        out[held] = mahalanobis(f[held], mean, whitening(cov))
    return out


class ImageGaussian(nn.Module):
    """Per-class Gaussians of pooled features and the normalisation of the Gaussian part (buffers; until they are
    fitted the map score passes through unchanged)."""

    def __init__(self, stats: str = "mean_std") -> None:
        super().__init__()
        self.stats = stats  # what the Gaussians model (ModelConfig.image_gaussian_stats)
        for name, shape in (("mean", (0, 0)), ("whiten", (0, 0, 0)), ("gauss_center", (0,)), ("gauss_scale", (0,)),
                            ("map_scale", (0,))):
            self.register_buffer(name, torch.zeros(shape))
        self.n_classes = 0

    def dims(self, channels: int) -> int:
        """Dimensions of the Gaussians of features with ``channels`` channels."""
        return statistics_dims(channels, self.stats)

    @property
    def fitted(self) -> bool:
        # a plain attribute, not the buffer's shape: tracing the exported graph must not read a tensor as a bool
        return self.n_classes > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The number of classes and feature dimensions come from the file; a file written before this module
        # (or a run not yet fitted) has none of its keys and loads unfitted.
        present = {name: state_dict[prefix + name] for name, _ in self.named_buffers() if prefix + name in state_dict}
        if not present:
            return
        for name, value in present.items():
            setattr(self, name, torch.empty_like(value, dtype=getattr(self, name).dtype, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.n_classes = int(self.mean.shape[0])

    def forward(self, x: torch.Tensor, map_score: torch.Tensor) -> torch.Tensor:
        """Features x (B, C, H, W) and the map's image score (B,) -> the image score (B,)."""
        if not self.fitted:
            return map_score
        f = pooled_statistics(x, self.stats)  # (B, D)
        z = f[:, None, None, :] - self.mean[None, :, None, :]  # (B, K, 1, D)
        dist = torch.matmul(z, self.whiten.transpose(1, 2)).squeeze(2).pow(2).sum(-1).sqrt()  # (B, K)
        combined = map_score[:, None] + self.map_scale * (dist - self.gauss_center) / self.gauss_scale  # (B, K)
        nearest = dist.argmin(dim=1, keepdim=True)
        return torch.relu(combined.gather(1, nearest).squeeze(1))

    def set_statistics(self, stats: "GaussianStatistics") -> None:
        """Install fitted statistics (float32 buffers on this module's device)."""
        device = self.mean.device
        for name in ("mean", "whiten", "gauss_center", "gauss_scale", "map_scale"):
            setattr(self, name, getattr(stats, name).float().to(device))
        self.n_classes = len(stats.classes)


@dataclass
class GaussianStatistics:
    """What :func:`fit_image_gaussian` measured, one row per class (classes in sorted order)."""

    classes: list[str]
    mean: torch.Tensor
    whiten: torch.Tensor
    gauss_center: torch.Tensor
    gauss_scale: torch.Tensor
    map_center: torch.Tensor  # for the record: the score is in map units, so only map_scale enters it
    map_scale: torch.Tensor
    shrinkage: list[float]
    reference: list[str]  # the good images that normalised both parts, per class

    def summary(self) -> dict[str, dict[str, float | str]]:
        """Per class: shrinkage, both normalisations and their reference, for the log and the model file."""
        return {c: {"shrinkage": round(self.shrinkage[i], 4), "gauss_center": round(float(self.gauss_center[i]), 4),
                    "gauss_scale": round(float(self.gauss_scale[i]), 4), "map_center": round(float(self.map_center[i]), 4),
                    "map_scale": round(float(self.map_scale[i]), 4), "reference": self.reference[i]}
                for i, c in enumerate(self.classes)}


def placeholder_statistics(dims: int, classes: int = 2) -> GaussianStatistics:
    """Statistics of the right shapes (unit Gaussians) for size and speed measurements of random-weight models,
    whose cost must include the Gaussian's ops; never a fit of data."""
    names = [f"class{i}" for i in range(classes)]
    ones = torch.ones(classes, dtype=torch.float64)
    return GaussianStatistics(names, torch.zeros(classes, dims, dtype=torch.float64),
                              torch.eye(dims, dtype=torch.float64).expand(classes, dims, dims).clone(),
                              ones.clone(), ones.clone(), ones.clone(), ones.clone(), [0.0] * classes,
                              ["placeholder"] * classes)


def fit_image_gaussian(train_features: torch.Tensor, train_classes: list[str], val_features: torch.Tensor,
                       val_classes: list[str], map_scores, stats: str = "mean_std",
                       batch_size: int = 64) -> GaussianStatistics:
    """Fit the per-class Gaussians on the training images and both normalisations on held-out good images.

    ``map_scores(features) -> (B,)`` is the map's image score of the finished model; ``stats`` what the Gaussians
    model (:func:`pooled_statistics`). Per class, both parts are
    normalised on the class's validation images (held out of training, though they chose the stage epochs and the
    fusion weight) when there are at least :data:`MIN_REFERENCE_IMAGES` of them; else on all of its good images —
    Gaussian distances cross-fitted, map scores of images the map trained on — with a warning.
    """
    require_training_images(train_classes)
    classes = sorted(set(train_classes) | set(val_classes))
    rows: dict[str, list] = {k: [] for k in ("mean", "whiten", "gc", "gs", "mc", "ms", "shrink", "ref")}
    for c in classes:
        tr = [i for i, k in enumerate(train_classes) if k == c]
        va = [i for i, k in enumerate(val_classes) if k == c]
        p_tr, p_va = _pooled(train_features, tr, stats, batch_size), _pooled(val_features, va, stats, batch_size)
        mean, cov, shrink = ledoit_wolf(p_tr)
        whiten = whitening(cov)
        if len(va) >= MIN_REFERENCE_IMAGES:
            ref_gauss = mahalanobis(p_va, mean, whiten)
            ref_map = _map_scores(map_scores, val_features, va, batch_size)
            where = f"{len(va)} validation images"
        else:
            ref_gauss = torch.cat([cross_fitted_distances(p_tr), mahalanobis(p_va, mean, whiten)])
            ref_map = torch.cat([_map_scores(map_scores, train_features, tr, batch_size),
                                 _map_scores(map_scores, val_features, va, batch_size)])
            where = f"{len(ref_map)} good images incl. training ones"
            log.warning("image Gaussian: class %s has %d validation image(s) (< %d); its score parts are normalised "
                        "on its training images too (map scores biased low)", c, len(va), MIN_REFERENCE_IMAGES)
        values = {"mean": mean, "whiten": whiten, "gc": ref_gauss.mean(), "gs": ref_gauss.std().clamp_min(1e-6),
                  "mc": ref_map.mean(), "ms": ref_map.std().clamp_min(1e-6), "shrink": shrink, "ref": where}
        if not all(bool(torch.isfinite(torch.as_tensor(values[k])).all()) for k in ("mean", "whiten", "gc", "gs", "mc", "ms")):
            raise ValueError(f"image Gaussian of class {c!r}: non-finite statistics (features or map scores hold "
                             "NaN/inf); --set model.image_gaussian=false scores by the map alone")
        for key, value in values.items():
            rows[key].append(value)
    return GaussianStatistics(classes, torch.stack(rows["mean"]), torch.stack(rows["whiten"]),
                              torch.stack(rows["gc"]), torch.stack(rows["gs"]), torch.stack(rows["mc"]),
                              torch.stack(rows["ms"]), rows["shrink"], rows["ref"])


def _pooled(features: torch.Tensor, idx: list[int], stats: str, batch_size: int) -> torch.Tensor:
    """Pooled statistics (N, D) of ``features[idx]``, a batch at a time (a class's FP32 copy can be gigabytes)."""
    dims = statistics_dims(features.shape[1], stats)
    return _batched(lambda f: pooled_statistics(f, stats), features, idx, batch_size, (0, dims))


def _map_scores(map_scores, features: torch.Tensor, idx: list[int], batch_size: int) -> torch.Tensor:
    """The finished model's map scores (N,) of ``features[idx]``."""
    return _batched(map_scores, features, idx, batch_size, (0,))


def _batched(fn, features: torch.Tensor, idx: list[int], batch_size: int, empty: tuple[int, ...]) -> torch.Tensor:
    """float64 CPU ``fn(features[idx])`` computed batch by batch on float32 copies (``empty``: shape for no idx)."""
    if not idx:
        return torch.zeros(empty, dtype=torch.float64)
    with torch.no_grad():
        return torch.cat([fn(features[torch.tensor(idx[i:i + batch_size])].float()).double().cpu()
                          for i in range(0, len(idx), batch_size)])
