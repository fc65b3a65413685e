"""Every sampler that k-diffusion also has equals k-diffusion's function (test-only reference).

k-diffusion 0.1.1.post1 (installed ``--no-deps`` with torchsde, torchdiffeq and trampoline by
the Makefile's setup; the tests skip without it) is what AUTOMATIC1111 runs. Its package
``__init__`` imports training code (torchvision, ...), so ``k_diffusion/sampling.py`` is
loaded alone, with a stub of the one helper it takes from ``utils``. Both sides get the same
denoiser (a smooth nonlinear one, on SD's noise levels), the same float64 sigmas and the
same noise: k-diffusion's ``noise_sampler`` hands out the draws our sampler takes from its
generator, in our draw order (one per step, the last included; DPM++ SDE two per step,
combined into the Brownian increments the sampler uses, see ``dpmpp._brownian_pair``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from noisecraft.diffusion import NoiseSchedule
from noisecraft.samplers import RECORDS, parse_sampler

PAIRS = [r for r in RECORDS if r.k_diffusion is not None]
#: k-diffusion options that select the variant a record names
K_OPTIONS = {"dpmpp_2m_sde_heun": {"solver_type": "heun"}}
SD = NoiseSchedule.scaled_linear(1000)
STEPS = 10
_PKG = "_kdiffusion_reference"


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's sampling module, loaded from its file without the package."""
    found = importlib.util.find_spec("k_diffusion")
    if found is None or not found.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (make setup installs it, --no-deps)")
    path = Path(next(iter(found.submodule_search_locations))) / "sampling.py"
    package = types.ModuleType(_PKG)
    package.__path__ = []
    utils = types.ModuleType(f"{_PKG}.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    spec = importlib.util.spec_from_file_location(f"{_PKG}.sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.update({_PKG: package, f"{_PKG}.utils": utils, f"{_PKG}.sampling": module})
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"k-diffusion's sampling.py needs {e.name}")
    finally:
        for name in (_PKG, f"{_PKG}.utils", f"{_PKG}.sampling"):
            sys.modules.pop(name, None)
    return module


def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), sigma), eps smooth and nonlinear."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    x_vp = x / torch.sqrt(1.0 + s * s)
    eps = (0.4 + 0.3 * torch.tanh(torch.log(s))) * x_vp + 0.2 * torch.sin(2.0 * x_vp)
    return x - s * eps


class ReplayedNoise:
    """k-diffusion ``noise_sampler(sigma, sigma_next)`` that returns our sampler's draws."""

    def __init__(self, sigmas: torch.Tensor, draws: list[torch.Tensor], per_step: int):
        self.sigmas, self.draws, self.per_step = sigmas, draws, per_step
        self.calls = 0

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        i = int((self.sigmas - float(sigma)).abs().argmin())
        if self.per_step == 1:
            return self.draws[i]
        # DPM++ SDE: (W(s) - W(s_mid)) / sqrt(s - s_mid), or over [sn, s]: one Brownian path
        a, b = self.draws[2 * i], self.draws[2 * i + 1]
        s, sn = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if not math.isclose(float(sigma_next), sn, rel_tol=1e-9):
            return a
        s_mid = s * math.exp(-0.5 * math.log(s / sn))
        return (a * math.sqrt(s - s_mid) + b * math.sqrt(s_mid - sn)) / math.sqrt(s - sn)


def _grids(name: str) -> dict[str, torch.Tensor]:
    ramp = torch.linspace(0, 1, STEPS, dtype=torch.float64)
    lo, hi = 0.03 ** (1 / 7), 14.6 ** (1 / 7)
    karras = torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])
    # the A1111 default grid of the sampler on SD's schedule (e.g. 3M SDE: exponential with
    # the penultimate sigma dropped)
    return {"karras": karras, "a1111": parse_sampler(name).sigmas(SD, STEPS, torch.float64)}


def test_every_shared_sampler_is_compared(kd):
    names = {r.name for r in PAIRS}
    assert {"euler", "dpmpp_2m", "dpmpp_sde", "dpmpp_2s_ancestral", "dpm2_ancestral"} <= names
    assert {"dpmpp_3m_sde", "dpmpp_2m_sde", "lms", "heun", "dpm2", "euler_ancestral"} <= names
    for r in PAIRS:
        assert callable(getattr(kd, r.k_diffusion)), r.k_diffusion


@pytest.mark.parametrize("grid", ["karras", "a1111"])
@pytest.mark.parametrize("record", PAIRS, ids=[r.name for r in PAIRS])
def test_sampler_equals_k_diffusion(kd, record, grid):
    sigmas = _grids(record.name)[grid]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x * float(sigmas[0])
    ours = record.function(denoiser, x, sigmas, generator=torch.Generator().manual_seed(7))

    kwargs = dict(K_OPTIONS.get(record.name, {}))
    noise = None
    if record.stochastic:
        per_step = record.nfe_per_step if record.name == "dpmpp_sde" else 1
        g = torch.Generator().manual_seed(7)
        draws = [
            torch.randn(x.shape, generator=g, dtype=x.dtype)
            for _ in range(per_step * (len(sigmas) - 1))
        ]
        noise = kwargs["noise_sampler"] = ReplayedNoise(sigmas, draws, per_step)
    ref = getattr(kd, record.k_diffusion)(denoiser, x, sigmas, disable=True, **kwargs)

    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert ref.abs().max() > 0.1
    if noise is not None:  # the replayed noise was used: another seed gives another image
        assert noise.calls >= len(sigmas) - 2
        other = record.function(denoiser, x, sigmas, generator=torch.Generator().manual_seed(8))
        assert (other - ref).abs().max() > 1e-3
