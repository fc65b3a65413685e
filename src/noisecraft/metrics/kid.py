"""Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel (Binkowski et al. 2018).

    k(x, y) = (x . y / d + 1)^3                                       (Binkowski et al. 2018, eq. 3)

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(mn) sum_{i, j} k(x_i, y_j)                         (Gretton et al. 2012, eq. 3)

The estimator is unbiased, so it is ~0 (and may be negative) for two samples
of one distribution. As in Binkowski et al., it is averaged over random subsets
(drawn without replacement within a subset) and the spread over subsets is
reported too. All maths in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from noisecraft.errors import ConfigError


def _as_f64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, *, degree: int = 3, coef0: float = 1.0
) -> np.ndarray:
    """Gram matrix ``(x @ y.T / d + coef0) ** degree`` of (m, d) and (n, d) features."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Unbiased MMD^2 between feature sets x (m, d) and y (n, d) (Gretton et al. 2012, eq. 3)."""
    x, y = _as_f64(x), _as_f64(y)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ConfigError(f"KID needs at least 2 feature vectors per set, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(
    features1: np.ndarray | torch.Tensor,
    features2: np.ndarray | torch.Tensor,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of :func:`mmd2_unbiased` over random subsets.

    Each subset takes ``min(subset_size, n1, n2)`` vectors of each set, without
    replacement, from a ``numpy`` generator seeded with ``seed``.
    """
    f1, f2 = _as_f64(features1), _as_f64(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ConfigError(
            f"KID needs two (N, D) feature sets of the same D, got {f1.shape} and {f2.shape}"
        )
    if num_subsets < 1:
        raise ConfigError(f"kid subsets must be >= 1, got {num_subsets}")
    size = min(subset_size, len(f1), len(f2))
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(
                f1[rng.choice(len(f1), size, replace=False)],
                f2[rng.choice(len(f2), size, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return float(values.mean()), float(values.std())
