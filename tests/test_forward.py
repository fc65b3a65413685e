"""Forward process q and the eps / v / x0 parametrisations against their closed forms."""

from __future__ import annotations

import pytest
import torch

from noisecraft.diffusion.forward import q_mean_variance, q_posterior_mean_variance, q_sample
from noisecraft.diffusion.parametrization import (
    PREDICTIONS,
    predicted_eps,
    predicted_x0,
    target_for,
)
from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.errors import UnknownNameError

SCH = NoiseSchedule.linear(100, 1e-3, 0.2)


def _data(b=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 5, 5, generator=g, dtype=dtype)
    noise = torch.randn(b, 3, 5, 5, generator=g, dtype=dtype)
    return x0, noise


def test_q_sample_and_marginal_closed_form():
    x0, noise = _data()
    t = torch.tensor([0, 10, 50, 99])
    abar = torch.cumprod(1 - SCH.betas, 0)[t].view(-1, 1, 1, 1)
    x_t = q_sample(SCH, x0, t, noise)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    mean, var, log_var = q_mean_variance(SCH, x0, t)
    assert mean.shape == var.shape == log_var.shape == x0.shape
    torch.testing.assert_close(mean, abar.sqrt() * x0)
    torch.testing.assert_close(var, (1 - abar).expand_as(x0))
    torch.testing.assert_close(log_var, var.log())


def test_q_sample_is_the_composition_of_single_steps():
    """x_t by DDPM eq. 2 step by step has mean sqrt(abar) x0 and variance 1 - abar (eq. 4)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for beta in SCH.betas[:30]:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype)
    t = torch.full((1,), 29)
    mean, var, _ = q_mean_variance(SCH, x0[:1], t)
    assert abs(x.mean() - mean[0]) < 5e-3 and abs(x.var() - var[0]) / var[0] < 1e-2


def test_posterior_equals_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0 (DDPM eq. 6-7)."""
    x0, noise = _data()
    x_t = q_sample(SCH, x0, torch.tensor([1, 2, 40, 99]), noise)
    t = torch.tensor([1, 2, 40, 99])
    mean, var, log_var = q_posterior_mean_variance(SCH, x0, x_t, t)
    abar = torch.cumprod(1 - SCH.betas, 0)
    for i, ti in enumerate(t.tolist()):
        a_prev, a_t, alpha = abar[ti - 1], abar[ti], 1 - SCH.betas[ti]
        m_prev, m_t = a_prev.sqrt() * x0[i], a_t.sqrt() * x0[i]
        cov = alpha.sqrt() * (1 - a_prev)  # Cov(x_{t-1}, x_t | x0)
        v_t = 1 - a_t
        torch.testing.assert_close(mean[i], m_prev + cov / v_t * (x_t[i] - m_t))
        cond_var = (1 - a_prev) - cov**2 / v_t
        torch.testing.assert_close(var[i], cond_var.expand_as(x0[i]))
        beta_tilde = (1 - a_prev) / (1 - a_t) * SCH.betas[ti]  # DDPM eq. 7
        torch.testing.assert_close(var[i, 0, 0, 0], beta_tilde)
        torch.testing.assert_close(log_var[i], var[i].log())


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    x0, noise = _data(2)
    t = torch.zeros(2, dtype=torch.long)
    mean, var, log_var = q_posterior_mean_variance(SCH, x0, q_sample(SCH, x0, t, noise), t)
    torch.testing.assert_close(mean, x0)
    assert bool((var == 0).all())
    torch.testing.assert_close(log_var, SCH.posterior_variance[1].log().expand_as(x0))


def test_float32_data_stays_float32():
    x0, noise = _data(dtype=torch.float32)
    t = torch.tensor([0, 1, 2, 3])
    assert q_sample(SCH, x0, t, noise).dtype == torch.float32
    assert q_posterior_mean_variance(SCH, x0, x0, t)[0].dtype == torch.float32


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_parametrisations_round_trip(prediction):
    x0, noise = _data()
    abar = SCH.alphas_cumprod[torch.tensor([0, 5, 60, 99])].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = target_for(prediction, x0, noise, abar)
    torch.testing.assert_close(predicted_x0(x_t, out, abar, prediction), x0)
    torch.testing.assert_close(predicted_eps(x_t, out, abar, prediction), noise)


def test_v_definition_and_float_abar():
    x0, noise = _data()
    v = target_for("v", x0, noise, 0.36)  # Salimans & Ho 2022: v = alpha eps - sigma x0
    torch.testing.assert_close(v, 0.6 * noise - 0.8 * x0)
    assert target_for("eps", x0, noise, 0.5) is noise and target_for("x0", x0, noise, 0.5) is x0
    with pytest.raises(UnknownNameError, match="did you mean 'eps'"):
        predicted_x0(x0, x0, 0.5, "epsilon")
