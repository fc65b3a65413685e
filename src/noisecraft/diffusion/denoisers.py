"""Turn a network trained on a discrete VP schedule into a denoiser (DESIGN.md contract 2).

A denoiser maps (x, sigma) with x = x0 + sigma * noise (the "VE" view of Karras et al.
2022) to an estimate of x0. The network sees x_t = sqrt(abar) x0 + sqrt(1 - abar) eps,
which is x * c_in with c_in = 1 / sqrt(1 + sigma^2) = sqrt(abar) (Karras et al. 2022,
Table 1, "VP" column), at the continuous timestep t = schedule.sigma_to_t(sigma).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion.parametrization import check_prediction
from noisecraft.diffusion.schedule import NoiseSchedule


def sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` (float, 0-d, (1,) or (B,)) as a float64 tensor of shape (B,) on ``x``'s device."""
    s = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1)
    if s.numel() == 1:
        s = s.expand(x.shape[0])
    if s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {s.shape[0]} values for a batch of {x.shape[0]}")
    return s


class DiscreteDenoiser:
    """``denoiser(x, sigma, **cond) -> x0_hat`` around ``model(x_t, t, **cond)``.

    The model predicts ``prediction`` ("eps", "v" or "x0"); with ``learned_variance`` its
    output has 2C channels and only the first C (the mean part) are used. x0 is recovered
    in the VE form, which stays exact as sigma -> 0:

    - eps: x0 = x - sigma * eps                                  (c_skip = 1, c_out = -sigma)
    - v:   x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v (Salimans & Ho 2022)
    - x0:  the output itself.

    Where sigma == 0 the input is returned unchanged (x is already clean), without a model
    call if the whole batch is at 0. ``quantize=True`` rounds t to the nearest training
    timestep (as diffusers' DPM++ / UniPC do); ``timestep_interpolation`` is passed to
    :meth:`NoiseSchedule.sigma_to_t` ("log" as k-diffusion; "linear" inverts the
    linear-in-sigma interpolation of the leading / trailing / linspace spacings, so the
    model sees exactly diffusers' Euler timesteps).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: str = "eps",
        *,
        learned_variance: bool = False,
        quantize: bool = False,
        timestep_interpolation: str = "log",
    ):
        self.model = model
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        self.learned_variance = learned_variance
        self.quantize = quantize
        self.timestep_interpolation = timestep_interpolation
        schedule.sigma_to_t(0.0, interpolation=timestep_interpolation)  # validate the name

    def replace(self, **changes: Any) -> DiscreteDenoiser:
        """A copy with some constructor arguments changed (e.g. ``quantize=True`` for the
        integer timesteps of diffusers' DDIM / DPM++ / UniPC; the model is shared)."""
        kwargs = {
            "prediction": self.prediction,
            "learned_variance": self.learned_variance,
            "quantize": self.quantize,
            "timestep_interpolation": self.timestep_interpolation,
            **changes,
        }
        return type(self)(self.model, self.schedule, **kwargs)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (float32) timestep the model is called with for each sigma."""
        t = self.schedule.sigma_to_t(sigma, interpolation=self.timestep_interpolation)
        return (t.round() if self.quantize else t).to(torch.float32)

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        s64 = sigma_batch(sigma, x)
        zero = s64 == 0
        if bool(zero.all()):
            return x
        shape = (-1,) + (1,) * (x.ndim - 1)
        c_in64 = (1.0 + s64**2).rsqrt()
        c_in = c_in64.to(x.dtype).reshape(shape)
        out = self.model(x * c_in, self.sigma_to_t(s64), **cond)
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if self.prediction == "eps":
            x0 = x - s64.to(x.dtype).reshape(shape) * out
        elif self.prediction == "v":
            c_skip = (c_in64**2).to(x.dtype).reshape(shape)
            c_out = (s64 * c_in64).to(x.dtype).reshape(shape)
            x0 = c_skip * x - c_out * out
        else:
            x0 = out.to(x.dtype)
        if bool(zero.any()):
            x0 = torch.where(zero.reshape(shape), x, x0)
        return x0


class ClippedDenoiser:
    """Clip the predicted x0 to the data range: DDPM's ``clip_denoised``.

    Ho et al. (2020) and improved-diffusion clip ``pred_xstart`` to [-1, 1] before
    forming the posterior mean (eq. 7); with guidance (GLIDE) the clip acts on the
    *guided* prediction, so this wrapper goes outside :class:`CFGDenoiser`.

    It matters most at the first step of a cosine schedule: there sigma_max is
    about 4096, and x0 = x - sigma * eps turns an eps error of 1e-3 into an x0 error
    of 4; unclipped, that surplus noise survives to the end as speckle.
    """

    def __init__(self, inner: Callable[..., Tensor], lo: float = -1.0, hi: float = 1.0):
        self.inner, self.lo, self.hi = inner, lo, hi

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        return self.inner(x, sigma, **cond).clamp(self.lo, self.hi)
