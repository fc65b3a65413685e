"""Improved precision and recall (Kynkäänniemi et al. 2019).

Each set of features is a union of balls: around every vector, a ball whose
radius is the distance to its k-th nearest neighbour in the same set
(k = 3 in the paper). Then

    precision = fraction of generated vectors inside the real manifold   (Kynkäänniemi eq. 1-2)
    recall    = fraction of real vectors inside the generated manifold

A point lies inside a manifold when its distance to some vector is at most
that vector's radius. Distances are computed in float64, in row blocks so a
10k x 10k problem fits in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from noisecraft.errors import ConfigError


def _as_f64(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    return features.detach().cpu().to(torch.float64)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) via |a|^2 + |b|^2 - 2 a.b (BLAS, float64)."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0.0).sqrt_()


def knn_radii(features: np.ndarray | torch.Tensor, k: int = 3, *, block: int = 1024) -> np.ndarray:
    """Distance from each vector to its k-th nearest neighbour in the same set (self excluded)."""
    f = _as_f64(features)
    if len(f) <= k:
        raise ConfigError(f"precision/recall with k={k} needs more than {k} vectors, got {len(f)}")
    out = []
    for rows in f.split(block):
        # k + 1 smallest includes the point itself at distance 0.
        out.append(_distances(rows, f).kthvalue(k + 1, dim=1).values)
    return torch.cat(out).numpy()


def manifold_coverage(
    query: np.ndarray | torch.Tensor,
    support: np.ndarray | torch.Tensor,
    radii: np.ndarray,
    *,
    block: int = 1024,
) -> float:
    """Fraction of ``query`` vectors within ``radii[j]`` of some ``support[j]``."""
    q, s, r = _as_f64(query), _as_f64(support), torch.from_numpy(np.asarray(radii, np.float64))
    inside = [(_distances(rows, s) <= r[None, :]).any(dim=1) for rows in q.split(block)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, *, k: int = 3
) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake`` against ``real`` (Kynkäänniemi 2019)."""
    real_t, fake_t = _as_f64(real), _as_f64(fake)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ConfigError(
            f"precision/recall needs two (N, D) feature sets of the same D, "
            f"got {tuple(real_t.shape)} and {tuple(fake_t.shape)}"
        )
    precision = manifold_coverage(fake_t, real_t, knn_radii(real_t, k))
    recall = manifold_coverage(real_t, fake_t, knn_radii(fake_t, k))
    return precision, recall
