"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++"), data prediction.

In the VE view lambda = -log(sigma) and h = lambda_next - lambda = log(sigma / sigma_next);
the exact solution of the probability-flow ODE is
x_next = (sigma_next / sigma) x + sigma_next * integral of e^lambda D(lambda) d lambda,
and the solvers below approximate D by its multistep extrapolation (2M, 3M) or by a second
evaluation inside the step (2S, SDE: singlestep).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from noisecraft.errors import ConfigError
from noisecraft.samplers._util import (
    Denoiser,
    ancestral_step,
    bind,
    check_eta,
    check_sigmas,
    emit,
    randn_like,
    reject_options,
    to_d,
)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    **options: Any,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2).

    x_next = (sigma_next / sigma) x - (e^{-h} - 1) D', with
    D' = (1 + 1 / (2r)) D_i - 1 / (2r) D_{i-1}, r = h_{i-1} / h_i. The first step, and the last
    step when it ends at sigma = 0, are first order (DPM-Solver++ 1 = DDIM). One call per step.
    """
    reject_options("dpmpp_2m", options)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    old_denoised: torch.Tensor | None = None
    h_last = 0.0
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        if sn == 0.0:
            x = denoised  # the first-order step with h = inf
        else:
            h = math.log(s / sn)
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * old_denoised
            x = (sn / s) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    **options: Any,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022 sec. 5 / appendix, as in k-diffusion).

    With eta_h = eta h: x_next = (sigma_next / sigma) e^{-eta_h} x + (1 - e^{-h - eta_h}) D_i
    + c (D_i - D_{i-1}) / r + sigma_next sqrt(1 - e^{-2 eta_h}) s_noise z, where
    c = (1 - e^{-h - eta_h}) / 2 ("midpoint", diffusers' choice) or
    (1 - e^{-h - eta_h}) / (-h - eta_h) + 1 ("heun"). ``eta=0`` is DPM++ 2M. Noise is plain
    Gaussian from ``generator`` (not k-diffusion's Brownian tree); one draw per step, the last
    step (which returns D) included.
    """
    reject_options("dpmpp_2m_sde", options)
    check_eta("dpmpp_2m_sde", eta, s_noise)
    if solver_type not in ("midpoint", "heun"):
        raise ConfigError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    old_denoised: torch.Tensor | None = None
    h_last = 0.0
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        noise = randn_like(x, generator) if eta > 0.0 else None
        if sn == 0.0:
            x = denoised
        else:
            h = math.log(s / sn)
            eta_h = eta * h
            one_minus = -math.expm1(-h - eta_h)
            x = (sn / s * math.exp(-eta_h)) * x + one_minus * denoised
            if old_denoised is not None:
                r = h_last / h
                # "heun": phi_2-type weight; "midpoint": half the first-order weight
                heun = solver_type == "heun"
                c = one_minus / (-h - eta_h) + 1.0 if heun else 0.5 * one_minus
                x = x + (c / r) * (denoised - old_denoised)
            if noise is not None:
                x = x + noise * (sn * math.sqrt(-math.expm1(-2.0 * eta_h)) * s_noise)
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    exact: bool = False,
    **options: Any,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022 multistep update; k-diffusion's
    ``sample_dpmpp_3m_sde`` structure).

    With h_eta = h (1 + eta), so that e^{-h_eta} = (sigma_next / sigma) e^{-eta h}:
    x_next = e^{-h_eta} x + (1 - e^{-h_eta}) D_i + phi_2 D1 - w phi_3 D2
    + sigma_next sqrt(1 - e^{-2 eta h}) s_noise z, where D1 ~ h D' and D2 ~ h^2 D'' / 2 are
    built from the last three D's, phi_2 = (e^{-h_eta} - 1) / h_eta + 1 and
    phi_3 = phi_2 / h_eta - 1/2. The exact weight of D'' in the variation-of-constants
    integral is -h^2 phi_3, i.e. w = 2 for D2 (``exact=True``: third order at ``eta=0``,
    tested). The default w = 1 is what k-diffusion, diffusers and AUTOMATIC1111 call
    "DPM++ 3M SDE" (second order), so images match theirs; on the shipped MNIST model it
    also gave the lower FID at 20 NFE. Warm-up with orders 1 and 2. One noise draw per
    step, the last included.
    """
    reject_options("dpmpp_3m_sde", options)
    check_eta("dpmpp_3m_sde", eta, s_noise)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    d_1: torch.Tensor | None = None
    d_2: torch.Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        noise = randn_like(x, generator) if eta > 0.0 else None
        h: float | None = None
        if sn == 0.0:
            x = denoised
        else:
            h = math.log(s / sn)
            h_eta = h * (eta + 1.0)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1.0
            if h_2 is not None and d_1 is not None and d_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                # d2 ~ h^2 D'' / 2 while the Taylor term is -h^2 phi_3 D'': 2 phi_3 is exact;
                # k-diffusion / diffusers / A1111 use phi_3 (second order)
                x = x + phi_2 * d1 - ((2.0 if exact else 1.0) * phi_3) * d2
            elif h_1 is not None and d_1 is not None:
                x = x + (phi_2 * h / h_1) * (denoised - d_1)
            if noise is not None:
                x = x + noise * (sn * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise)
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def _dpmpp_1(x: torch.Tensor, s: float, target: float, denoised: torch.Tensor) -> torch.Tensor:
    """First-order DPM-Solver++ step (= DDIM) from sigma ``s`` to ``target``:
    x' = (target / s) x - (e^{-h} - 1) D with h = log(s / target) (Lu et al. 2022 eq. 9);
    D itself when ``target`` is 0 (h = inf)."""
    if target == 0.0:
        return denoised
    return (target / s) * x - math.expm1(-math.log(s / target)) * denoised


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
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
    """DPM-Solver++(2S) ancestral ("DPM++ 2S a"; k-diffusion's ``sample_dpmpp_2s_ancestral``).

    Each step splits sigma -> sigma_next into a deterministic part to sigma_down and fresh
    noise of std sigma_up (``ancestral_step``, Ho et al. 2020 eq. 7 in VE units, times
    ``eta``). The deterministic part is DPM-Solver++(2S) (Lu et al. 2022 Alg. 1, r = 1/2):
    with h = log(sigma / sigma_down), a first-order step to sigma_mid = sigma e^{-h/2} gives
    D_mid = D(x_mid; sigma_mid), and x' = (sigma_down / sigma) x - (e^{-h} - 1) D_mid.
    A step that ends at sigma_down = 0 is an Euler step. Two denoiser calls per step; one
    noise draw per step, the last included (``eta > 0``).
    """
    reject_options("dpmpp_2s_ancestral", options)
    check_eta("dpmpp_2s_ancestral", eta, s_noise)
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        down, up = ancestral_step(s, sn, eta)
        if down == 0.0:
            x = x + to_d(x, s, denoised) * (down - s)
        else:
            s_mid = s * math.exp(-0.5 * math.log(s / down))
            x_mid = _dpmpp_1(x, s, s_mid, denoised)
            x = _dpmpp_1(x, s, down, model(x_mid, s_mid))
        if eta > 0.0:
            x = x + randn_like(x, generator) * (s_noise * up)
    return x


def _brownian_pair(
    x: torch.Tensor, generator: torch.Generator | None, s: float, s_mid: float, sn: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit noises of a Brownian motion W in sigma time over [s_mid, s] and over [sn, s]:
    z1 = (W(s) - W(s_mid)) / sqrt(s - s_mid), z2 = (W(s) - W(sn)) / sqrt(s - sn). They are
    correlated (the second interval holds the first), as the increments k-diffusion's
    ``BrownianTreeNoiseSampler`` gives; made from two independent draws."""
    a, b = randn_like(x, generator), randn_like(x, generator)
    if sn == 0.0:
        return a, b  # the last step (to sigma 0) uses no noise; the draws keep the count
    w1, w2 = math.sqrt(s - s_mid), math.sqrt(s_mid - sn)
    return a, (a * w1 + b * w2) / math.sqrt(s - sn)


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    **options: Any,
) -> torch.Tensor:
    """DPM-Solver++ SDE ("DPM++ SDE"; k-diffusion's ``sample_dpmpp_sde``): the singlestep
    DPM-Solver++(2S) of Lu et al. 2022 (Alg. 1, intermediate point at fraction ``r`` of h)
    with an ancestral split of both sub-steps.

    With lambda = -log sigma, h = lambda_next - lambda, sigma_s = sigma e^{-r h}:
    (1) first-order step (eq. 9) to sigma_down(sigma -> sigma_s), plus sigma_up z1, gives x_s
    and D_s = D(x_s; sigma_s); (2) first-order step of x to sigma_down(sigma -> sigma_next)
    with D' = (1 - 1/(2r)) D + 1/(2r) D_s, plus sigma_up z2. sigma_down / sigma_up come from
    ``ancestral_step`` (Ho et al. 2020 eq. 7 in VE units, times ``eta``), both noises are
    scaled by ``s_noise``; ``eta=0`` is the deterministic DPM-Solver++(2S), second order.
    z1 and z2 are the unit increments of one Brownian motion in sigma over [sigma_s, sigma]
    and [sigma_next, sigma] (correlated, as k-diffusion's Brownian-tree noise), made from
    two independent draws from ``generator`` per step, the last step (Euler to sigma = 0)
    included (``eta > 0``). Two denoiser calls per step.
    """
    reject_options("dpmpp_sde", options)
    check_eta("dpmpp_sde", eta, s_noise)
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"sampler 'dpmpp_sde': r must be in (0, 1], got {r}")
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    fac = 1.0 / (2.0 * r)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        s_mid = s * math.exp(-r * math.log(s / sn)) if sn > 0.0 else 0.0
        z1 = z2 = None
        if eta > 0.0:
            z1, z2 = _brownian_pair(x, generator, s, s_mid, sn)
        if sn == 0.0:
            x = x + to_d(x, s, denoised) * (sn - s)
            continue
        down, up = ancestral_step(s, s_mid, eta)
        x_s = _dpmpp_1(x, s, down, denoised)
        if z1 is not None:
            x_s = x_s + z1 * (s_noise * up)
        d_prime = (1.0 - fac) * denoised + fac * model(x_s, s_mid)
        down, up = ancestral_step(s, sn, eta)
        x = _dpmpp_1(x, s, down, d_prime)
        if z2 is not None:
            x = x + z2 * (s_noise * up)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
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
    """ "DPM++ 2M SDE Heun" (AUTOMATIC1111's name): :func:`sample_dpmpp_2m_sde` with
    ``solver_type="heun"``, the phi_2-type weight of the second-order term."""
    reject_options("dpmpp_2m_sde_heun", options)
    return sample_dpmpp_2m_sde(
        denoiser,
        x,
        sigmas,
        generator=generator,
        callback=callback,
        extra_args=extra_args,
        eta=eta,
        s_noise=s_noise,
        solver_type="heun",
    )
