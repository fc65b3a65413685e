"""From a step count to a decreasing sigma tensor (DESIGN.md contract 4).

leading / trailing / linspace are the timestep spacings of Lin et al. 2023, Table 2, as
diffusers names them: timesteps are chosen on the training grid and their sigmas are
interpolated linearly in sigma (diffusers' ``EulerDiscreteScheduler``). karras
(Karras et al. 2022 eq. 5) and exponential (uniform in log sigma) are spaced in sigma
directly, between the schedule's own smallest and largest sigma unless told otherwise.
lcm is the timestep subset of latent consistency sampling (diffusers' ``LCMScheduler``:
:func:`~noisecraft.diffusion.consistency.lcm_timesteps`, on the grid of ``original_steps``
distillation timesteps). Every result ends in a final 0.

diffusers' schedulers do not share one timestep grid; ``grid`` picks whose:

- ``"euler"`` (default): ``EulerDiscreteScheduler`` / ``LMSDiscreteScheduler`` /
  ``EulerAncestralDiscreteScheduler`` -- ``steps`` timesteps, fractional for linspace.
- ``"ddim"``: ``DDIMScheduler`` -- the same ``steps`` timesteps rounded to integers
  (``np.linspace(0, T - 1, steps).round()``; leading and trailing are integers already).
- ``"multistep"``: ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` --
  ``steps + 1`` timesteps by the spacing rule (leading: ratio ``T // (steps + 1)``), rounded,
  the smallest dropped (the final sigma 0 takes its place); trailing as "euler". Their
  karras timesteps are rounded too (:func:`discrete_timesteps`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from noisecraft.diffusion.consistency import ORIGINAL_STEPS, lcm_timesteps
from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.errors import ConfigError, unknown_name

SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential", "lcm")
GRIDS = ("euler", "ddim", "multistep")
#: Spacings whose timesteps lie on the training grid, sigmas interpolated linearly in sigma
#: (diffusers' Euler); a denoiser inverts that interpolation exactly.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "lcm")


def _check(schedule: NoiseSchedule, steps: int, spacing: str, grid: str = "euler") -> None:
    if spacing not in SPACINGS:
        raise unknown_name("sigma spacing", spacing, SPACINGS)
    if grid not in GRIDS:
        raise unknown_name("timestep grid", grid, GRIDS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if spacing in ("leading", "trailing") and steps > schedule.num_steps:
        raise ConfigError(
            f"{spacing} spacing needs steps <= the schedule's {schedule.num_steps} training "
            f"steps, got {steps}; use 'linspace' or 'karras' for more steps"
        )


def _grid_timesteps(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str,
    steps_offset: int,
    grid: str = "euler",
    original_steps: int = ORIGINAL_STEPS,
) -> Tensor:
    """Decreasing float64 timesteps on the training grid (diffusers' three spacings, lcm)."""
    T = schedule.num_steps
    if spacing == "lcm":  # the same integers on every grid
        return lcm_timesteps(T, steps, original_steps).double()
    if spacing == "trailing":  # T, T - r, T - 2r, ... rounded, minus 1; r = T / steps
        i = torch.arange(steps, dtype=torch.float64)
        return (T - i * (T / steps)).round() - 1
    # multistep solvers space steps + 1 points and drop the smallest
    n = steps + 1 if grid == "multistep" else steps
    if spacing == "linspace":  # np.linspace(0, T - 1, n)[::-1]: fractional for "euler"
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
        ts = ts if grid == "euler" else ts.round()  # round half to even, as numpy
    else:  # leading: 0, r, 2r, ... (+ offset), r = T // n
        i = torch.arange(n, dtype=torch.float64)
        ts = (i * (T // n)).round().flip(0) + steps_offset
    return ts[:steps]


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float) -> Tensor:
    """Karras et al. 2022 eq. 5: (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _exponential(sigma_min: float, sigma_max: float, steps: int) -> Tensor:
    """Uniform in log sigma from sigma_max down to sigma_min."""
    return torch.linspace(
        math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64
    ).exp()


def _sigmas64(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str,
    steps_offset: int,
    rho: float,
    sigma_min: float | None,
    sigma_max: float | None,
    grid: str = "euler",
    original_steps: int = ORIGINAL_STEPS,
) -> tuple[Tensor, Tensor]:
    """(sigmas without the final 0, timesteps), both float64, length ``steps``."""
    _check(schedule, steps, spacing, grid)
    if spacing in TIMESTEP_SPACINGS:
        ts = _grid_timesteps(schedule, steps, spacing, steps_offset, grid, original_steps)
        return schedule.t_to_sigma(ts, interpolation="linear"), ts
    smin = float(schedule.sigmas[0]) if sigma_min is None else float(sigma_min)
    smax = float(schedule.sigmas[-1]) if sigma_max is None else float(sigma_max)
    if not 0 < smin <= smax:
        raise ConfigError(
            f"need 0 < sigma_min <= sigma_max, got sigma_min={smin}, sigma_max={smax}"
        )
    if spacing == "karras":
        if rho <= 0:
            raise ConfigError(f"rho must be positive, got {rho}")
        s = _karras(smin, smax, steps, rho)
    else:
        s = _exponential(smin, smax, steps)
    ts = schedule.sigma_to_t(s, interpolation="log")
    if grid == "multistep" and spacing == "karras":  # DPM++ / UniPC round them
        ts = ts.round()
    return s, ts


def make_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "linspace",
    *,
    steps_offset: int = 1,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    dtype: torch.dtype = torch.float32,
    grid: str = "euler",
    original_steps: int = ORIGINAL_STEPS,
) -> Tensor:
    """Decreasing sigmas of length ``steps + 1`` whose last element is 0.

    leading / trailing / linspace equal diffusers' ``EulerDiscreteScheduler.sigmas`` for the
    same ``timestep_spacing`` and ``steps_offset`` (SD 1.5 uses ``steps_offset=1``;
    only "leading" reads it); karras and exponential equal ``use_karras_sigmas`` /
    ``use_exponential_sigmas``. ``sigma_min`` / ``sigma_max`` / ``rho`` apply to those two.
    ``grid="ddim"`` / ``"multistep"`` give the sigmas of diffusers' DDIM / DPM++ and UniPC
    timesteps instead (module docstring). ``original_steps``: the distillation grid of the
    lcm spacing (diffusers' ``original_inference_steps``).
    """
    s, _ = _sigmas64(
        schedule, steps, spacing, steps_offset, rho, sigma_min, sigma_max, grid, original_steps
    )
    return torch.cat([s, s.new_zeros(1)]).to(dtype)


def discrete_timesteps(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "linspace",
    steps_offset: int = 1,
    *,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    grid: str = "euler",
    original_steps: int = ORIGINAL_STEPS,
) -> Tensor:
    """The ``steps`` decreasing timesteps behind :func:`make_sigmas` (float64).

    Integers for leading / trailing (``.long()`` is exact), fractional for linspace, and
    ``schedule.sigma_to_t(sigma)`` (log-sigma interpolation) for karras / exponential,
    as diffusers' Euler scheduler reports them; rounded where ``grid`` says diffusers rounds.
    """
    _, ts = _sigmas64(
        schedule, steps, spacing, steps_offset, rho, sigma_min, sigma_max, grid, original_steps
    )
    return ts
