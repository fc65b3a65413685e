"""Fréchet distance between Gaussians fitted to features: FID (Heusel et al. 2017).

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})          (Heusel et al. 2017, eq. 6)

the squared 2-Wasserstein distance between N(mu_1, S_1) and N(mu_2, S_2)
(Dowson & Landau 1982). With Inception pool features this is FID. All maths in
float64; the matrix square root is ``scipy.linalg.sqrtm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from noisecraft.errors import ConfigError


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def save(self, path: str) -> None:
        """Write ``mu``, ``sigma`` and ``n`` to an ``.npz`` file (reusable reference statistics)."""
        np.savez(path, mu=self.mu, sigma=self.sigma, n=self.n)

    @classmethod
    def load(cls, path: str) -> GaussianStats:
        with np.load(path) as f:
            return cls(
                np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64), int(f["n"])
            )


def _as_f64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def feature_stats(features: np.ndarray | torch.Tensor) -> GaussianStats:
    """Fit a Gaussian to ``features`` (N, D): sample mean and unbiased covariance (ddof = 1)."""
    f = _as_f64(features)
    if f.ndim != 2:
        raise ConfigError(f"features must be a (N, D) matrix, got shape {tuple(f.shape)}")
    n, d = f.shape
    if n < 2:
        raise ConfigError(f"a covariance needs at least 2 feature vectors, got {n}")
    return GaussianStats(f.mean(axis=0), np.cov(f, rowvar=False).reshape(d, d), n)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    eps: float = 1e-6,
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. eq. 6).

    ``sqrtm(sigma1 @ sigma2)`` may fail to be finite when the product is near-singular;
    then ``eps * I`` is added to both covariances (as in the TTUR / pytorch-fid code).
    A small imaginary part from rounding is dropped; a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(_as_f64(mu1)), np.atleast_1d(_as_f64(mu2))
    s1, s2 = np.atleast_2d(_as_f64(sigma1)), np.atleast_2d(_as_f64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ConfigError(
            f"feature statistics do not match: mean {mu1.shape} vs {mu2.shape}, "
            f"covariance {s1.shape} vs {s2.shape}; use the same feature extractor for both sets"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ArithmeticError(
                f"sqrtm(S1 S2) has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}; "
                "the covariances are too singular (use more samples)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(
    features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor
) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    a, b = feature_stats(features1), feature_stats(features2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
