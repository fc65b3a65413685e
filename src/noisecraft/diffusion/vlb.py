"""The variational bound in bits per dimension (DDPM sec. 3.3; improved DDPM sec. 2-3).

L = L_T + sum_{t>1} L_{t-1} + L_0 with L_T = KL(q(x_T | x0) || N(0, I)),
L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) and the discretised decoder
L_0 = -log p(x0 | x_1). Data lie in [-1, 1] on 256 bins (8-bit images). Each term is the
mean over dimensions divided by log 2, i.e. bits/dim. Index t here is 0-based: the term
at index 0 is the decoder, the term at index t >= 1 is the KL of the step t -> t-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion.forward import (
    extract,
    noise_like,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from noisecraft.diffusion.parametrization import check_prediction, predicted_x0
from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.errors import ConfigError, unknown_name

VARIANCES = ("large", "small")
_LOG2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    = 0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1).
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log of the probability mass of x's bin under N(means, e^(2 log_scales)) (DDPM eq. 13).

    Bins have width 2/255 around the 256 levels of [-1, 1]; the first and last bins
    extend to -inf and +inf. Elementwise, in nats. The CDF differences are computed in
    float64 to avoid log(0) far in the tails.
    """
    x64, m64, ls64 = x.double(), means.double(), log_scales.double()
    centered = x64 - m64
    inv_stdv = torch.exp(-ls64)
    cdf_plus = _std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-300).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-300).log()
    log_mid = (cdf_plus - cdf_min).clamp(min=1e-300).log()
    log_probs = torch.where(
        x64 < -0.999, log_cdf_plus, torch.where(x64 > 0.999, log_one_minus_cdf_min, log_mid)
    )
    return log_probs.to(x.dtype)


def fixed_log_variance(schedule: NoiseSchedule, variance: str = "large") -> Tensor:
    """log of the fixed reverse variances: "large" beta_t (with beta~_1 at t = 0, as
    improved-diffusion's fixedlarge) or "small" beta~_t (clipped at t = 0). DDPM sec. 3.2."""
    if variance not in VARIANCES:
        raise unknown_name("variance", variance, VARIANCES)
    if variance == "small":
        return schedule.posterior_log_variance_clipped
    return torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]).log()


def learned_log_variance(schedule: NoiseSchedule, v: Tensor, t: Tensor) -> Tensor:
    """IDDPM eq. 15: log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2."""
    min_log = extract(schedule.posterior_log_variance_clipped, t, v)
    max_log = extract(schedule.betas.log(), t, v)
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def p_from_output(
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    out: Tensor,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    clip_denoised: bool = True,
    variance: str = "large",
) -> dict[str, Tensor]:
    """p(x_{t-1} | x_t) from a raw model output: the mean is q's posterior mean at the
    predicted x0 (DDPM eq. 7 with x0 -> x0_hat); the variance is fixed or learned."""
    check_prediction(prediction)
    C = x_t.shape[1]
    if learned_variance:
        if out.shape[1] != 2 * C:
            raise ConfigError(
                f"learned variance needs {2 * C} output channels, the model gave {out.shape[1]}"
            )
        out, v = out[:, :C], out[:, C:]
        log_variance = learned_log_variance(schedule, v, t)
    else:
        log_variance = extract(fixed_log_variance(schedule, variance), t, x_t).expand_as(x_t)
    abar = extract(schedule.alphas_cumprod, t, x_t)
    pred_x0 = predicted_x0(x_t, out, abar, prediction)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return {
        "mean": mean,
        "variance": log_variance.exp(),
        "log_variance": log_variance,
        "pred_x0": pred_x0,
    }


def p_mean_variance(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool = True,
    variance: str = "large",
) -> dict[str, Tensor]:
    """Call ``model(x_t, t, **model_kwargs)``; p's mean, variance, log_variance and pred_x0."""
    out = model(x_t, t, **(model_kwargs or {}))
    return p_from_output(
        schedule,
        x_t,
        t,
        out,
        prediction=prediction,
        learned_variance=learned_variance,
        clip_denoised=clip_denoised,
        variance=variance,
    )


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def vlb_term(
    schedule: NoiseSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    mean: Tensor,
    log_variance: Tensor,
) -> Tensor:
    """Per-sample bits/dim of L_{t-1} = KL(q(x_{t-1}|x_t,x0) || N(mean, e^log_variance)),
    or of the decoder NLL -log p(x0 | x_1) where t == 0 (DDPM eq. 5 and 13)."""
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_variance)) / _LOG2
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / _LOG2
    return torch.where(t == 0, nll, kl)


def prior_bpd(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim, per sample."""
    t = torch.full((x0.shape[0],), schedule.num_steps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = q_mean_variance(schedule, x0, t)
    zeros = torch.zeros_like(mean)
    return _mean_flat(normal_kl(mean, log_var, zeros, zeros)) / _LOG2


@torch.no_grad()
def vlb_terms(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    timesteps: Iterable[int] | None = None,
    clip_denoised: bool = True,
    variance: str = "large",
    generator: torch.Generator | None = None,
    callback: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:
    """Every term of the bound for a batch x0 in [-1, 1] (improved-diffusion's calc_bpd_loop).

    Returns "terms" (B, n) bits/dim for the evaluated timesteps (all T by default, in
    order 0 .. T-1), "prior" (B,) and "total" (B,) = prior + sum of the terms. With a
    subset of ``timesteps`` the sum is scaled by T / n (an estimate of the full sum).
    ``callback(t)`` is called after each timestep's term (progress bars).
    """
    T = schedule.num_steps
    ts = list(range(T)) if timesteps is None else [int(i) for i in timesteps]
    if not ts or min(ts) < 0 or max(ts) >= T:
        raise ConfigError(f"timesteps must be a non-empty list of indices in [0, {T - 1}]")
    B = x0.shape[0]
    terms = []
    for i in ts:
        t = torch.full((B,), i, dtype=torch.long, device=x0.device)
        x_t = q_sample(schedule, x0, t, noise_like(x0, generator))
        p = p_mean_variance(
            model,
            schedule,
            x_t,
            t,
            prediction=prediction,
            learned_variance=learned_variance,
            model_kwargs=model_kwargs,
            clip_denoised=clip_denoised,
            variance=variance,
        )
        terms.append(vlb_term(schedule, x0, x_t, t, p["mean"], p["log_variance"]))
        if callback is not None:
            callback(i)
    terms_t = torch.stack(terms, dim=1)
    prior = prior_bpd(schedule, x0)
    total = prior + terms_t.sum(dim=1) * (T / len(ts))
    return {"terms": terms_t, "prior": prior, "total": total}


def bits_per_dim(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    batches: Iterable[Tensor],
    **kw: Any,
) -> float:
    """Mean VLB total (bits/dim) over all samples of ``batches``; kw go to :func:`vlb_terms`."""
    total, count = 0.0, 0
    for x0 in batches:
        out = vlb_terms(model, schedule, x0, **kw)["total"]
        total += float(out.double().sum())
        count += out.shape[0]
    if count == 0:
        raise ConfigError("bits_per_dim got no data; pass at least one batch")
    return total / count
