"""Inception Score (Salimans et al. 2016).

    IS = exp( E_x KL( p(y|x) || p(y) ) ),  p(y) = E_x p(y|x)      (Salimans et al. 2016, sec. 4)

computed from classifier logits, in float64 through ``log_softmax``. As in the
original code the samples are cut into ``splits`` equal parts and the mean and
standard deviation of the per-split scores are returned. IS lies in [1, K]:
1 when every prediction is the same, K when predictions are confident and the
K classes are equally frequent.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp

from noisecraft.errors import ConfigError


def inception_score(logits: np.ndarray | torch.Tensor, *, splits: int = 1) -> tuple[float, float]:
    """Mean and standard deviation of IS over ``splits`` parts of ``logits`` (N, K)."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ConfigError(f"logits must be a (N, K) matrix, got shape {z.shape}")
    if splits < 1 or len(z) < splits:
        raise ConfigError(
            f"IS needs at least one sample per split: {len(z)} samples, {splits} splits"
        )
    scores = []
    for part in np.array_split(z, splits):
        logp = log_softmax(part, axis=1)  # log p(y|x)
        log_py = logsumexp(logp, axis=0) - np.log(len(part))  # log p(y), the marginal
        kl = (np.exp(logp) * (logp - log_py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
