"""Samplers: pure functions over a sigma tensor (DESIGN.md contract 3).

Every sampler has the signature::

    sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, extra_args=None,
                  **options) -> Tensor

with ``denoiser(x, sigma, **extra_args) -> x0_hat`` (``sigma`` of shape (B,)), ``sigmas`` a
strictly decreasing 1-D tensor ending in 0 and ``x`` at noise level ``sigmas[0]``. ``callback``
gets ``{"i", "x", "sigma", "sigma_next", "denoised"}`` once per step. Unknown options raise
:class:`~noisecraft.errors.ConfigError`.

Each sampler has one record (:mod:`noisecraft.samplers.registry`: function, order, cost,
A1111 names, default schedule, diffusers scheduler); a request's choice is parsed once into a
:class:`~noisecraft.samplers.spec.SamplerSpec` (:func:`parse_sampler`).
"""

from __future__ import annotations

from collections.abc import Callable

from noisecraft.samplers.ddpm import sample_ddim, sample_ddpm
from noisecraft.samplers.dpmpp import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from noisecraft.samplers.euler import (
    sample_dpm2,
    sample_dpm2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from noisecraft.samplers.lcm import sample_lcm
from noisecraft.samplers.lms import sample_lms, sample_plms
from noisecraft.samplers.registry import (
    RECORDS,
    REGISTRY,
    SAMPLERS,
    SamplerRecord,
    lookup,
    sampler_choices,
)
from noisecraft.samplers.spec import SCHEDULE_LABELS, SamplerSpec, as_spec, parse_sampler
from noisecraft.samplers.unipc import sample_unipc

__all__ = [
    "RECORDS",
    "REGISTRY",
    "SAMPLERS",
    "SCHEDULE_LABELS",
    "SamplerRecord",
    "SamplerSpec",
    "as_spec",
    "get_sampler",
    "lookup",
    "parse_sampler",
    "parse_sampler_name",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm2",
    "sample_dpm2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
    "sampler_choices",
]


def parse_sampler_name(name: str) -> tuple[str, str | None]:
    """(canonical name, spacing named by a trailing "Karras" / "Exponential" or None) of any
    sampler spelling. A request's choice is better parsed once with :func:`parse_sampler`,
    which also resolves the default schedule."""
    record, schedule = lookup(name)
    return record.name, schedule


def get_sampler(name: str | SamplerSpec) -> Callable:
    """The sampler function of ``name`` (any spelling :func:`parse_sampler` takes, or a
    spec; a schedule suffix such as " Karras" is ignored here)."""
    if isinstance(name, SamplerSpec):
        return name.function
    record = REGISTRY.get(name) if isinstance(name, str) else None
    return (record or lookup(name)[0]).function
