"""training_losses, min-SNR weights, the hybrid loss' stop-gradient, timestep samplers."""

from __future__ import annotations

import pytest
import torch

from noisecraft.diffusion.objectives import ObjectiveConfig, min_snr_weight, training_losses
from noisecraft.diffusion.parametrization import PREDICTIONS, target_for
from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.diffusion.timestep_sampling import (
    LossSecondMomentSampler,
    UniformSampler,
    make_timestep_sampler,
)
from noisecraft.errors import ConfigError, UnknownNameError

SCH = NoiseSchedule.cosine(50)


def _batch(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(b, 2, 4, 4, generator=g)
    t = torch.randint(0, SCH.num_steps, (b,), generator=g)
    return x0, noise, t


def _oracle(prediction, x0, noise, extra=None):
    """A model that outputs the exact target (plus ``extra`` channels if given)."""

    def model(x_t, t):
        abar = SCH.alphas_cumprod[t].view(-1, 1, 1, 1)
        out = target_for(prediction, x0, noise, abar).float()
        return out if extra is None else torch.cat([out, extra], dim=1)

    return model


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_perfect_predictor_has_zero_loss(prediction, weighting):
    x0, noise, t = _batch()
    cfg = ObjectiveConfig(prediction=prediction, weighting=weighting)
    out = training_losses(_oracle(prediction, x0, noise), SCH, x0, t, config=cfg, noise=noise)
    assert out["loss"].shape == (6,) and set(out) == {"loss", "mse"}
    assert out["loss"].abs().max() < 1e-10 and out["mse"].abs().max() < 1e-10


def test_wrong_predictor_mse_and_model_inputs():
    x0, noise, t = _batch()
    seen = {}

    def model(x_t, t_in, y=None):
        seen.update(x_t=x_t, t=t_in, y=y)
        return torch.zeros_like(x_t)

    out = training_losses(
        model, SCH, x0, t, config=ObjectiveConfig(), noise=noise, model_kwargs={"y": 3}
    )
    abar = SCH.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(seen["x_t"], abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert torch.equal(seen["t"], t) and seen["y"] == 3
    torch.testing.assert_close(out["mse"], (noise**2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out["loss"], out["mse"])


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights(prediction):
    """Hang et al. 2023: x0 min(SNR, g); eps min(SNR, g) / SNR; v min(SNR, g) / (SNR + 1)."""
    gamma = 5.0
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 20.0, 1e4], dtype=torch.float64)
    w = min_snr_weight(snr, prediction, gamma)
    m = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = {
        "x0": m,
        "v": m / (snr + 1),
        "eps": torch.cat([torch.ones(1, dtype=torch.float64), m[1:] / snr[1:]]),
    }[prediction]
    torch.testing.assert_close(w, expected)
    x0, noise, t = _batch()
    cfg = ObjectiveConfig(prediction=prediction, weighting="min_snr", min_snr_gamma=gamma)
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    out = training_losses(zero, SCH, x0, t, config=cfg, noise=noise)
    abar = SCH.alphas_cumprod[t]
    s = abar / (1 - abar)
    torch.testing.assert_close(
        out["loss"], out["mse"] * min_snr_weight(s, prediction, gamma).float()
    )


def test_offset_noise_is_per_channel_constant():
    x0 = torch.zeros(3, 2, 5, 5)
    t = torch.full((3,), 49)
    seen = {}

    def model(x_t, t):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    cfg = ObjectiveConfig(offset_noise=0.5)
    g = torch.Generator().manual_seed(0)
    training_losses(model, SCH, x0, t, config=cfg, noise=torch.zeros_like(x0), generator=g)
    x_t = seen["x_t"]
    offset = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    scale = (1 - SCH.alphas_cumprod[49]).sqrt().float()
    torch.testing.assert_close(x_t, (scale * 0.5 * offset).expand_as(x_t))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_hybrid_loss_zero_vlb_for_true_posterior(prediction):
    """Exact mean and v = -1 (variance beta~_t) make the KL terms 0 for t >= 1 (IDDPM eq. 15)."""
    x0, noise, _ = _batch()
    t = torch.tensor([1, 2, 10, 25, 40, 49])
    model = _oracle(prediction, x0, noise, extra=-torch.ones_like(x0))
    cfg = ObjectiveConfig(prediction=prediction, learned_variance=True)
    out = training_losses(model, SCH, x0, t, config=cfg, noise=noise)
    assert out["vlb"].abs().max() < 1e-4 and out["loss"].abs().max() < 1e-4
    # v = +1 (variance beta_t): KL of equal means = (r - 1 - log r) / 2, r = beta~_t / beta_t
    model = _oracle(prediction, x0, noise, extra=torch.ones_like(x0))
    vlb = training_losses(model, SCH, x0, t, config=cfg, noise=noise)["vlb"]
    r = SCH.posterior_variance[t] / SCH.betas[t]
    expected = 0.5 * (r - 1 - r.log()) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(vlb.double(), expected, rtol=1e-3, atol=1e-6)


def test_hybrid_vlb_sends_no_gradient_to_the_mean():
    x0, noise, t = _batch()
    t[0] = 0  # the decoder term too
    raw = torch.randn(6, 4, 4, 4, requires_grad=True)
    cfg = ObjectiveConfig(learned_variance=True, vlb_weight=0.01)
    out = training_losses(lambda x_t, t: raw * 1.0, SCH, x0, t, config=cfg, noise=noise)
    (out["vlb"].sum()).backward()
    assert raw.grad[:, :2].abs().max() == 0 and raw.grad[:, 2:].abs().max() > 0
    raw.grad = None
    out = training_losses(lambda x_t, t: raw * 1.0, SCH, x0, t, config=cfg, noise=noise)
    out["loss"].sum().backward()
    mse_grad = 2 * (raw[:, :2] - noise) / raw[:, :2][0].numel()
    torch.testing.assert_close(raw.grad[:, :2], mse_grad.detach())
    torch.testing.assert_close(
        out["loss"], out["mse"] + 0.01 * SCH.num_steps * out["vlb"], rtol=1e-6, atol=1e-6
    )


def test_objective_errors():
    with pytest.raises(UnknownNameError):
        ObjectiveConfig(prediction="epsilon")
    with pytest.raises(UnknownNameError, match="min_snr"):
        ObjectiveConfig(weighting="min-snr")
    with pytest.raises(ConfigError):
        ObjectiveConfig(min_snr_gamma=0)
    x0, noise, t = _batch()
    with pytest.raises(ConfigError, match="output channels"):
        training_losses(
            lambda x_t, t: x_t, SCH, x0, t, config=ObjectiveConfig(learned_variance=True)
        )


# ---------------------------------------------------------- timestep sampling
def test_uniform_sampler():
    s = make_timestep_sampler("uniform", 7)
    t, w = s.sample(5000, generator=torch.Generator().manual_seed(0))
    assert (
        t.dtype == torch.long and t.min() == 0 and t.max() == 6 and torch.equal(w, torch.ones(5000))
    )
    assert torch.bincount(t, minlength=7).min() > 600


def test_loss_second_moment_sampler():
    T = 4
    s = make_timestep_sampler("loss-second-moment", T)
    assert isinstance(s, LossSecondMomentSampler)
    torch.testing.assert_close(s.probabilities(), torch.full((T,), 0.25, dtype=torch.float64))
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for _ in range(9):
        s.update(torch.arange(T), losses)
    assert not s.warmed_up()
    s.update(torch.arange(T), losses)
    s.update(torch.tensor([3]), torch.tensor([100.0]))  # keeps only the last 10 of t = 3
    assert s.warmed_up() and s.losses[3, -1] == 100.0 and s.counts[3] == 10
    rms = torch.tensor([1.0, 2.0, 3.0, ((9 * 16 + 100.0**2) / 10) ** 0.5], dtype=torch.float64)
    expected = rms / rms.sum() * (1 - 0.001) + 0.001 / T  # improved DDPM eq. 18 + uniform mix
    torch.testing.assert_close(s.probabilities(), expected)
    # importance weights make the weighted loss unbiased: E_p[w L_t] = mean_t L_t
    t, w = s.sample(200_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, (1 / (T * expected[t])).float())
    est = (w * rms.float()[t]).mean()
    assert abs(est - rms.mean()) / rms.mean() < 0.02
    # state round trip
    s2 = LossSecondMomentSampler(T)
    s2.load_state_dict(s.state_dict())
    torch.testing.assert_close(s2.probabilities(), s.probabilities())
    with pytest.raises(ConfigError):
        LossSecondMomentSampler(T + 1).load_state_dict(s.state_dict())
    with pytest.raises(UnknownNameError):
        make_timestep_sampler("importance", T)
    assert isinstance(make_timestep_sampler("uniform", T), UniformSampler)
