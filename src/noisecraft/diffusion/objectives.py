"""Training losses for eps / v / x0 targets (DESIGN.md contract 5).

L_simple (DDPM eq. 14) is the per-sample mean squared error to the target, optionally
weighted by min-SNR (Hang et al. 2023). With a learned variance the improved-DDPM hybrid
loss adds lambda * L_vlb (Nichol & Dhariwal 2021 sec. 3.1), where the VLB term sees the
mean output with its gradient stopped, so it only trains the variance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion.forward import extract, noise_like, q_sample
from noisecraft.diffusion.parametrization import check_prediction, target_for
from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.diffusion.vlb import p_from_output, vlb_term
from noisecraft.errors import ConfigError, unknown_name

WEIGHTINGS = ("none", "min_snr")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the network predicts and how its error is weighted.

    ``vlb_weight`` is lambda of L_hybrid = L_simple + lambda L_vlb; since L_vlb = sum over T
    terms and one timestep is drawn per sample, the per-sample VLB term enters the loss as
    ``vlb_weight * T * L_t`` (improved-diffusion's ``vb * num_timesteps / 1000`` for 0.001).
    """

    prediction: str = "eps"
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    learned_variance: bool = False
    vlb_weight: float = 0.001

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        if self.weighting not in WEIGHTINGS:
            raise unknown_name("loss weighting", self.weighting, WEIGHTINGS)
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if self.offset_noise < 0:
            raise ConfigError(f"offset_noise must be >= 0, got {self.offset_noise}")
        if self.vlb_weight < 0:
            raise ConfigError(f"vlb_weight must be >= 0, got {self.vlb_weight}")


def min_snr_weight(snr: Tensor, prediction: str, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 8 and its eps / v forms).

    x0: min(SNR, gamma);  eps: min(SNR, gamma) / SNR;  v: min(SNR, gamma) / (SNR + 1).
    The eps weight at SNR = 0 (zero terminal SNR) is its limit, 1.
    """
    check_prediction(prediction)
    clipped = snr.clamp(max=gamma)
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1.0)
    return (gamma / snr).clamp(max=1.0)


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def training_losses(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    *,
    config: ObjectiveConfig,
    noise: Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per-sample losses for ``model(x_t, t, **model_kwargs)`` at timesteps ``t`` (B,).

    Returns (B,) tensors: "mse" (unweighted mean squared error to the target), "loss"
    (weighted mse, plus ``vlb_weight * T * vlb`` with a learned variance) and, with a
    learned variance, "vlb" (L_t in bits/dim: the KL term, or the decoder NLL at t = 0).
    Offset noise (Guttenberg 2023) adds ``offset_noise * randn(B, C, 1, 1)`` to the noise,
    drawn from ``generator`` (or the global RNG) even when ``noise`` is given.
    """
    if noise is None:
        noise = noise_like(x0, generator)
    if config.offset_noise > 0:
        offset = noise_like(x0.new_empty(x0.shape[:2] + (1,) * (x0.ndim - 2)), generator)
        noise = noise + config.offset_noise * offset
    x_t = q_sample(schedule, x0, t, noise)
    out = model(x_t, t, **(model_kwargs or {}))
    C = x0.shape[1]
    if config.learned_variance and out.shape[1] != 2 * C:
        raise ConfigError(
            f"learned_variance needs a model with {2 * C} output channels, got {out.shape[1]}; "
            "set out_channels to twice the image channels"
        )
    mean_out = out[:, :C] if config.learned_variance else out
    abar = extract(schedule.alphas_cumprod, t, x0)
    target = target_for(config.prediction, x0, noise, abar)
    mse = _mean_flat((mean_out.float() - target.float()) ** 2)
    loss = mse
    if config.weighting == "min_snr":
        snr = schedule.snr.to(t.device)[t]
        w = min_snr_weight(snr, config.prediction, config.min_snr_gamma)
        loss = loss * w.to(loss.dtype)
    result = {"mse": mse}
    if config.learned_variance:
        frozen = torch.cat([mean_out.detach(), out[:, C:]], dim=1)
        p = p_from_output(
            schedule,
            x_t,
            t,
            frozen,
            prediction=config.prediction,
            learned_variance=True,
            clip_denoised=False,
        )
        vlb = vlb_term(schedule, x0, x_t, t, p["mean"], p["log_variance"]).float()
        result["vlb"] = vlb
        loss = loss + config.vlb_weight * schedule.num_steps * vlb
    result["loss"] = loss
    return result
