"""Contract tests for every registered sampler, against closed forms on Gaussian data.

Data x0 ~ N(MU, S^2) per dimension. Then the exact denoiser is
E[x0 | x] = MU + S^2 / (S^2 + sigma^2) (x - MU), and the probability-flow ODE
dx/dsigma = (x - D) / sigma has the solution
x(sigma) = MU + sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma_0^2) (x(sigma_0) - MU).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from noisecraft.errors import ConfigError, NoisecraftError, UnknownNameError
from noisecraft.samplers import (
    REGISTRY,
    SAMPLERS,
    get_sampler,
    parse_sampler_name,
    sample_ddim,
    sample_ddpm,
    sample_dpm2,
    sample_dpm2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_unipc,
)
from noisecraft.samplers.dpmpp import _brownian_pair
from noisecraft.samplers.lms import lms_coefficient

MU, S = 0.5, 0.5
NAMES = list(SAMPLERS)
STOCHASTIC = [n for n in NAMES if REGISTRY[n].stochastic]
DETERMINISTIC = [n for n in NAMES if not REGISTRY[n].stochastic]
# samplers with no ODE limit: DDPM, and LCM's consistency steps (x0, then fresh noise)
NO_ODE = ("ddpm", "lcm")
# the deterministic (eta = 0) limit of the stochastic samplers, for the convergence test
ODE_OPTIONS = {n: {"eta": 0.0} for n in STOCHASTIC if n not in NO_ODE}


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for x0 ~ N(MU, S^2)."""
    s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def ode_solution(x: torch.Tensor, sigma_0: float, sigma: float) -> torch.Tensor:
    return MU + math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + sigma_0**2) * (x - MU)


def karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """Karras et al. 2022 eq. 5 spacing with a final 0 (built here, not from diffusion/)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


# ---------------------------------------------------------------- convergence to the ODE


def _ode_errors(
    name: str, steps: tuple[int, ...], options: dict | None = None
) -> tuple[list[float], list[float]]:
    """Error at the last positive sigma (from the callback) and of the final output."""
    options = ODE_OPTIONS.get(name, {}) if options is None else options
    x0 = torch.tensor([[-3.0, -1.0, 0.2, 2.0, 4.0]], dtype=torch.float64)
    at_min, final = [], []
    for n in steps:
        sigmas = karras(n)
        x = MU + x0 * sigmas[0]
        seen: dict = {}
        out = SAMPLERS[name](gaussian_denoiser, x, sigmas, callback=seen.update, **options)
        s0, s_last = float(sigmas[0]), float(sigmas[-2])
        at_min.append((seen["x"] - ode_solution(x, s0, s_last)).abs().max().item())
        final.append((out - ode_solution(x, s0, 0.0)).abs().max().item())
    return at_min, final


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NO_ODE])
def test_converges_to_the_ode_solution_at_its_stated_order(name):
    """The observed order (slope of log error vs log steps) is at least the stated one - 0.5.

    The error is taken at the last positive sigma (sigma_min = 0.002, from the callback): the
    final step sigma_min -> 0 has a size that does not shrink with the step count, so its
    (tiny) error would flatten the curve. The final output is checked separately.
    """
    steps = (32, 64, 128, 256)
    at_min, final = _ode_errors(name, steps)
    logn = torch.log2(torch.tensor(steps, dtype=torch.float64))
    loge = torch.log2(torch.tensor(at_min, dtype=torch.float64))
    slope = -(
        ((logn - logn.mean()) * (loge - loge.mean())).sum() / ((logn - logn.mean()) ** 2).sum()
    )
    order = REGISTRY[name].order
    assert slope >= order - 0.5, f"{name}: observed order {slope:.2f}, stated {order}"
    assert slope <= order + 1.0, f"{name}: observed order {slope:.2f} far above stated {order}"
    assert final[-1] < (0.03 if order == 1 else 2e-3)


def test_dpmpp_3m_exact_weight_is_third_order():
    """``exact=True`` weights D'' as the variation-of-constants integral does: order 3."""
    steps = (32, 64, 128, 256)
    at_min, _ = _ode_errors("dpmpp_3m_sde", steps, {"eta": 0.0, "exact": True})
    default, _ = _ode_errors("dpmpp_3m_sde", steps)
    slope = math.log2(at_min[-2] / at_min[-1])
    assert slope >= 2.5, f"observed order {slope:.2f}"
    assert at_min[-1] < default[-1]


def test_unipc_order_is_predictor_order_plus_one():
    """UniC raises UniP-p to order p + 1 (Zhao et al. 2023 Thm. 3.3)."""
    sigmas = (karras(64), karras(128))
    x0 = torch.tensor([[-3.0, 2.0, 4.0]], dtype=torch.float64)
    for order in (1, 2, 3):
        errs = []
        for sig in sigmas:
            x = MU + x0 * sig[0]
            seen: dict = {}
            sample_unipc(gaussian_denoiser, x, sig, order=order, callback=seen.update)
            errs.append((seen["x"] - ode_solution(x, float(sig[0]), float(sig[-2]))).abs().max())
        assert math.log2(errs[0] / errs[1]) > order + 0.5


# ------------------------------------------------------------- stochastic: distribution


# LCM needs a consistency function, not E[x0 | x] (test_lcm_with_the_exact_consistency_...)
STOCHASTIC_RUNS = {n: SAMPLERS[n] for n in STOCHASTIC if n != "lcm"}
STOCHASTIC_RUNS["ddim_eta1"] = functools.partial(sample_ddim, eta=1.0)


@pytest.mark.parametrize("run", list(STOCHASTIC_RUNS))
def test_stochastic_sampler_reproduces_the_data_distribution(run):
    """20000 scalars from the exact marginal at sigma_0 end with mean MU and variance S^2.

    Tolerances: 5 standard errors (mean: S / sqrt(n) = 0.0035; variance: S^2 sqrt(2 / n),
    1 %) plus 2 % for the O(1/steps) bias of ancestral sampling at 1000 steps.
    """
    n, steps = 20000, 1000
    sigmas = karras(steps).float()
    g = torch.Generator().manual_seed(1234)
    x = MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * torch.randn(n, 1, generator=g)
    y = STOCHASTIC_RUNS[run](gaussian_denoiser, x, sigmas, generator=g)
    assert y.dtype == torch.float32
    assert abs(y.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(y.var().item() / S**2 - 1) < 5 * math.sqrt(2 / n) + 0.02


def test_lcm_step_is_x0_then_fresh_noise_at_the_next_sigma():
    """Luo et al. 2023 Alg. 3 in the VE view: x <- D(x, s_i) + s_{i+1} z_i, one z per step
    drawn from the generator, and the last step returns D(x, s_{N-1}) itself."""
    x, sigmas = _inputs(4)
    g = torch.Generator().manual_seed(3)
    out = sample_lcm(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3))
    y = x
    for i in range(len(sigmas) - 1):
        d = gaussian_denoiser(y, sigmas[i].expand(len(y)))
        z = torch.randn(y.shape, generator=g)
        y = d + sigmas[i + 1] * z
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)
    one = sample_lcm(gaussian_denoiser, x, torch.tensor([float(sigmas[0]), 0.0]))
    torch.testing.assert_close(one, gaussian_denoiser(x, sigmas[:1].expand(len(x))))


def consistency_function(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact consistency function of N(MU, S^2) data: the end point at sigma = 0 of the
    probability-flow ODE through (x, sigma) (Song et al. 2023, sec. 3)."""
    s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S / (S**2 + s2).sqrt() * (x - MU)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_with_the_exact_consistency_function_samples_the_data_in_few_steps(steps):
    """Multistep consistency sampling is exact at ANY step count when f is the consistency
    function (Var f(x_i) = S^2, then + s_{i+1}^2 of fresh noise); with the denoiser E[x0 | x]
    it is not (each step shrinks the variance by S^2 / (S^2 + s^2))."""
    n = 20000
    sigmas = karras(steps, 0.5, 14.6).float()
    g = torch.Generator().manual_seed(1234)
    x = MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * torch.randn(n, 1, generator=g)
    y = sample_lcm(consistency_function, x, sigmas, generator=g)
    assert abs(y.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(y.var().item() / S**2 - 1) < 5 * math.sqrt(2 / n)
    if steps > 1:
        mmse = sample_lcm(gaussian_denoiser, x, sigmas, generator=g)
        assert mmse.var().item() / S**2 < 0.9


# ------------------------------------------------------------------ the shared contract


def _inputs(n_steps: int = 6, batch: int = 3):
    sigmas = karras(n_steps, 0.05, 20.0).float()
    x = sigmas[0] * torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    return x, sigmas


@pytest.mark.parametrize("name", NAMES)
def test_contract_callback_extra_args_and_no_mutation(name):
    x, sigmas = _inputs()
    x_before = x.clone()
    calls: list[dict] = []
    seen_sigmas: list[torch.Tensor] = []

    def denoiser(x, sigma, *, scale):
        assert sigma.shape == (x.shape[0],)
        seen_sigmas.append(sigma)
        return gaussian_denoiser(x, sigma) * scale

    out = SAMPLERS[name](
        denoiser,
        x,
        sigmas,
        generator=torch.Generator().manual_seed(0),
        callback=calls.append,
        extra_args={"scale": 1.0},
    )
    n = len(sigmas) - 1
    assert [c["i"] for c in calls] == list(range(n))
    for c in calls:
        assert set(c) == {"i", "x", "sigma", "sigma_next", "denoised"}
        assert float(c["sigma"]) == float(sigmas[c["i"]])
        assert float(c["sigma_next"]) == float(sigmas[c["i"] + 1])
        assert c["x"].shape == x.shape and c["denoised"].shape == x.shape
    assert torch.equal(x, x_before), "the sampler modified its input in place"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    # cost per step as listed: 2-call samplers make a plain Euler step to sigma = 0
    nfe = REGISTRY[name].nfe_per_step
    assert len(seen_sigmas) == nfe * n - (nfe - 1)
    assert float(seen_sigmas[0][0]) == pytest.approx(float(sigmas[0]))


@pytest.mark.parametrize("name", NAMES)
def test_contract_seeding(name):
    x, sigmas = _inputs()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        state = g.get_state()
        out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=g)
        return out, torch.equal(state, g.get_state())

    (a, untouched), (b, _), (c, _) = run(7), run(7), run(8)
    assert torch.equal(a, b)
    if name in STOCHASTIC:
        assert not untouched
        assert (a - c).abs().max() > 1e-3
    else:
        assert untouched, "a deterministic sampler drew from the generator"
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "sigmas",
    [
        torch.tensor([[1.0, 0.0]]),  # 2-D
        torch.tensor([0.0]),  # too short
        torch.tensor([2.0, 1.0, 0.5]),  # does not end in 0
        torch.tensor([1.0, 2.0, 0.0]),  # rising
        torch.tensor([2.0, 1.0, 1.0, 0.0]),  # repeated
        torch.tensor([float("nan"), 1.0, 0.0]),
    ],
    ids=["2d", "short", "no-zero", "rising", "repeated", "nan"],
)
def test_contract_rejects_bad_sigmas(name, sigmas):
    with pytest.raises(ConfigError):
        SAMPLERS[name](gaussian_denoiser, torch.zeros(1, 2), sigmas)


@pytest.mark.parametrize("name", NAMES)
def test_contract_rejects_unknown_options(name):
    x, sigmas = _inputs(2)
    with pytest.raises(ConfigError, match="no_such_option"):
        SAMPLERS[name](gaussian_denoiser, x, sigmas, no_such_option=1)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ddim", {"eta": -1.0}),
        ("euler_ancestral", {"s_noise": -1.0}),
        ("lms", {"order": 0}),
        ("plms", {"order": 5}),
        ("unipc", {"order": 4}),
        ("unipc", {"variant": "bh3"}),
        ("plms", {"warmup": "rk4"}),
        ("dpmpp_2m_sde", {"solver_type": "rk4"}),
        ("dpmpp_2m_sde_heun", {"solver_type": "midpoint"}),  # fixed by the name
        ("dpmpp_sde", {"r": 0.0}),
        ("dpm2_ancestral", {"eta": -0.5}),
        ("dpmpp_2s_ancestral", {"s_noise": -1.0}),
        ("euler", {"s_churn": -1.0}),
        ("ddim", {"final_sigma": -0.1}),
        ("lms", {"history_sigmas": [0.01]}),  # below sigmas[0]
        ("lms", {"history_sigmas": [5.0, 30.0]}),  # rising
    ],
)
def test_bad_option_values_raise_config_error(name, options):
    x, sigmas = _inputs(2)
    with pytest.raises(ConfigError):
        SAMPLERS[name](gaussian_denoiser, x, sigmas, **options)


# ------------------------------------------------------------ identities between samplers


def _gauss64(n_steps=12):
    sigmas = karras(n_steps, 0.01, 30.0)
    x = sigmas[0] * torch.randn(
        4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    return x, sigmas


def test_ddim_eta0_is_euler():
    """DDIM's update in the VE view is x0 + sigma_next eps = one Euler step (Karras sec. 3)."""
    x, sigmas = _gauss64()
    torch.testing.assert_close(
        sample_ddim(gaussian_denoiser, x, sigmas), sample_euler(gaussian_denoiser, x, sigmas)
    )


def test_ddpm_equals_ddim_eta1_and_euler_ancestral():
    """DDPM posterior (Ho eq. 7) = DDIM eta=1 (Song eq. 16) = Euler ancestral, same noise."""
    x, sigmas = _gauss64()

    def run(fn, **kw):
        return fn(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(5), **kw)

    ref = run(sample_ddpm)
    torch.testing.assert_close(run(sample_ddim, eta=1.0), ref)
    torch.testing.assert_close(run(sample_euler_ancestral), ref)
    # half the noise is a different sampler
    assert (run(sample_ddim, eta=0.5) - ref).abs().max() > 1e-3


def test_dpmpp_2m_sde_with_eta0_is_dpmpp_2m():
    x, sigmas = _gauss64()
    torch.testing.assert_close(
        sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, eta=0.0),
        sample_dpmpp_2m(gaussian_denoiser, x, sigmas),
    )


def test_ancestral_second_order_samplers_with_eta0():
    """eta = 0 leaves the deterministic method: DPM2 a -> DPM2; DPM++ SDE and DPM++ 2S a ->
    the same DPM-Solver++(2S) midpoint step (Lu et al. 2022 Alg. 1, r = 1/2)."""
    x, sigmas = _gauss64()
    ref = sample_dpm2(gaussian_denoiser, x, sigmas)
    torch.testing.assert_close(sample_dpm2_ancestral(gaussian_denoiser, x, sigmas, eta=0.0), ref)
    two_s = sample_dpmpp_2s_ancestral(gaussian_denoiser, x, sigmas, eta=0.0)
    torch.testing.assert_close(sample_dpmpp_sde(gaussian_denoiser, x, sigmas, eta=0.0), two_s)
    assert (two_s - ref).abs().max() > 1e-6  # a different second-order method


def test_dpmpp_2m_sde_heun_is_the_heun_solver_type():
    x, sigmas = _gauss64()

    def run(fn, **kw):
        return fn(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(2), **kw)

    heun = run(sample_dpmpp_2m_sde_heun)
    torch.testing.assert_close(heun, run(sample_dpmpp_2m_sde, solver_type="heun"))
    assert (heun - run(sample_dpmpp_2m_sde)).abs().max() > 1e-4


def test_dpmpp_sde_noise_is_brownian_in_sigma():
    """z1, z2: unit increments of one Brownian motion over [s_mid, s] and [sn, s], so
    Var = 1 each and Cov = sqrt((s - s_mid) / (s - sn)) (what k-diffusion's Brownian tree
    gives); 200000 draws, 5 standard errors."""
    s, s_mid, sn = 3.0, 1.2, 0.5
    g = torch.Generator().manual_seed(0)
    z1, z2 = _brownian_pair(torch.zeros(200000, dtype=torch.float64), g, s, s_mid, sn)
    tol = 5 * math.sqrt(2 / 200000)
    assert abs(z1.var().item() - 1) < tol and abs(z2.var().item() - 1) < tol
    cov = (z1 * z2).mean().item()
    assert abs(cov - math.sqrt((s - s_mid) / (s - sn))) < 5 / math.sqrt(200000)


@pytest.mark.parametrize("fn", [sample_euler, sample_heun])
def test_churn_is_seeded_noise(fn):
    """Karras Alg. 2 churn: noise only when s_churn > 0, and then from the generator."""
    x, sigmas = _gauss64()

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return fn(gaussian_denoiser, x, sigmas, generator=g, **kw)

    assert torch.equal(run(0, s_churn=5.0), run(0, s_churn=5.0))
    assert (run(0, s_churn=5.0) - run(1, s_churn=5.0)).abs().max() > 1e-4
    # s_tmax below every sigma disables churn: plain Heun
    torch.testing.assert_close(run(0, s_churn=5.0, s_tmax=1e-3), run(1))


def test_lms_coefficients_match_scipy_quad():
    """Variable-step Adams-Bashforth weights; golden values from scipy.integrate.quad."""
    from scipy import integrate

    t = [14.6, 6.1, 2.2, 0.7, 0.15, 0.0]
    for order in (1, 2, 3, 4):
        i = order  # a step with enough history
        for j in range(order):

            def basis(tau, j=j, order=order, i=i):
                prod = 1.0
                for k in range(order):
                    if k != j:
                        prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
                return prod

            ref = integrate.quad(basis, t[i], t[i + 1], epsrel=1e-12)[0]
            assert lms_coefficient(t, i, j, order) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # the weights of one step integrate constants exactly: they sum to the step size
    assert sum(lms_coefficient(t, 3, j, 4) for j in range(4)) == pytest.approx(t[4] - t[3])


# ------------------------------------------------------------------------------ registry


def test_registry_names_and_info():
    assert set(SAMPLERS) == {
        "ddpm",
        "ddim",
        "euler",
        "euler_ancestral",
        "heun",
        "dpm2",
        "dpm2_ancestral",
        "lms",
        "plms",
        "dpmpp_2m",
        "dpmpp_sde",
        "dpmpp_2s_ancestral",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_heun",
        "dpmpp_3m_sde",
        "unipc",
        "lcm",
    }
    assert list(REGISTRY) == list(SAMPLERS)
    for r in REGISTRY.values():
        assert isinstance(r.stochastic, bool) and r.order >= 1 and r.nfe_per_step in (1, 2)
        assert r.description and "\n" not in r.description
    assert set(STOCHASTIC) == {
        "ddpm",
        "euler_ancestral",
        "dpm2_ancestral",
        "dpmpp_sde",
        "dpmpp_2s_ancestral",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_heun",
        "dpmpp_3m_sde",
        "lcm",
    }


@pytest.mark.parametrize(
    ("spelling", "name", "spacing"),
    [
        ("euler", "euler", None),
        ("Euler a", "euler_ancestral", None),
        ("DPM++ 2M", "dpmpp_2m", None),
        ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
        ("DPM++ 3M SDE Exponential", "dpmpp_3m_sde", "exponential"),
        ("dpmpp_2m_karras", "dpmpp_2m", "karras"),
        ("LMS Karras", "lms", "karras"),
        ("k_euler_a", "euler_ancestral", None),
        ("k_lms", "lms", None),
        ("UniPC", "unipc", None),
        ("uni_pc", "unipc", None),
        ("DDIM", "ddim", None),
        ("PLMS", "plms", None),
        ("DPM2", "dpm2", None),
        ("Heun", "heun", None),
        ("DPM2 a", "dpm2_ancestral", None),
        ("DPM2 a Karras", "dpm2_ancestral", "karras"),
        ("k_dpm_2_a", "dpm2_ancestral", None),
        ("dpm_2_ancestral", "dpm2_ancestral", None),
        ("DPM++ 2S a", "dpmpp_2s_ancestral", None),
        ("DPM++ 2S a Karras", "dpmpp_2s_ancestral", "karras"),
        ("k_dpmpp_2s_a", "dpmpp_2s_ancestral", None),
        ("DPM++ SDE", "dpmpp_sde", None),
        ("DPM++ SDE Karras", "dpmpp_sde", "karras"),
        ("k_dpmpp_sde", "dpmpp_sde", None),
        ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", None),
        ("DPM++ 2M SDE Heun Exponential", "dpmpp_2m_sde_heun", "exponential"),
    ],
)
def test_parse_sampler_name(spelling, name, spacing):
    assert parse_sampler_name(spelling) == (name, spacing)
    assert get_sampler(spelling) is SAMPLERS[name]


def test_unknown_sampler_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="did you mean 'euler_ancestral'") as err:
        get_sampler("euler_ancestrall")
    assert isinstance(err.value, NoisecraftError)
    assert "\n" not in str(err.value)
    with pytest.raises(UnknownNameError):
        parse_sampler_name("Karras")  # a spacing alone is not a sampler
    with pytest.raises(ConfigError):
        get_sampler(None)  # type: ignore[arg-type]
