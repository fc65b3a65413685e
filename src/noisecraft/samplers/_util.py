"""Helpers shared by the samplers: sigma validation, the ODE derivative, ancestral steps, noise.

Conventions (DESIGN.md contract 3): ``x = x0 + sigma * noise`` (the VE view of Karras et al.
2022); the denoiser returns ``x0_hat``; ``sigmas`` is strictly decreasing and ends in 0.
Step coefficients are computed in float64 Python scalars from ``sigmas.tolist()``; tensors
stay in the dtype of ``x``.

Noise rule for every stochastic sampler: when it injects noise at all (``eta > 0``) it draws
exactly one tensor of ``x``'s shape per step, the last step included (where it is multiplied
by 0), like diffusers' ancestral schedulers; DPM++ SDE, which adds noise twice per step,
draws two. So the generator advances the same way for a given number of steps whatever the
sampler's internal branches. All draws come from the ``generator`` argument (AUTOMATIC1111's
SDE samplers use torchsde's Brownian tree instead: the same law, other numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from noisecraft.errors import ConfigError

Denoiser = Callable[..., torch.Tensor]
Model = Callable[[torch.Tensor, float], torch.Tensor]


def check_sigmas(sigmas: torch.Tensor) -> list[float]:
    """Validate a sigma schedule and return it as Python floats.

    It must be a 1-D tensor of at least two finite values, strictly decreasing, ending in 0.
    """
    if not isinstance(sigmas, torch.Tensor):
        raise ConfigError(f"sigmas must be a torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ConfigError(
            f"sigmas must be a 1-D tensor of at least 2 values (got shape {tuple(sigmas.shape)}); "
            "build it with make_sigmas(schedule, steps, spacing)"
        )
    values = [float(v) for v in sigmas.detach().double().cpu().tolist()]
    if not all(math.isfinite(v) for v in values):
        raise ConfigError("sigmas must be finite; check the schedule that produced them")
    if values[-1] != 0.0:
        raise ConfigError(f"sigmas must end in 0 (got {values[-1]:g}); append a final 0")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise ConfigError("sigmas must be strictly decreasing; remove repeated or rising values")
    return values


def reject_options(sampler: str, options: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming the options that ``sampler`` does not take."""
    if options:
        names = ", ".join(sorted(options))
        raise ConfigError(f"sampler '{sampler}' takes no option(s) {names}; remove them")


def bind(denoiser: Denoiser, x: torch.Tensor, extra_args: Mapping[str, Any] | None) -> Model:
    """Return ``f(x, sigma: float) -> x0_hat`` that calls ``denoiser(x, sigma_b, **extra_args)``.

    ``sigma_b`` has shape (B,) on ``x``'s device, in ``x``'s dtype (float32 when ``x`` is of a
    lower precision, so that sigma -> timestep lookups stay accurate).
    """
    extra = dict(extra_args or {})
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    def model(x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)
        return denoiser(x, s, **extra)

    return model


def emit(
    callback: Callable[[dict], Any] | None,
    i: int,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    denoised: torch.Tensor,
) -> None:
    """Call ``callback`` with the per-step dict of contract 3 (if there is one)."""
    if callback is not None:
        callback(
            {"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised}
        )


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma.

    Karras et al. 2022 eq. 3 with sigma(t) = t, s(t) = 1 (written with D as in eq. 5).
    """
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down plus fresh noise
    of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    sigma_up^2 = eta^2 * sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is the DDPM posterior
    variance (Ho et al. 2020 eq. 7, beta-tilde) rewritten in VE units, i.e. DDIM's sigma_t
    (Song et al. 2021 eq. 16) divided by sqrt(alpha_bar_prev); eta = 1 gives DDPM, eta = 0 DDIM.
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    up = min(sigma_next, up)
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Unit Gaussian noise shaped like ``x``, drawn from ``generator``.

    Drawn on the generator's device and then moved, as diffusers' ``randn_tensor`` does, so a
    CPU generator gives the same noise whatever device ``x`` lives on. A sequence of
    generators (one per row of ``x``, as ``randn_tensor`` takes them) draws each row from its
    own generator, so an image's noise does not depend on the batch it is made in.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        if len(generator) != x.shape[0]:
            raise ConfigError(
                f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per row"
            )
        return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
    return noise.to(x.device)


def check_eta(sampler: str, eta: float, s_noise: float) -> None:
    """Reject negative noise amounts."""
    if not eta >= 0.0:
        raise ConfigError(f"sampler '{sampler}': eta must be >= 0, got {eta}")
    if not s_noise >= 0.0:
        raise ConfigError(f"sampler '{sampler}': s_noise must be >= 0, got {s_noise}")


def check_order(sampler: str, order: int, lo: int, hi: int) -> None:
    """Reject an order outside [lo, hi]."""
    if not isinstance(order, int) or isinstance(order, bool) or not lo <= order <= hi:
        raise ConfigError(
            f"sampler '{sampler}': order must be an integer in [{lo}, {hi}], got {order}"
        )
