"""Karras et al. 2022 ODE samplers: Euler, Euler ancestral, Heun (Alg. 1/2), DPM2, DPM2 a."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from noisecraft.errors import ConfigError
from noisecraft.samplers._util import (
    Denoiser,
    Model,
    ancestral_step,
    bind,
    check_eta,
    check_sigmas,
    emit,
    randn_like,
    reject_options,
    to_d,
)


def _churn(
    name: str, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
) -> Callable[[float], float]:
    """Karras et al. 2022 Alg. 2 lines 4-5: gamma_i as a function of sigma_i."""
    if not s_churn >= 0.0:
        raise ConfigError(f"sampler '{name}': s_churn must be >= 0, got {s_churn}")
    check_eta(name, 0.0, s_noise)
    gamma_max = min(s_churn / n_steps, math.sqrt(2.0) - 1.0)
    return lambda sigma: gamma_max if s_tmin <= sigma <= s_tmax else 0.0


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    **options: Any,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    Karras et al. 2022 Alg. 2 with Euler steps (no Heun correction). With the default
    ``s_churn=0`` it is deterministic, first order, and draws no noise; ``s_churn > 0`` raises
    sigma to sigma_hat = sigma (1 + gamma) by adding noise of std sqrt(sigma_hat^2 - sigma^2)
    (times ``s_noise``) for sigma in [s_tmin, s_tmax] before each step.
    """
    reject_options("euler", options)
    sig = check_sigmas(sigmas)
    gamma = _churn("euler", len(sig) - 1, s_churn, s_tmin, s_tmax, s_noise)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        g = gamma(s)
        s_hat = s * (1.0 + g)
        if g > 0.0:
            x = x + randn_like(x, generator) * (s_noise * math.sqrt(s_hat**2 - s**2))
        denoised = model(x, s_hat)
        emit(callback, i, x, sigmas, denoised)
        x = x + to_d(x, s_hat, denoised) * (sn - s_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    **options: Any,
) -> torch.Tensor:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std sigma_up.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 (DDPM posterior variance
    in VE units, see ``ancestral_step``); as in k-diffusion / diffusers. One noise tensor is
    drawn per step, the last step included (``eta > 0``); ``eta=1`` equals DDPM in law.
    """
    reject_options("euler_ancestral", options)
    check_eta("euler_ancestral", eta, s_noise)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        down, up = ancestral_step(s, sn, eta)
        x = x + to_d(x, s, denoised) * (down - s)
        if eta > 0.0:
            x = x + randn_like(x, generator) * (s_noise * up)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    **options: Any,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022 Alg. 1; Alg. 2 when ``s_churn > 0``).

    d = (x - D(x; sigma)) / sigma; x' = x + (sigma_next - sigma) d;
    x_next = x + (sigma_next - sigma) (d + d') / 2 with d' taken at (x', sigma_next).
    The step to sigma = 0 is a plain Euler step (Alg. 1 line 8). Two denoiser calls per step.
    """
    reject_options("heun", options)
    sig = check_sigmas(sigmas)
    gamma = _churn("heun", len(sig) - 1, s_churn, s_tmin, s_tmax, s_noise)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        g = gamma(s)
        s_hat = s * (1.0 + g)
        if g > 0.0:
            x = x + randn_like(x, generator) * (s_noise * math.sqrt(s_hat**2 - s**2))
        denoised = model(x, s_hat)
        emit(callback, i, x, sigmas, denoised)
        d = to_d(x, s_hat, denoised)
        dt = sn - s_hat
        if sn == 0.0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sn, model(x_2, sn))
            x = x + (d + d_2) * (0.5 * dt)
    return x


@torch.no_grad()
def sample_dpm2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    **options: Any,
) -> torch.Tensor:
    """DPM-Solver-2 in the sigma view (k-diffusion's ``sample_dpm_2``; Lu et al. 2022 Alg. 1
    midpoint rule in log-sigma, Karras et al. 2022 sec. 3).

    A half step to the geometric mean sigma_mid = sqrt(sigma sigma_next), then the full step
    with the derivative there: x_next = x + (sigma_next - sigma) d(x_mid, sigma_mid).
    The step to sigma = 0 is Euler. Two denoiser calls per step.
    """
    reject_options("dpm2", options)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        d = to_d(x, s, denoised)
        x = x + d * (sn - s) if sn == 0.0 else _dpm2_step(model, x, s, sn, d)
    return x


def _dpm2_step(
    model: Model, x: torch.Tensor, s: float, target: float, d: torch.Tensor
) -> torch.Tensor:
    """DPM-Solver-2 step from sigma ``s`` to ``target`` > 0 given d = dx/dsigma at s: a half
    step to the geometric mean sigma_mid = sqrt(s target), then the full step with the
    derivative there (Lu et al. 2022 Alg. 1, r1 = 1/2, in the sigma view)."""
    s_mid = math.exp(0.5 * (math.log(s) + math.log(target)))
    x_2 = x + d * (s_mid - s)
    d_2 = to_d(x_2, s_mid, model(x_2, s_mid))
    return x + d_2 * (target - s)


@torch.no_grad()
def sample_dpm2_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    **options: Any,
) -> torch.Tensor:
    """DPM2 ancestral ("DPM2 a"; k-diffusion's ``sample_dpm_2_ancestral``).

    Each step splits sigma -> sigma_next into a deterministic part to sigma_down and fresh
    noise of std sigma_up (``ancestral_step``: the DDPM posterior variance of Ho et al. 2020
    eq. 7 in VE units, times ``eta``), takes the DPM-Solver-2 midpoint step of
    :func:`sample_dpm2` (Lu et al. 2022 Alg. 1) to sigma_down and adds ``s_noise * sigma_up``
    times unit noise. A step that ends at sigma_down = 0 is an Euler step. ``eta=0`` is
    :func:`sample_dpm2`. Two denoiser calls per step; one noise draw per step, the last
    included (``eta > 0``).
    """
    reject_options("dpm2_ancestral", options)
    check_eta("dpm2_ancestral", eta, s_noise)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        down, up = ancestral_step(s, sn, eta)
        d = to_d(x, s, denoised)
        x = x + d * (down - s) if down == 0.0 else _dpm2_step(model, x, s, down, d)
        if eta > 0.0:
            x = x + randn_like(x, generator) * (s_noise * up)
    return x
