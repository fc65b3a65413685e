"""DiscreteDenoiser (eps / v / x0 -> x0_hat) and CFGDenoiser against closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from noisecraft.diffusion.denoisers import DiscreteDenoiser
from noisecraft.diffusion.guidance import CFGDenoiser, rescale_guidance
from noisecraft.diffusion.parametrization import PREDICTIONS, target_for
from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.diffusion.sigmas import make_sigmas
from noisecraft.errors import ConfigError, UnknownNameError

SCH = NoiseSchedule.scaled_linear()
# sigmas at integer and fractional timesteps, inside the schedule's range
SIGMAS = SCH.t_to_sigma(torch.tensor([0.0, 3.5, 100.0, 421.25, 998.5]), interpolation="log")


def _abar_from_t(t: torch.Tensor) -> torch.Tensor:
    """What a network trained on the schedule 'knows': abar at its (fractional) timestep."""
    s = SCH.t_to_sigma(t.double(), interpolation="log")  # exact inverse of sigma_to_t
    return (1 / (1 + s**2)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_exact_model_returns_its_x0(prediction):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    x = x0 + SIGMAS.view(-1, 1, 1, 1) * noise
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        abar = _abar_from_t(t)
        # the network's input is the VP sample of the same x0 and noise
        torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
        return target_for(prediction, x0, noise, abar)

    out = DiscreteDenoiser(model, SCH, prediction)(x, SIGMAS)
    torch.testing.assert_close(out, x0)
    assert seen["t"].dtype == torch.float32 and seen["t"].shape == (5,)
    torch.testing.assert_close(
        seen["t"], torch.tensor([0.0, 3.5, 100.0, 421.25, 998.5]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_gaussian_oracle_gives_posterior_mean(prediction):
    """x0 ~ N(mu, s^2): E[x0 | x0 + sigma n = x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    mu, s2 = 0.3, 0.25
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 3, 3, generator=g) * 4

    def oracle(x_t, t):
        abar = _abar_from_t(t).float()
        xv = x_t / abar.sqrt()  # back to the VE view
        sigma2 = (1 - abar) / abar
        x0 = mu + s2 / (s2 + sigma2) * (xv - mu)
        eps = (xv - x0) / sigma2.sqrt()
        return target_for(prediction, x0, eps, abar)

    out = DiscreteDenoiser(oracle, SCH, prediction)(x, SIGMAS.float())
    sig2 = SIGMAS.float().view(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(out, mu + s2 / (s2 + sig2) * (x - mu), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_sigma_zero_returns_input(prediction):
    x = torch.randn(3, 2, 4, 4)
    calls = []

    def model(x_t, t):
        calls.append(t)
        return torch.full_like(x_t, 1e6)

    den = DiscreteDenoiser(model, SCH, prediction)
    assert torch.equal(den(x, 0.0), x) and not calls  # whole batch clean: no model call
    out = den(x, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.isfinite(out).all() and not torch.equal(out[1], x[1])


def test_learned_variance_keeps_first_channels_and_sigma_shapes():
    x = torch.randn(2, 3, 4, 4)
    eps = torch.randn(2, 3, 4, 4)

    def model(x_t, t):
        return torch.cat([eps, torch.full_like(eps, float("nan"))], dim=1)

    den = DiscreteDenoiser(model, SCH, "eps", learned_variance=True)
    expected = x - 2.0 * eps
    for sigma in (2.0, torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([2.0, 2.0])):
        torch.testing.assert_close(den(x, sigma), expected)
    with pytest.raises(ValueError):
        den(x, torch.tensor([1.0, 2.0, 3.0]))


def test_conditioning_is_passed_and_quantize_rounds():
    seen = {}

    def model(x_t, t, class_labels=None):
        seen["labels"], seen["t"] = class_labels, t
        return torch.zeros_like(x_t)

    den = DiscreteDenoiser(model, SCH, "eps", quantize=True)
    den(torch.zeros(2, 1, 2, 2), SIGMAS[[1, 3]], class_labels=torch.tensor([3, 4]))
    assert torch.equal(seen["labels"], torch.tensor([3, 4]))
    assert torch.equal(seen["t"], torch.tensor([4.0, 421.0]))  # 3.5 rounds half to even
    with pytest.raises(UnknownNameError):
        DiscreteDenoiser(model, SCH, "score")
    with pytest.raises(UnknownNameError):
        DiscreteDenoiser(model, SCH, timestep_interpolation="cubic")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_matches_diffusers_euler_scaling_and_x0(prediction):
    """Same model input, timestep and x0 as diffusers' Euler (SD config, linspace, 10 steps)."""
    ref = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type="epsilon" if prediction == "eps" else "v_prediction",
    )
    ref.set_timesteps(10)
    sigmas = make_sigmas(SCH, 10)
    g = torch.Generator().manual_seed(2)
    out = torch.randn(1, 4, 8, 8, generator=g)
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return out

    den = DiscreteDenoiser(model, SCH, prediction, timestep_interpolation="linear")
    for i in (0, 4, 9):
        x = torch.randn(1, 4, 8, 8, generator=g) * sigmas[i]
        ref._step_index = None
        ref._init_step_index(ref.timesteps[i])
        x0 = den(x, sigmas[i])
        torch.testing.assert_close(seen["x_t"], ref.scale_model_input(x, ref.timesteps[i]))
        torch.testing.assert_close(seen["t"], ref.timesteps[i : i + 1], atol=1e-4, rtol=0)
        step = ref.step(out, ref.timesteps[i], x)
        torch.testing.assert_close(x0, step.pred_original_sample, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ CFG
class _Recorder:
    """A denoiser whose estimate is x * (1 + sigma) + y (y: a conditioning tensor)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, y, mask=None, flag=None):
        self.calls.append(dict(x=x, sigma=sigma, y=y, mask=mask, flag=flag))
        s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
        return x * (1 + s) + y + (0 if mask is None else mask)


def test_cfg_one_batch_cond_first_and_formula():
    rec = _Recorder()
    x = torch.randn(2, 1, 3, 3)
    y, yu = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    mask = torch.rand(2, 1, 3, 3)
    cfg = CFGDenoiser(rec, 7.5, {"y": yu})
    out = cfg(x, 0.5, y=y, mask=mask, flag="keep")
    assert len(rec.calls) == 1
    call = rec.calls[0]
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["y"], torch.cat([y, yu]))
    assert torch.equal(call["mask"], torch.cat([mask, mask])) and call["flag"] == "keep"
    assert call["sigma"].shape == (4,)
    c, u = rec(x, 0.5, y, mask), rec(x, 0.5, yu, mask)
    torch.testing.assert_close(out, u + 7.5 * (c - u))


def test_cfg_scale_one_is_the_conditional_call():
    rec = _Recorder()
    x, y = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    out = CFGDenoiser(rec, 1.0, {"y": torch.randn(2, 1, 3, 3)})(x, torch.tensor([0.5, 2.0]), y=y)
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 2
    assert torch.equal(out, rec(x, torch.tensor([0.5, 2.0]), y))


def test_cfg_uncond_batch_of_one_is_broadcast_and_missing_key_is_an_error():
    rec = _Recorder()
    x, y = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    yu = torch.randn(1, 1, 2, 2)
    out = CFGDenoiser(rec, 2.0, {"y": yu})(x, 1.0, y=y)
    c, u = rec(x, 1.0, y), rec(x, 1.0, yu.expand(3, 1, 2, 2))
    torch.testing.assert_close(out, u + 2.0 * (c - u))
    with pytest.raises(ConfigError):
        CFGDenoiser(rec, 2.0, {"y": yu, "z": yu})(x, 1.0, y=y)
    with pytest.raises(ConfigError):
        CFGDenoiser(rec, 2.0, {"y": yu}, rescale=1.5)


def test_guidance_rescale():
    """Lin et al. 2023 eq. 15-16: phi = 1 gives the conditional std per sample."""
    g = torch.Generator().manual_seed(3)
    guided = torch.randn(2, 3, 4, 4, generator=g) * 3
    cond = torch.randn(2, 3, 4, 4, generator=g)
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    half = rescale_guidance(guided, cond, 0.7)
    torch.testing.assert_close(half, 0.7 * full + 0.3 * guided)

    rec = _Recorder()
    x, y, yu = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    out = CFGDenoiser(rec, 5.0, {"y": yu}, rescale=0.7)(x, 0.5, y=y)
    c, u = rec(x, 0.5, y), rec(x, 0.5, yu)
    torch.testing.assert_close(out, rescale_guidance(u + 5.0 * (c - u), c, 0.7))
