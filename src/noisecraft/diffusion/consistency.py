"""Latent consistency models (Luo et al. 2023): the timestep grid and the boundary scalings.

A consistency function maps any point of a probability-flow ODE trajectory to its origin,
``f(x_t, t) = c_skip(t) x_t + c_out(t) F(x_t, t)`` with ``c_skip(0) = 1``, ``c_out(0) = 0``
so that ``f(x, 0) = x`` holds by construction (Song et al. 2023, eq. 7; LCM paper eq. 9 with
``F`` the x0 prediction of the noise-prediction network). LCM evaluates the scalings of the
EDM parametrisation (Karras et al. 2022, Table 1, sigma_data = 0.5) at ``t * timestep_scaling``
(10 in the published LCM and LCM-LoRA weights and in diffusers' ``LCMScheduler``), so that they
are ~(0, 1) everywhere except near ``t = 0``.

LCM distils on a grid of ``original_steps`` (50) DDIM timesteps, ``k - 1, 2k - 1, ..., T - 1``
with the skipping interval ``k = T // original_steps``, and samples on a subset of it
(:func:`lcm_timesteps`, diffusers' ``LCMScheduler.set_timesteps``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from noisecraft.errors import ConfigError

#: diffusers' ``LCMScheduler`` defaults (and the published LCM / LCM-LoRA training scripts).
ORIGINAL_STEPS = 50
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def lcm_origin_timesteps(num_train_steps: int, original_steps: int = ORIGINAL_STEPS) -> Tensor:
    """The distillation grid ``k - 1, 2k - 1, ..., original_steps * k - 1`` (increasing,
    int64), ``k = num_train_steps // original_steps`` (LCM paper sec. 4.2, "skipping-step")."""
    if not 1 <= original_steps <= num_train_steps:
        raise ConfigError(
            f"original_steps must be in [1, {num_train_steps}] (the training timesteps), "
            f"got {original_steps}"
        )
    k = num_train_steps // original_steps
    return torch.arange(1, original_steps + 1, dtype=torch.int64) * k - 1


def lcm_timesteps(num_train_steps: int, steps: int, original_steps: int = ORIGINAL_STEPS) -> Tensor:
    """The ``steps`` decreasing timesteps of LCM's multistep sampling: the distillation grid
    reversed, taken at the indices ``floor(linspace(0, original_steps, steps, endpoint=False))``
    (diffusers' ``LCMScheduler.set_timesteps``; 4 steps of SD: 999, 759, 499, 259)."""
    origin = lcm_origin_timesteps(num_train_steps, original_steps).flip(0)
    if not 1 <= steps <= original_steps:
        raise ConfigError(
            f"lcm spacing needs 1 <= steps <= original_steps = {original_steps}, got {steps}"
        )
    index = (torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).floor()
    return origin[index.long()]


def boundary_scalings(
    t: Tensor,
    timestep_scaling: float = TIMESTEP_SCALING,
    sigma_data: float = SIGMA_DATA,
) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` at timesteps ``t``: ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s / sqrt(s^2 + sd^2)``, ``s = t * timestep_scaling`` (LCM paper eq. 9; diffusers'
    ``get_scalings_for_boundary_condition_discrete``). ``c_skip(0) = 1``, ``c_out(0) = 0``."""
    s = t.double() * timestep_scaling
    denom = s * s + sigma_data**2
    return sigma_data**2 / denom, s / denom.sqrt()


__all__ = [
    "ORIGINAL_STEPS",
    "SIGMA_DATA",
    "TIMESTEP_SCALING",
    "boundary_scalings",
    "lcm_origin_timesteps",
    "lcm_timesteps",
]
