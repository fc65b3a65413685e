"""Parity of the sigma-space samplers with diffusers' stateful schedulers (test-only reference).

Both sides drive the same analytic eps model eps(x_t, t) on Stable Diffusion's discrete
schedule (scaled_linear, 1000 steps). diffusers runs its scheduler loop; we run our sampler on
the scheduler's own sigma grid with the denoiser D(x, sigma) = x - sigma eps(x / sqrt(1 +
sigma^2), t(sigma)), where t(sigma) is the timestep diffusers feeds the model at that sigma
(fractional for Euler's interpolated sigmas, rounded for DPM++ / UniPC with Karras sigmas).
VP schedulers (DDIM, DDPM, DPM++, UniPC) start from x_VP; our VE start is x_VP sqrt(1 +
sigma_0^2). All grids end at sigma = 0, so both results are the clean sample.
"""

from __future__ import annotations

import math

import pytest
import torch

from noisecraft.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = 12


def eps_model(x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A smooth, t-dependent, nonlinear noise prediction."""
    a = 0.3 + 0.5 * float(t) / 1000.0
    return a * x_t + 0.1 * torch.sin(3.0 * x_t)


def make_denoiser(sigmas: torch.Tensor, timesteps: torch.Tensor):
    """D(x, sigma) with t = the scheduler's timestep at the nearest scheduler sigma."""
    sig = sigmas.double()

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma[0])
        t = timesteps[int((sig[: len(timesteps)] - s).abs().argmin())]
        return x - s * eps_model(x / math.sqrt(1.0 + s * s), t)

    return denoiser


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def run_diffusers(sched, x: torch.Tensor, generator=None, **step_kw) -> torch.Tensor:
    for t in sched.timesteps:
        eps = eps_model(sched.scale_model_input(x, t), t)
        kw = dict(step_kw)
        if generator is not None:
            kw["generator"] = generator
        x = sched.step(eps, t, x, **kw).prev_sample
    return x


def unique_sigmas(sched) -> torch.Tensor:
    """The decreasing sigma grid without Heun's repeated entries."""
    s = sched.sigmas.double()
    keep = torch.cat([torch.tensor([True]), s[1:] != s[:-1]])
    return s[keep]


# ----------------------------------------------------------- VE schedulers (k-diffusion)


@pytest.mark.parametrize(
    ("name", "cls", "config"),
    [
        ("euler", "EulerDiscreteScheduler", {}),
        ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        ("heun", "HeunDiscreteScheduler", {}),
        ("lms", "LMSDiscreteScheduler", {}),
        ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}),
    ],
    ids=["euler", "euler-karras", "heun", "lms", "euler_ancestral"],
)
def test_ve_schedulers_match(name, cls, config):
    sched = getattr(diffusers, cls)(**SD, **config)
    sched.set_timesteps(STEPS)
    sigmas = unique_sigmas(sched)
    x = start_noise() * float(sigmas[0])
    stochastic = name == "euler_ancestral"
    g_ref = torch.Generator().manual_seed(42) if stochastic else None
    g_ours = torch.Generator().manual_seed(42) if stochastic else None
    ref = run_diffusers(sched, x.clone(), generator=g_ref)
    denoiser = make_denoiser(sched.sigmas, sched.timesteps)
    ours = SAMPLERS[name](denoiser, x, sigmas.float(), generator=g_ours)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    assert ref.abs().max() > 0.1  # not a trivially small result


# ---------------------------------------------------------------------- VP schedulers


def _vp_run(sched, name, sigmas, timesteps, *, seed=None, options=None, **step_kw):
    x_vp = start_noise()
    g_ref = torch.Generator().manual_seed(seed) if seed is not None else None
    g_ours = torch.Generator().manual_seed(seed) if seed is not None else None
    ref = run_diffusers(sched, x_vp.clone(), generator=g_ref, **step_kw)
    x_ve = x_vp * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    denoiser = make_denoiser(sigmas, timesteps)
    ours = SAMPLERS[name](denoiser, x_ve, sigmas.float(), generator=g_ours, **(options or {}))
    return ours, ref


@pytest.mark.parametrize(
    ("name", "cls", "config", "options"),
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, {}),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
        ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
        ("unipc", "UniPCMultistepScheduler", {}, {}),
        ("unipc", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, {}),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 3}, {"order": 3}),
    ],
    ids=[
        "dpmpp_2m",
        "dpmpp_2m-karras",
        "dpmpp_2m_sde",
        "unipc",
        "unipc-karras",
        "unipc-order3",
    ],
)
def test_multistep_schedulers_match(name, cls, config, options):
    sched = getattr(diffusers, cls)(**SD, **config)
    sched.set_timesteps(STEPS)
    assert float(sched.sigmas[-1]) == 0.0  # final_sigmas_type="zero"
    seed = 11 if name == "dpmpp_2m_sde" else None  # same generator, same noise draws
    ours, ref = _vp_run(
        sched, name, sched.sigmas.double(), sched.timesteps, seed=seed, options=options
    )
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def _alpha_sigmas(sched) -> torch.Tensor:
    abar = sched.alphas_cumprod.double()[sched.timesteps]
    return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches(eta):
    """SD's DDIM config (leading spacing, steps_offset=1, no clipping) with the final alpha set
    to one, so that the grid ends at sigma = 0 (see the module docstring of samplers/ddpm.py)."""
    sched = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(STEPS)
    ours, ref = _vp_run(
        sched, "ddim", _alpha_sigmas(sched), sched.timesteps, seed=3, options={"eta": eta}, eta=eta
    )
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_ddpm_matches():
    """DDPM with strided timesteps and the 'fixed_small' (posterior) variance."""
    sched = diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(STEPS)
    ours, ref = _vp_run(sched, "ddpm", _alpha_sigmas(sched), sched.timesteps, seed=5)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_unipc_bh1_matches_up_to_the_last_step():
    """bh1 (B(h) = h): diffusers 0.42 returns NaN on its final step to sigma = 0 (it multiplies
    B(h) = -inf by a zero residual), so compare the corrected sample at the last positive
    sigma, which diffusers keeps as ``last_sample``; ours comes from the callback."""
    sched = diffusers.UniPCMultistepScheduler(**SD, solver_type="bh1")
    sched.set_timesteps(STEPS)
    x_vp = start_noise()
    run_diffusers(sched, x_vp.clone())
    sigmas = sched.sigmas.double()
    seen: dict = {}
    ours = SAMPLERS["unipc"](
        make_denoiser(sigmas, sched.timesteps),
        x_vp * math.sqrt(1.0 + float(sigmas[0]) ** 2),
        sigmas.float(),
        callback=seen.update,
        variant="bh1",
    )
    assert seen["i"] == STEPS - 1 and torch.isfinite(ours).all()
    x_ve = sched.last_sample * math.sqrt(1.0 + float(sigmas[-2]) ** 2)
    torch.testing.assert_close(seen["x"], x_ve, atol=2e-5, rtol=1e-5)


def test_plms_with_heun_warmup_matches_pndm():
    """SD 1.x's default scheduler: PNDM with skip_prk_steps=True (leading spacing,
    steps_offset=1), final alpha set to one so the grid ends at sigma = 0."""
    sched = diffusers.PNDMScheduler(
        **SD, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1
    )
    sched.set_timesteps(STEPS)
    timesteps = torch.unique_consecutive(sched.timesteps)
    abar = sched.alphas_cumprod.double()[timesteps]
    sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x_vp = start_noise()
    ref = run_diffusers(sched, x_vp.clone())
    x_ve = x_vp * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    denoiser = make_denoiser(sigmas, timesteps)
    ours = SAMPLERS["plms"](denoiser, x_ve, sigmas.float(), warmup="heun")
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    # the default warm-up (Euler first step) is a different sampler
    default = SAMPLERS["plms"](denoiser, x_ve, sigmas.float())
    assert (default - ref).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_with_final_alpha_cumprod_matches(eta):
    """SD's own DDIM config, ``set_alpha_to_one=False``: the last step goes to
    alphas_cumprod[0] and diffusers returns that VP sample; ``final_sigma`` reproduces it."""
    sched = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(STEPS)
    a0 = float(sched.final_alpha_cumprod)
    options = {"eta": eta, "final_sigma": math.sqrt((1 - a0) / a0)}
    sigmas = _alpha_sigmas(sched)
    ours, ref = _vp_run(sched, "ddim", sigmas, sched.timesteps, seed=3, options=options, eta=eta)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    # ending at sigma = 0 is another result (by about sigma_min * eps)
    plain, _ = _vp_run(sched, "ddim", sigmas, sched.timesteps, seed=3, options={"eta": eta})
    assert (plain - ref).abs().max() > 1e-3


def test_lms_img2img_weights_on_the_full_grid_match_begin_index():
    """img2img with diffusers' LMS: after ``set_begin_index(k)`` it takes order
    min(k + 1, 4) weights on the full grid but sums only the derivatives it has."""
    sched = diffusers.LMSDiscreteScheduler(**SD)
    sched.set_timesteps(STEPS)
    start = 5
    sched.set_begin_index(start)
    sigmas = unique_sigmas(sched)
    x = start_noise() * float(sigmas[start])
    ref = x.clone()
    for t in sched.timesteps[start:]:
        ref = sched.step(eps_model(sched.scale_model_input(ref, t), t), t, ref).prev_sample
    denoiser = make_denoiser(sched.sigmas, sched.timesteps)
    tail = sigmas[start:].float()
    ours = SAMPLERS["lms"](denoiser, x, tail, history_sigmas=sigmas[:start])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    assert (SAMPLERS["lms"](denoiser, x, tail) - ref).abs().max() > 1e-3  # plain warm-up
