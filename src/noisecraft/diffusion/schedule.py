"""Discrete noise schedules: betas, alpha-bar and the sigma view (DESIGN.md contract 1).

A schedule is the list of betas of the forward process q(x_t | x_{t-1}) =
N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (DDPM eq. 2) for t = 0 .. T-1 (0-based
indices, as diffusers and improved-diffusion use). Everything else is derived:
``alphas_cumprod`` (alpha-bar, DDPM eq. 4) and ``sigmas = sqrt((1 - abar) / abar)``,
the noise level of the same process seen as x = x0 + sigma * eps (Karras et al. 2022,
"VE view": x_t = sqrt(abar) * (x0 + sigma * eps)).

All schedule math is float64; cast at the point of use.

Zero terminal SNR (Lin et al. 2023) makes the last alpha-bar exactly 0, i.e. sigma = inf.
``alphas_cumprod`` keeps the exact 0 (training and the forward process need it), but
``sigmas`` / ``log_sigmas`` clamp that alpha-bar to 2**-24 (the smallest positive float16
subnormal, as diffusers' sigma-based schedulers do), so the largest sigma is about 4096.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from noisecraft.errors import ConfigError, unknown_name

ZERO_SNR_ABAR = 2.0**-24  # alpha-bar used in place of 0 when converting to sigma (as diffusers)
INTERPOLATIONS = ("linear", "log")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Betas of a discrete diffusion process and the quantities derived from them.

    ``params`` records the constructor arguments (for :meth:`to_config`);
    ``zero_terminal_snr`` records whether :meth:`rescale_zero_terminal_snr` was applied.
    """

    betas: Tensor
    name: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas).detach().to("cpu", torch.float64).clone()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ConfigError(
                f"schedule betas must be a 1-D tensor with at least 2 steps, got shape "
                f"{tuple(betas.shape)}; pass one beta per training timestep"
            )
        if not bool(torch.isfinite(betas).all()) or bool((betas <= 0).any() | (betas > 1).any()):
            raise ConfigError(
                "schedule betas must lie in (0, 1]; check beta_start / beta_end "
                f"(got min {betas.min().item():.3g}, max {betas.max().item():.3g})"
            )
        object.__setattr__(self, "betas", betas)

    # ------------------------------------------------------------------ derived
    @property
    def num_steps(self) -> int:
        return int(self.betas.numel())

    @cached_property
    def alphas(self) -> Tensor:
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        """alpha-bar_t = prod_{s <= t} (1 - beta_s) (DDPM eq. 4)."""
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def alphas_cumprod_prev(self) -> Tensor:
        """alpha-bar_{t-1}, with alpha-bar_{-1} = 1."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @cached_property
    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t), increasing in t (abar = 0 clamped to 2**-24)."""
        abar = self.alphas_cumprod.clamp(min=ZERO_SNR_ABAR)
        return ((1.0 - abar) / abar).sqrt()

    @cached_property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @cached_property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio abar / (1 - abar) = 1 / sigma^2 (exact 0 at zero terminal SNR)."""
        abar = self.alphas_cumprod
        return abar / (1.0 - abar)

    @cached_property
    def posterior_variance(self) -> Tensor:
        """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t (DDPM eq. 7); 0 at t = 0."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> Tensor:
        """log beta~_t with beta~_0 (= 0) replaced by beta~_1, as improved-diffusion does."""
        v = self.posterior_variance
        return torch.cat([v[1:2], v[1:]]).log()

    @cached_property
    def posterior_mean_coef1(self) -> Tensor:
        """Coefficient of x0 in mu~_t (DDPM eq. 7): sqrt(abar_{t-1}) beta_t / (1 - abar_t)."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_mean_coef2(self) -> Tensor:
        """Coefficient of x_t in mu~_t, DDPM eq. 7: sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t)."""
        return self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------- constructors
    @classmethod
    def linear(
        cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """DDPM (Ho et al. 2020, sec. 4): betas linear from ``beta_start`` to ``beta_end``."""
        _check_steps(num_steps)
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        return cls(betas, "linear", dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def cosine(
        cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999
    ) -> NoiseSchedule:
        """Improved DDPM eq. 17: abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2.

        beta_t = 1 - abar(t+1) / abar(t), clipped to ``max_beta`` (Nichol & Dhariwal 2021 sec. 3.2).
        """
        _check_steps(num_steps)
        u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, "cosine", dict(s=s, max_beta=max_beta))

    @classmethod
    def scaled_linear(
        cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        """Latent / Stable Diffusion: sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end)."""
        _check_steps(num_steps)
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64)
        return cls(root**2, "scaled_linear", dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def sigmoid(
        cls,
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        low: float = -6.0,
        high: float = 6.0,
    ) -> NoiseSchedule:
        """GeoDiff (Xu et al. 2022): beta = sigmoid(linspace(low, high)) * (end - start) + start."""
        _check_steps(num_steps)
        z = torch.linspace(low, high, num_steps, dtype=torch.float64)
        betas = torch.sigmoid(z) * (beta_end - beta_start) + beta_start
        params = dict(beta_start=beta_start, beta_end=beta_end, low=low, high=high)
        return cls(betas, "sigmoid", params)

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> NoiseSchedule:
        """Build a schedule by name (see :data:`SCHEDULES`); kwargs go to its constructor."""
        if name not in SCHEDULES:
            raise unknown_name("schedule", name, SCHEDULES)
        try:
            return SCHEDULES[name](**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad arguments for schedule '{name}': {e}") from None

    # ------------------------------------------------------------- transforms
    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_{T-1} = 0.

        sqrt(abar_0) is kept; the last beta becomes 1. See the module docstring for how
        the resulting infinite sigma is handled.
        """
        root = self.alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        abar = root**2
        alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
        return NoiseSchedule(1.0 - alphas, self.name, dict(self.params), zero_terminal_snr=True)

    # -------------------------------------------------------- sigma <-> t maps
    def sigma_to_t(self, sigma: Tensor | float, *, interpolation: str = "log") -> Tensor:
        """Continuous timestep of a noise level, by piecewise-linear interpolation.

        ``interpolation="log"`` interpolates linearly in log sigma (diffusers' Euler
        ``_sigma_to_t`` and k-diffusion's ``sigma_to_t``); ``"linear"`` inverts
        :meth:`t_to_sigma`'s default (linear in sigma). Sigmas outside the schedule's
        range clamp to t = 0 and t = T - 1. Returns float64 on ``sigma``'s device.
        """
        _check_interpolation(interpolation)
        s = torch.as_tensor(sigma)
        device = s.device
        s = s.to(torch.float64)
        if interpolation == "log":
            knots = self.log_sigmas.to(device)
            s = s.clamp(min=1e-10).log()
        else:
            knots = self.sigmas.to(device)
        flat = s.reshape(-1)
        low = (torch.searchsorted(knots, flat, right=True) - 1).clamp(0, self.num_steps - 2)
        lo, hi = knots[low], knots[low + 1]
        w = ((lo - flat) / (lo - hi)).clamp(0.0, 1.0)
        return (low.to(torch.float64) + w).reshape(s.shape)

    def t_to_sigma(self, t: Tensor | float, *, interpolation: str = "linear") -> Tensor:
        """Noise level at a (fractional) timestep, interpolating between the integer knots.

        ``interpolation="linear"`` interpolates sigma itself (``np.interp`` as diffusers' Euler
        scheduler does for fractional timesteps); ``"log"`` interpolates log sigma
        (k-diffusion) and is the exact inverse of :meth:`sigma_to_t`. Returns float64.
        """
        _check_interpolation(interpolation)
        tt = torch.as_tensor(t)
        device = tt.device
        tt = tt.to(torch.float64).clamp(0, self.num_steps - 1)
        low = tt.floor().long().clamp(max=self.num_steps - 2)
        w = tt - low
        knots = (self.log_sigmas if interpolation == "log" else self.sigmas).to(device)
        out = (1.0 - w) * knots[low] + w * knots[low + 1]
        return out.exp() if interpolation == "log" else out

    # -------------------------------------------------------------- config io
    def to_config(self) -> dict[str, Any]:
        """A JSON-able description from which :meth:`from_config` rebuilds the same betas."""
        if self.name in SCHEDULES:
            return {
                "name": self.name,
                "num_steps": self.num_steps,
                "params": dict(self.params),
                "zero_terminal_snr": self.zero_terminal_snr,
            }
        return {
            "name": self.name,
            "betas": [float(b) for b in self.betas],
            "zero_terminal_snr": self.zero_terminal_snr,
        }

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> NoiseSchedule:
        """Inverse of :meth:`to_config`."""
        if not isinstance(d, dict) or "name" not in d:
            raise ConfigError("schedule config must be a dict with a 'name' key (see to_config)")
        if "betas" in d:
            return cls(
                torch.tensor(d["betas"], dtype=torch.float64),
                d["name"],
                dict(d.get("params", {})),
                zero_terminal_snr=bool(d.get("zero_terminal_snr", False)),
            )
        kwargs = dict(d.get("params", {}))
        if "num_steps" in d:
            kwargs["num_steps"] = int(d["num_steps"])
        schedule = cls.from_name(d["name"], **kwargs)
        return schedule.rescale_zero_terminal_snr() if d.get("zero_terminal_snr") else schedule

    def __repr__(self) -> str:
        zsnr = ", zero_terminal_snr=True" if self.zero_terminal_snr else ""
        return (
            f"NoiseSchedule({self.name!r}, num_steps={self.num_steps}, params={self.params}{zsnr})"
        )


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, numbers.Integral) or num_steps < 2:
        raise ConfigError(f"num_steps must be an integer >= 2, got {num_steps!r}")


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise unknown_name("interpolation", interpolation, INTERPOLATIONS)


SCHEDULES: dict[str, Callable[..., NoiseSchedule]] = {
    "linear": NoiseSchedule.linear,
    "cosine": NoiseSchedule.cosine,
    "scaled_linear": NoiseSchedule.scaled_linear,
    "sigmoid": NoiseSchedule.sigmoid,
}
