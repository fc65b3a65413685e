"""The forward process q: marginals q(x_t | x0) and posteriors q(x_{t-1} | x_t, x0).

``t`` is a LongTensor (B,) of 0-based timestep indices. Schedule values are gathered in
float64, then cast to the data's dtype and broadcast to its shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noisecraft.diffusion.schedule import NoiseSchedule


def extract(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` cast to ``like``'s dtype, shaped (B, 1, ..., 1) to broadcast against it."""
    out = values.to(t.device)[t.long()].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Sample x_t ~ q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    abar = schedule.alphas_cumprod
    return extract(abar.sqrt(), t, x0) * x0 + extract((1.0 - abar).sqrt(), t, x0) * noise


def q_mean_variance(
    schedule: NoiseSchedule, x0: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance, log variance of q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), DDPM eq. 4.

    All three have ``x0``'s shape.
    """
    abar = schedule.alphas_cumprod
    mean = extract(abar.sqrt(), t, x0) * x0
    var = extract(1.0 - abar, t, x0).expand_as(x0)
    log_var = extract((1.0 - abar).log(), t, x0).expand_as(x0)
    return mean, var, log_var


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0) (DDPM eq. 6-7).

    mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
            + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t. The log variance at t = 0 (where
    beta~_0 = 0) is log beta~_1, as in improved-diffusion. All three have ``x_t``'s shape.
    """
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    var = extract(schedule.posterior_variance, t, x_t).expand_as(x_t)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    return mean, var, log_var


def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise of ``x``'s shape, drawn on the generator's device, moved to ``x``'s."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(
        x.device
    )
