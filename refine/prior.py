"""Equal-weight Gaussian-mixture pixel prior P_MOG, fitted by EM on training pixels (numpy; torch-free).

Fitted once per model by ``grad-refine prepare`` and stored beside the bundle as ``pixel_prior.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradad.errors import GradError
from gradad.files import atomic_file, check_zip_expansion
from gradad.refine.config import PRIOR_MAX_COMPONENTS

PRIOR_FILE = "pixel_prior.npz"

#: Largest pixel prior :meth:`PixelPrior.load` inflates. A prior costs 96 bytes per component (a float64 mean and
#: 3x3 covariance) plus ~1 KB of headers: the default 5 components are 1.3 KB. A bundle's prior is someone else's
#: file: without a cap, a few MB of deflated zeros inflate to GBs in ``np.load``; the component count has its own
#: cap (PRIOR_MAX_COMPONENTS) checked after loading, as 64 MiB of stored floats still hold ~700 000 components.
PRIOR_MAX_BYTES = 64 * 2**20
#: Largest expansion of one member: :meth:`PixelPrior.save` stores members uncompressed (1:1); float64 statistics
#: compressed by another writer shrink by well under 2:1, only runs of zeros (a bomb) reach ~1000:1.
PRIOR_MAX_RATIO = 100.0


@dataclass(frozen=True)
class PixelPrior:
    """K Gaussians with equal weights over normalised RGB pixels."""

    means: np.ndarray  # (K, 3) float64
    covariances: np.ndarray  # (K, 3, 3) float64
    mean_log_likelihood: float  # per training pixel, at the final EM step

    @property
    def precisions(self) -> np.ndarray:
        """(K, 3, 3) inverse covariances."""
        return np.linalg.inv(self.covariances)

    def min_mahalanobis_sq(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3) -> (N,) minimum over components of the squared Mahalanobis distance."""
        diff = pixels[:, None, :] - self.means[None]  # (N, K, 3)
        d = np.einsum("nki,kij,nkj->nk", diff, self.precisions, diff)
        return d.min(axis=1)

    def save(self, path: str | Path) -> None:
        """Write ``path`` (npz) atomically."""
        with atomic_file(path) as fh:
            np.savez(fh, means=self.means, covariances=self.covariances,
                     mean_log_likelihood=np.float64(self.mean_log_likelihood))

    @classmethod
    def load(cls, path: str | Path, max_bytes: int = PRIOR_MAX_BYTES) -> "PixelPrior":
        """Read a prior written by :meth:`save`, with a clear error naming the file; one whose arrays would
        inflate beyond ``max_bytes`` (or a member beyond :data:`PRIOR_MAX_RATIO` times its compressed size) is
        refused before anything is decompressed."""
        path = Path(path)
        check_zip_expansion(path, "pixel prior", max_bytes=max_bytes, max_ratio=PRIOR_MAX_RATIO)
        try:
            with np.load(path, allow_pickle=False) as data:
                prior = cls(np.asarray(data["means"], np.float64), np.asarray(data["covariances"], np.float64),
                            float(data["mean_log_likelihood"]))
        except FileNotFoundError as exc:
            raise GradError(f"pixel prior not found: {path} (run grad-refine prepare)") from exc
        except Exception as exc:
            raise GradError(f"cannot read pixel prior {path}: {exc}") from exc
        if prior.means.ndim != 2 or prior.means.shape[1] != 3 or prior.covariances.shape != (len(prior.means), 3, 3):
            raise GradError(f"pixel prior {path} has shapes {prior.means.shape} / {prior.covariances.shape}, "
                            "expected (K, 3) / (K, 3, 3)")
        if not 1 <= len(prior.means) <= PRIOR_MAX_COMPONENTS:
            raise GradError(f"pixel prior {path} has {len(prior.means)} components: between 1 and "
                            f"{PRIOR_MAX_COMPONENTS} are accepted (grad-refine prepare fits 5); prepare the bundle "
                            "again")
        return prior


def _log_gaussians(pixels: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """(N, K) log N(pixel | mean_k, cov_k)."""
    dim = pixels.shape[1]
    chol = np.linalg.cholesky(covs)  # (K, d, d)
    out = np.empty((len(pixels), len(means)))
    for k in range(len(means)):
        z = np.linalg.solve(chol[k], (pixels - means[k]).T)  # (d, N)
        log_det = 2.0 * np.log(np.diag(chol[k])).sum()
        out[:, k] = -0.5 * ((z**2).sum(axis=0) + log_det + dim * np.log(2 * np.pi))
    return out


def fit_pixel_prior(pixels: np.ndarray, components: int, iterations: int = 50, covariance_floor: float = 1e-4,
                    seed: int = 0, tol: float = 1e-6) -> PixelPrior:
    """EM for a K-component Gaussian mixture whose weights are fixed at 1/K (the paper's equal-weight prior).

    Initialised with k-means++ seeding; ``covariance_floor`` is added to every covariance diagonal so a component
    on a flat colour stays invertible.
    """
    pixels = np.asarray(pixels, np.float64).reshape(-1, 3)
    if len(pixels) < components * 10:
        raise GradError(f"pixel prior: {len(pixels)} pixels are too few for {components} components")
    rng = np.random.default_rng(seed)
    means = [pixels[rng.integers(len(pixels))]]
    for _ in range(1, components):  # k-means++ seeding
        d2 = np.min([((pixels - m) ** 2).sum(axis=1) for m in means], axis=0)
        means.append(pixels[rng.choice(len(pixels), p=d2 / d2.sum())] if d2.sum() > 0 else pixels[rng.integers(len(pixels))])
    means = np.stack(means)
    floor = covariance_floor * np.eye(3)
    covs = np.repeat((np.cov(pixels.T) + floor)[None], components, axis=0)
    previous = -np.inf
    mean_ll = previous
    for _ in range(iterations):
        log_p = _log_gaussians(pixels, means, covs) - np.log(components)  # equal weights
        log_norm = np.logaddexp.reduce(log_p, axis=1)
        resp = np.exp(log_p - log_norm[:, None])  # (N, K)
        mean_ll = float(log_norm.mean())
        weight = resp.sum(axis=0) + 1e-12
        means = (resp.T @ pixels) / weight[:, None]
        for k in range(components):
            diff = pixels - means[k]
            covs[k] = (resp[:, k, None] * diff).T @ diff / weight[k] + floor
        if mean_ll - previous < tol:
            break
        previous = mean_ll
    return PixelPrior(means, covs, mean_ll)
