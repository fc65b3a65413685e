"""Latent consistency sampling (Luo et al. 2023, Alg. 3; Song et al. 2023, Alg. 1).

A consistency model maps a noisy sample straight to its clean origin. Multistep sampling
alternates that map with re-noising: at each sigma of the grid ``x0 = f(x, sigma)``, then
``x = x0 + sigma_next * z`` with fresh unit noise ``z`` (in the VP view of diffusers'
``LCMScheduler.step``: ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev) z``, the same point scaled
by ``sqrt(abar_prev)``); the last step returns ``x0``.

The boundary scalings. LCM's network is ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)``
(:func:`noisecraft.diffusion.consistency.boundary_scalings`, timestep_scaling 10). This
sampler uses ``f = x0_hat`` (the denoiser's output), i.e. ``c_skip = 0``, ``c_out = 1``, as
AUTOMATIC1111's and k-diffusion's ``sample_lcm`` do: a sampler sees sigmas, not the timesteps
the scalings are defined on, and on LCM's grid they do not matter. The smallest timestep of
the 50-step distillation grid is 19 (c_skip 6.9e-6, 1 - c_out 3.5e-6) and at 4 steps it is 259
(c_skip 3.7e-8, below float32 resolution of 1): the images equal diffusers' to float rounding
(tests/test_diffusers_schedulers.py, max difference asserted <= 1e-4, within the 2/255
promise). Only a grid that reaches timestep 0 would differ (there f(x, 0) = x_VP, the noisy
sample at alphas_cumprod[0] ~ sigma 0.03).

Noise: one tensor per step from ``generator``, the last step included (multiplied by 0), the
project's rule (:mod:`noisecraft.samplers._util`); diffusers draws none at its last step,
which changes no image since nothing is drawn after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from noisecraft.samplers._util import (
    Denoiser,
    bind,
    check_sigmas,
    emit,
    randn_like,
    reject_options,
)


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    **options: Any,
) -> torch.Tensor:
    """Multistep consistency sampling: ``x0 = D(x, sigma_i)``, ``x = x0 + sigma_{i+1} z``."""
    reject_options("lcm", options)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i])
        emit(callback, i, x, sigmas, denoised)
        noise = randn_like(x, generator)
        x = denoised + sig[i + 1] * noise if sig[i + 1] > 0 else denoised
    return x


__all__ = ["sample_lcm"]
