"""Samplers: pure functions over a sigma tensor (DESIGN.md contract 3).

Every sampler has the signature::

    sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, extra_args=None,
                  **options) -> Tensor

with ``denoiser(x, sigma, **extra_args) -> x0_hat`` (``sigma`` of shape (B,)), ``sigmas`` a
strictly decreasing 1-D tensor ending in 0 and ``x`` at noise level ``sigmas[0]``. ``callback``
gets ``{"i", "x", "sigma", "sigma_next", "denoised"}`` once per step. Unknown options raise
:class:`~noisecraft.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable

from noisecraft.errors import ConfigError, unknown_name
from noisecraft.samplers.ddpm import sample_ddim, sample_ddpm
from noisecraft.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde
from noisecraft.samplers.euler import sample_dpm2, sample_euler, sample_euler_ancestral, sample_heun
from noisecraft.samplers.lms import sample_lms, sample_plms
from noisecraft.samplers.unipc import sample_unipc

__all__ = [
    "SAMPLERS",
    "SAMPLER_INFO",
    "get_sampler",
    "parse_sampler_name",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm2",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
]

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "lms": sample_lms,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "unipc": sample_unipc,
}

# name -> (stochastic, order of the ODE/SDE solver as run by default, denoiser calls per step,
# description). Orders are the ones tests/test_samplers.py observes on an exact Gaussian
# denoiser (stochastic samplers: the order of their eta = 0 limit).
SAMPLER_INFO: dict[str, tuple[bool, int, int, str]] = {
    "ddpm": (True, 1, 1, "DDPM ancestral sampling, posterior variance (Ho et al. 2020)"),
    "ddim": (False, 1, 1, "DDIM, eta=0 by default; eta=1 is DDPM (Song et al. 2021)"),
    "euler": (False, 1, 1, "Euler on the probability-flow ODE (Karras et al. 2022)"),
    "euler_ancestral": (True, 1, 1, "Euler step + fresh noise each step ('Euler a')"),
    "heun": (False, 2, 2, "Heun's 2nd-order method (Karras et al. 2022 Alg. 1)"),
    "dpm2": (False, 2, 2, "DPM-Solver-2, midpoint in log-sigma (k-diffusion)"),
    "lms": (False, 4, 1, "linear multistep, order 4, variable-step weights (k-diffusion)"),
    "plms": (False, 2, 1, "pseudo linear multistep, 4-step fixed weights (PNDM, Liu et al. 2022)"),
    "dpmpp_2m": (False, 2, 1, "DPM-Solver++(2M) multistep (Lu et al. 2022)"),
    "dpmpp_2m_sde": (True, 2, 1, "DPM-Solver++(2M) SDE variant, eta=1"),
    "dpmpp_3m_sde": (
        True,
        2,
        1,
        "DPM-Solver++(3M) SDE as k-diffusion, eta=1 (exact=True: 3rd order)",
    ),
    "unipc": (False, 3, 1, "UniPC bh2 predictor-corrector, order 2+1 (Zhao et al. 2023)"),
}

# Alternative spellings (after normalisation, see parse_sampler_name) -> canonical name.
_ALIASES = {
    "euler_a": "euler_ancestral",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
    "dpm_2": "dpm2",
    "dpm_solver_pp_2m": "dpmpp_2m",
}

_SPACING_SUFFIXES = (("karras", "karras"), ("exponential", "exponential"))


def parse_sampler_name(name: str) -> tuple[str, str | None]:
    """Split a sampler name into (canonical name, sigma spacing or None).

    Accepts the canonical names, AUTOMATIC1111 spellings ("Euler a", "DPM++ 2M Karras",
    "DPM++ 3M SDE Exponential", "UniPC"), k-diffusion's ``k_`` prefix and ComfyUI's
    ("uni_pc", "dpmpp_2m_sde"). A trailing "Karras" / "Exponential" becomes the spacing.
    """
    if not isinstance(name, str):
        raise ConfigError(f"sampler name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("++", "pp").replace("-", " ").replace("_", " ")
    words = key.split()
    spacing = None
    for suffix, value in _SPACING_SUFFIXES:
        if len(words) > 1 and words[-1] == suffix:
            spacing, words = value, words[:-1]
            break
    key = "_".join(words)
    if key.startswith("k_") and key[2:]:
        key = key[2:]
    key = _ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise unknown_name("sampler", name, SAMPLERS)
    return key, spacing


def get_sampler(name: str) -> Callable:
    """The sampler function registered under ``name`` (any spelling parse_sampler_name takes;
    a spacing suffix such as " Karras" is ignored here)."""
    return SAMPLERS[parse_sampler_name(name)[0]]
