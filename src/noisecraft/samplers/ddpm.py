"""DDPM ancestral sampling and DDIM, written in the VP parametrisation and converted to VE.

With ``x_VE = x0 + sigma * eps`` and ``alpha_bar = 1 / (1 + sigma^2)`` the VP sample is
``x_VP = sqrt(alpha_bar) * x_VE``, so every VP update below is wrapped as
``x_VP = x / sqrt(1 + sigma^2)`` -> update -> ``x_next = x_VP' * sqrt(1 + sigma_next^2)``.

diffusers' DDIM / DDPM / PNDM with ``set_alpha_to_one=True`` end at alpha_bar = 1, i.e. at
sigma = 0 like every grid here, and then agree with these samplers to float32 rounding
(tests/test_sampler_parity.py). With ``set_alpha_to_one=False`` (Stable Diffusion's config)
diffusers' last step lands on alpha_bar[0] (sigma ~ 0.03 for SD) and returns that slightly
noisy x_VP; a grid ending in 0 cannot express that final step, so ``sample_ddim`` takes it
as an option, ``final_sigma`` (set by the diffusers preset,
:mod:`noisecraft.pipelines.diffusers_schedulers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from noisecraft.errors import ConfigError
from noisecraft.samplers._util import (
    Denoiser,
    bind,
    check_eta,
    check_sigmas,
    emit,
    randn_like,
    reject_options,
)


def _abar(sigma: float) -> float:
    """alpha_bar = 1 / (1 + sigma^2), the VP signal level of VE noise level sigma."""
    return 1.0 / (1.0 + sigma * sigma)


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    **options: Any,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x0_hat).

    Ho et al. 2020 eq. 7: mean = sqrt(abar_prev) beta_t / (1 - abar_t) x0
    + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t, variance beta-tilde
    = (1 - abar_prev) / (1 - abar_t) beta_t, with alpha_t = abar_t / abar_prev for strided steps
    (the "fixed_small" variance). Equal in law to DDIM with eta = 1 and to Euler ancestral.
    One noise draw per step, the last (zero-variance) step included.
    """
    reject_options("ddpm", options)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        ab, ab_prev = _abar(s), _abar(sn)
        # 1 - abar = sigma^2 / (1 + sigma^2) and beta_t = 1 - abar_t / abar_prev, written so
        # that nothing cancels when sigma is tiny
        one_m_ab, one_m_ab_prev = s * s * ab, sn * sn * ab_prev
        alpha = ab / ab_prev
        beta = (s * s - sn * sn) * ab
        c_x0 = math.sqrt(ab_prev) * beta / one_m_ab
        c_xt = math.sqrt(alpha) * one_m_ab_prev / one_m_ab
        std = math.sqrt(max(beta * one_m_ab_prev / one_m_ab, 0.0))
        x_vp = x * math.sqrt(ab)
        noise = randn_like(x, generator)
        x_vp = c_x0 * denoised + c_xt * x_vp + std * noise
        x = x_vp / math.sqrt(ab_prev)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    final_sigma: float = 0.0,
    **options: Any,
) -> torch.Tensor:
    """DDIM (Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps_hat + std z,
    std = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    ``eta=0`` (default) is the deterministic sampler (first order in sigma: it is Euler's method
    on the probability-flow ODE); ``eta=1`` is DDPM. With ``eta > 0`` one noise tensor is drawn
    per step, the last included, scaled by ``s_noise``.

    ``final_sigma > 0``: the last step (to sigma 0) goes to ``final_sigma`` instead and the
    result is returned as the VP sample there, x_VP = sqrt(abar) x0_hat + sqrt(1 - abar -
    std^2) eps_hat (+ std z), abar = 1 / (1 + final_sigma^2) -- diffusers' ``DDIMScheduler``
    with ``set_alpha_to_one=False``, whose last step uses ``alphas_cumprod[0]`` (the
    schedule's smallest sigma, ~0.029 for SD) and whose pipelines decode that sample.
    """
    reject_options("ddim", options)
    check_eta("ddim", eta, s_noise)
    if not (math.isfinite(final_sigma) and final_sigma >= 0.0):
        raise ConfigError(f"sampler 'ddim': final_sigma must be >= 0, got {final_sigma}")
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        vp_out = sn == 0.0 and final_sigma > 0.0
        if vp_out:
            sn = min(final_sigma, s)
        ab_prev = _abar(sn)
        eps = (x - denoised) / s  # VE and VP share the same eps
        # std = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)), in sigmas:
        std = eta * math.sqrt(sn * sn * ab_prev * (s * s - sn * sn) / (s * s))
        c_eps = math.sqrt(max(sn * sn * ab_prev - std * std, 0.0))
        x_vp = math.sqrt(ab_prev) * denoised + c_eps * eps
        if eta > 0.0:
            x_vp = x_vp + (std * s_noise) * randn_like(x, generator)
        x = x_vp if vp_out else x_vp / math.sqrt(ab_prev)
    return x
