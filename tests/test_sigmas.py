"""make_sigmas / discrete_timesteps against diffusers' EulerDiscreteScheduler and eq. 5."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.diffusion.sigmas import SPACINGS, discrete_timesteps, make_sigmas
from noisecraft.errors import ConfigError, UnknownNameError

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
STEPS = [1, 10, 25, 50]


def _euler(spacing: str, steps: int, **kw) -> EulerDiscreteScheduler:
    if spacing == "karras":
        kw["use_karras_sigmas"] = True
    elif spacing == "exponential":
        kw["use_exponential_sigmas"] = True
    else:
        kw["timestep_spacing"] = spacing
    ref = EulerDiscreteScheduler(**{**SD, **kw})
    ref.set_timesteps(steps)
    return ref


def _same_alpha_bar(ref) -> NoiseSchedule:
    """Our schedule with diffusers' float32 alpha-bar (isolates the spacing logic)."""
    abar = ref.alphas_cumprod.double()
    return NoiseSchedule(1 - torch.cat([abar[:1], abar[1:] / abar[:-1]]))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_grid_spacings_equal_diffusers_euler(spacing, steps):
    ref = _euler(spacing, steps)
    # the spacing logic: equal to float32 rounding (<= 2 ulp) given the same alpha-bar
    ours = make_sigmas(_same_alpha_bar(ref), steps, spacing)
    torch.testing.assert_close(ours, ref.sigmas, rtol=3e-7, atol=0)
    # end to end from our float64 schedule: diffusers' float32 1 - abar costs ~1e-5 at t = 0
    ours = make_sigmas(NoiseSchedule.scaled_linear(), steps, spacing)
    torch.testing.assert_close(ours, ref.sigmas, rtol=3e-5, atol=0)
    ts = discrete_timesteps(NoiseSchedule.scaled_linear(), steps, spacing)
    torch.testing.assert_close(ts.float(), ref.timesteps, rtol=0, atol=1e-4)
    if spacing != "linspace":
        assert torch.equal(ts, ts.round())


@pytest.mark.parametrize("steps", [2, 10, 25, 50])
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_karras_and_exponential_equal_diffusers_euler(spacing, steps):
    ref = _euler(spacing, steps)
    ours = make_sigmas(_same_alpha_bar(ref), steps, spacing)
    torch.testing.assert_close(ours, ref.sigmas, rtol=3e-7, atol=0)
    sch = NoiseSchedule.scaled_linear()
    torch.testing.assert_close(make_sigmas(sch, steps, spacing), ref.sigmas, rtol=3e-5, atol=0)
    ts = discrete_timesteps(_same_alpha_bar(ref), steps, spacing)
    torch.testing.assert_close(ts.float(), ref.timesteps, rtol=0, atol=1e-3)


def test_zero_terminal_snr_trailing_equals_diffusers():
    ref = _euler("trailing", 25, rescale_betas_zero_snr=True)
    sch = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    torch.testing.assert_close(make_sigmas(sch, 25, "trailing"), ref.sigmas, rtol=3e-5, atol=0)
    assert make_sigmas(sch, 25, "trailing")[0] > 4000  # abar = 0 clamped to 2**-24


def test_karras_closed_form():
    """Karras et al. 2022 eq. 5 with given endpoints and rho."""
    sch = NoiseSchedule.linear(100)
    s = make_sigmas(sch, 4, "karras", rho=3.0, sigma_min=0.1, sigma_max=80.0, dtype=torch.float64)
    lo, hi = 0.1 ** (1 / 3), 80.0 ** (1 / 3)
    expected = [(hi + i / 3 * (lo - hi)) ** 3 for i in range(4)] + [0.0]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))
    e = make_sigmas(sch, 3, "exponential", sigma_min=0.1, sigma_max=10.0, dtype=torch.float64)
    torch.testing.assert_close(e, torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64))
    # default endpoints: the schedule's own smallest and largest sigma
    d = make_sigmas(sch, 7, "karras", dtype=torch.float64)
    torch.testing.assert_close(d[[0, -2]], sch.sigmas[[-1, 0]], rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 3, 30])
def test_contract_shape_order_final_zero(spacing, steps):
    sch = NoiseSchedule.cosine(100)
    s = make_sigmas(sch, steps, spacing)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32 and s[-1] == 0
    assert bool((s[1:] < s[:-1]).all())
    assert discrete_timesteps(sch, steps, spacing).shape == (steps,)


def test_leading_uses_steps_offset():
    sch = NoiseSchedule.linear(1000)
    torch.testing.assert_close(
        discrete_timesteps(sch, 4, "leading", steps_offset=0),
        torch.tensor([750.0, 500.0, 250.0, 0.0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        discrete_timesteps(sch, 4, "trailing"),
        torch.tensor([999.0, 749.0, 499.0, 249.0], dtype=torch.float64),
    )


def test_errors():
    sch = NoiseSchedule.linear(100)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            make_sigmas(sch, bad)
    with pytest.raises(UnknownNameError, match="did you mean 'karras'"):
        make_sigmas(sch, 10, "karas")
    with pytest.raises(ConfigError, match="steps <="):
        make_sigmas(sch, 101, "leading")
    assert make_sigmas(sch, 101, "linspace").shape == (102,)
    with pytest.raises(ConfigError):
        make_sigmas(sch, 10, "karras", sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(UnknownNameError, match="did you mean 'multistep'"):
        make_sigmas(sch, 10, "linspace", grid="multistp")
