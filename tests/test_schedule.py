"""NoiseSchedule: constructors vs their formulas and vs diffusers, zero SNR, sigma <-> t, config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from noisecraft.diffusion.schedule import SCHEDULES, ZERO_SNR_ABAR, NoiseSchedule
from noisecraft.errors import ConfigError, NoisecraftError, UnknownNameError

SD = dict(beta_start=0.00085, beta_end=0.012)


def test_linear_and_scaled_linear_formulas():
    s = NoiseSchedule.linear(10, 0.001, 0.1)
    expected = [0.001 + i * (0.1 - 0.001) / 9 for i in range(10)]
    torch.testing.assert_close(s.betas, torch.tensor(expected, dtype=torch.float64))
    s = NoiseSchedule.scaled_linear(5, 0.01, 0.09)  # sqrt: 0.1 .. 0.3 in steps of 0.05
    torch.testing.assert_close(
        s.betas, torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3], dtype=torch.float64) ** 2
    )
    assert s.betas.dtype == torch.float64 and s.num_steps == 5


def test_cosine_alpha_bar_is_f_ratio():
    """improved DDPM eq. 17: abar_t = f(t + 1) / f(0) wherever beta is not clipped."""
    T, s = 50, 0.008
    sch = NoiseSchedule.cosine(T, s=s)

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(i + 1) / f(0) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(sch.alphas_cumprod[:-1], expected[:-1], rtol=1e-12, atol=0)
    assert sch.betas[-1] == 0.999  # f(T) = 0 would give beta = 1: clipped
    assert NoiseSchedule.cosine(T, max_beta=0.5).betas.max() == 0.5


def test_sigmoid_formula():
    sch = NoiseSchedule.sigmoid(3, 0.1, 0.3)
    z = torch.tensor([-6.0, 0.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(sch.betas, 0.1 + 0.2 / (1 + torch.exp(-z)))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: NoiseSchedule.linear(), dict(beta_schedule="linear")),
        (lambda: NoiseSchedule.scaled_linear(), dict(beta_schedule="scaled_linear", **SD)),
        (lambda: NoiseSchedule.cosine(), dict(beta_schedule="squaredcos_cap_v2")),
        (lambda: NoiseSchedule.sigmoid(), dict(beta_schedule="sigmoid")),
        (
            lambda: NoiseSchedule.scaled_linear().rescale_zero_terminal_snr(),
            dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, **SD),
        ),
        (
            lambda: NoiseSchedule.linear(100).rescale_zero_terminal_snr(),
            dict(beta_schedule="linear", num_train_timesteps=100, rescale_betas_zero_snr=True),
        ),
    ],
    ids=["linear", "scaled_linear", "cosine", "sigmoid", "zsnr_sd", "zsnr_linear100"],
)
def test_alphas_cumprod_match_diffusers(ours, theirs):
    """diffusers computes in float32: agreement to float32 cumprod accuracy, not bit-exact."""
    sch = ours()
    ref = DDPMScheduler(**theirs)
    torch.testing.assert_close(sch.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(sch.betas.float(), ref.betas, rtol=1e-4, atol=5e-7)


def test_derived_quantities():
    sch = NoiseSchedule.linear(20, 0.01, 0.2)
    abar = torch.cumprod(1 - sch.betas, 0)
    torch.testing.assert_close(sch.alphas_cumprod, abar)
    torch.testing.assert_close(sch.alphas_cumprod_prev[1:], abar[:-1])
    assert sch.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(sch.sigmas, ((1 - abar) / abar).sqrt())
    torch.testing.assert_close(sch.log_sigmas, sch.sigmas.log())
    torch.testing.assert_close(sch.snr, 1 / sch.sigmas**2)
    assert bool((sch.sigmas[1:] > sch.sigmas[:-1]).all())


def test_zero_terminal_snr():
    base = NoiseSchedule.scaled_linear()
    z = base.rescale_zero_terminal_snr()
    assert z.alphas_cumprod[-1] == 0.0 and z.snr[-1] == 0.0 and z.betas[-1] == 1.0
    # Algorithm 1 keeps sqrt(abar_0) and is affine in sqrt(abar)
    torch.testing.assert_close(z.alphas_cumprod[0], base.alphas_cumprod[0])
    r0, r1 = base.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    a = r0[0] / (r0[0] - r0[-1])
    torch.testing.assert_close(r1, (r0 - r0[-1]) * a)
    # sigma view: abar = 0 is clamped to 2**-24 as diffusers' Euler does -> sigma_max ~ 4096
    assert torch.isfinite(z.sigmas).all() and torch.isfinite(z.log_sigmas).all()
    assert z.sigmas[-1] == math.sqrt((1 - ZERO_SNR_ABAR) / ZERO_SNR_ABAR)
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, **SD)
    assert float(ref.sigmas.max()) == pytest.approx(float(z.sigmas[-1]), rel=1e-6)
    # applying it twice changes nothing
    torch.testing.assert_close(z.rescale_zero_terminal_snr().betas, z.betas)


def test_sigma_to_t_at_knots_and_round_trip():
    sch = NoiseSchedule.scaled_linear()
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    for interp in ("log", "linear"):
        torch.testing.assert_close(
            sch.sigma_to_t(sch.sigmas[t], interpolation=interp), t.double(), atol=1e-9, rtol=0
        )
    frac = torch.tensor([0.25, 3.5, 123.75, 998.9])
    for interp in ("log", "linear"):
        back = sch.sigma_to_t(sch.t_to_sigma(frac, interpolation=interp), interpolation=interp)
        torch.testing.assert_close(back, frac.double(), atol=1e-9, rtol=0)
    # linear: halfway in t is halfway in sigma; log: geometric mean
    mid = sch.t_to_sigma(torch.tensor(10.5))
    torch.testing.assert_close(mid, (sch.sigmas[10] + sch.sigmas[11]) / 2)
    mid = sch.t_to_sigma(torch.tensor(10.5), interpolation="log")
    torch.testing.assert_close(mid, (sch.sigmas[10] * sch.sigmas[11]).sqrt())
    # outside the range: clamped
    out = sch.sigma_to_t(torch.tensor([0.0, 1e-3, 1e4]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 999.0], dtype=torch.float64))
    assert sch.sigma_to_t(torch.ones(2, 3)).shape == (2, 3)


def test_sigma_to_t_matches_diffusers_euler():
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", **SD)
    abar = ref.alphas_cumprod.double()  # same float32 alpha-bar as diffusers
    sch = NoiseSchedule(1 - torch.cat([abar[:1], abar[1:] / abar[:-1]]))
    log_sigmas = np.log(((1 - ref.alphas_cumprod) / ref.alphas_cumprod).numpy() ** 0.5)
    sig = np.array([0.02, 0.0292, 0.1, 1.0, 3.3, 14.0, 14.6146, 20.0])
    theirs = ref._sigma_to_t(sig, log_sigmas)
    np.testing.assert_allclose(sch.sigma_to_t(torch.from_numpy(sig)).numpy(), theirs, atol=1e-4)


def test_from_name_and_errors():
    for name in SCHEDULES:
        assert NoiseSchedule.from_name(name, num_steps=10).name == name
    with pytest.raises(UnknownNameError, match="did you mean 'cosine'"):
        NoiseSchedule.from_name("cosin")
    with pytest.raises(ConfigError, match="bad arguments"):
        NoiseSchedule.from_name("linear", beta_stat=0.1)
    with pytest.raises(ConfigError):
        NoiseSchedule.linear(1)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        NoiseSchedule.linear(10, 0.0, 0.02)
    with pytest.raises(ConfigError):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(NoisecraftError):
        NoiseSchedule.linear(10).sigma_to_t(1.0, interpolation="cubic")


@pytest.mark.parametrize(
    "sch",
    [
        NoiseSchedule.linear(50, 2e-3, 0.4),
        NoiseSchedule.cosine(30, s=0.01),
        NoiseSchedule.scaled_linear().rescale_zero_terminal_snr(),
        NoiseSchedule.sigmoid(40, low=-3.0, high=4.0),
        NoiseSchedule(torch.rand(7, dtype=torch.float64) * 0.1 + 0.01, name="mine"),
    ],
    ids=repr,
)
def test_config_round_trip_is_exact(sch):
    back = NoiseSchedule.from_config(json.loads(json.dumps(sch.to_config())))
    assert torch.equal(back.betas, sch.betas)
    assert back.name == sch.name and back.zero_terminal_snr == sch.zero_terminal_snr
    with pytest.raises(ConfigError):
        NoiseSchedule.from_config({"betas": [0.1]})
