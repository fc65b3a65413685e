"""One record per sampler: the function, its order and cost, its names, its default grid.

Everything else about samplers is derived from :data:`RECORDS`: the registry by canonical
name (``SAMPLERS``), the table of spellings :func:`lookup` accepts, AUTOMATIC1111's display
names written into PNG infotexts, the diffusers scheduler a sampler maps to
(:mod:`noisecraft.pipelines.diffusers_schedulers`) and the ``noisecraft samplers`` listing.

The A1111 fields follow its sampler table (webui 1.9+, ``sd_samplers_kdiffusion.py``
``samplers_k_diffusion``: name, k-diffusion function, aliases, options ``scheduler``,
``discard_next_to_last_sigma``, ``brownian_noise``; see the project's a1111-parity notes).
``default_schedule`` is the grid "Schedule type: Automatic" gives: karras / exponential
where A1111 names one, else A1111's "model default" grid, for which noisecraft uses
"linspace" (diffusers' Euler grid: uniform in timestep; A1111's own interpolates log sigma
between the training sigmas, which differs slightly). DDIM, PLMS and UniPC are A1111's
"timestep" samplers, which ignore the schedule type; DDPM is not an A1111 sampler (its
display name only follows A1111's style). LCM's default grid is "lcm", the subset of the
50-point distillation grid that diffusers' ``LCMScheduler`` samples on (A1111's "LCM",
``modules/sd_samplers_lcm.py``, also samples on that 50-point grid, with its own
interpolated subset of it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from noisecraft.errors import ConfigError, UnknownNameError, closest
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
from noisecraft.samplers.unipc import sample_unipc

#: Grids a record may name as its default (the ones A1111's table uses, linspace, lcm).
DEFAULT_SCHEDULES = ("linspace", "karras", "exponential", "lcm")


@dataclass(frozen=True)
class DiffusersScheduler:
    """The diffusers scheduler class that runs a sampler, and the config keys that select
    the algorithm (applied over a pipeline's config by ``from_config``)."""

    cls: str
    config: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SamplerRecord:
    """Everything noisecraft knows about one sampler.

    * ``name``: canonical name (``SAMPLERS`` key); ``function``: the sampler (contract 3).
    * ``stochastic``: draws noise by default; ``order``: order of the ODE solver as run by
      default (stochastic samplers: of their eta = 0 limit), the one tests/test_samplers.py
      observes on the exact Gaussian denoiser; ``nfe_per_step``: denoiser calls per step.
    * ``a1111_names``: AUTOMATIC1111's display name first (written into infotexts), then
      its other spellings (``k_*`` aliases); ``aliases``: other tools' spellings.
    * ``k_diffusion``: the k-diffusion function it equals step for step, or None.
    * ``default_schedule``: the grid of "Schedule type: Automatic" (module docstring);
      ``discard_penultimate_sigma``: A1111's ``discard_next_to_last_sigma`` (build the grid
      for steps + 1 and drop its second-to-last sigma); ``brownian_noise``: A1111 feeds it
      Brownian-tree noise (noisecraft draws from the generator; see docs/samplers.md).
    * ``diffusers_scheduler``: the diffusers scheduler it maps to, or None.
    """

    name: str
    function: Callable
    stochastic: bool
    order: int
    nfe_per_step: int
    description: str
    a1111_names: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    k_diffusion: str | None = None
    default_schedule: str = "linspace"
    discard_penultimate_sigma: bool = False
    brownian_noise: bool = False
    diffusers_scheduler: DiffusersScheduler | None = None

    @property
    def display(self) -> str:
        """The A1111 display name (infotext ``Sampler:``)."""
        return self.a1111_names[0]

    def spellings(self) -> tuple[str, ...]:
        """Every name this record answers to."""
        return (self.name, *self.a1111_names, *self.aliases)


_DPMPP = "DPMSolverMultistepScheduler"

RECORDS: tuple[SamplerRecord, ...] = (
    SamplerRecord(
        name="ddpm",
        function=sample_ddpm,
        stochastic=True,
        order=1,
        nfe_per_step=1,
        description="DDPM ancestral sampling, posterior variance (Ho et al. 2020)",
        a1111_names=("DDPM",),
    ),
    SamplerRecord(
        name="ddim",
        function=sample_ddim,
        stochastic=False,
        order=1,
        nfe_per_step=1,
        description="DDIM, eta=0 by default; eta=1 is DDPM (Song et al. 2021)",
        a1111_names=("DDIM",),
        diffusers_scheduler=DiffusersScheduler("DDIMScheduler"),
    ),
    SamplerRecord(
        name="euler",
        function=sample_euler,
        stochastic=False,
        order=1,
        nfe_per_step=1,
        description="Euler on the probability-flow ODE (Karras et al. 2022)",
        a1111_names=("Euler", "k_euler"),
        k_diffusion="sample_euler",
        diffusers_scheduler=DiffusersScheduler("EulerDiscreteScheduler"),
    ),
    SamplerRecord(
        name="euler_ancestral",
        function=sample_euler_ancestral,
        stochastic=True,
        order=1,
        nfe_per_step=1,
        description="Euler step + fresh noise each step ('Euler a')",
        a1111_names=("Euler a", "k_euler_a", "k_euler_ancestral"),
        k_diffusion="sample_euler_ancestral",
        diffusers_scheduler=DiffusersScheduler("EulerAncestralDiscreteScheduler"),
    ),
    SamplerRecord(
        name="heun",
        function=sample_heun,
        stochastic=False,
        order=2,
        nfe_per_step=2,
        description="Heun's 2nd-order method (Karras et al. 2022 Alg. 1)",
        a1111_names=("Heun", "k_heun"),
        k_diffusion="sample_heun",
    ),
    SamplerRecord(
        name="dpm2",
        function=sample_dpm2,
        stochastic=False,
        order=2,
        nfe_per_step=2,
        description="DPM-Solver-2, midpoint in log-sigma (k-diffusion)",
        a1111_names=("DPM2", "k_dpm_2"),
        k_diffusion="sample_dpm_2",
        default_schedule="karras",
        discard_penultimate_sigma=True,
    ),
    SamplerRecord(
        name="dpm2_ancestral",
        function=sample_dpm2_ancestral,
        stochastic=True,
        order=2,
        nfe_per_step=2,
        description="DPM-Solver-2 step + fresh noise each step ('DPM2 a')",
        a1111_names=("DPM2 a", "k_dpm_2_a"),
        aliases=("dpm_2_ancestral",),
        k_diffusion="sample_dpm_2_ancestral",
        default_schedule="karras",
        discard_penultimate_sigma=True,
    ),
    SamplerRecord(
        name="lms",
        function=sample_lms,
        stochastic=False,
        order=4,
        nfe_per_step=1,
        description="linear multistep, order 4, variable-step weights (k-diffusion)",
        a1111_names=("LMS", "k_lms"),
        k_diffusion="sample_lms",
        diffusers_scheduler=DiffusersScheduler("LMSDiscreteScheduler"),
    ),
    SamplerRecord(
        name="plms",
        function=sample_plms,
        stochastic=False,
        order=2,
        nfe_per_step=1,
        description="pseudo linear multistep, 4-step fixed weights (PNDM, Liu et al. 2022)",
        a1111_names=("PLMS",),
    ),
    SamplerRecord(
        name="dpmpp_2m",
        function=sample_dpmpp_2m,
        stochastic=False,
        order=2,
        nfe_per_step=1,
        description="DPM-Solver++(2M) multistep (Lu et al. 2022)",
        a1111_names=("DPM++ 2M", "k_dpmpp_2m"),
        aliases=("dpm_solver_pp_2m",),
        k_diffusion="sample_dpmpp_2m",
        default_schedule="karras",
        diffusers_scheduler=DiffusersScheduler(_DPMPP, (("algorithm_type", "dpmsolver++"),)),
    ),
    SamplerRecord(
        name="dpmpp_sde",
        function=sample_dpmpp_sde,
        stochastic=True,
        order=2,
        nfe_per_step=2,
        description="DPM-Solver++(2S) SDE, Brownian noise in sigma, eta=1 (k-diffusion)",
        a1111_names=("DPM++ SDE", "k_dpmpp_sde"),
        k_diffusion="sample_dpmpp_sde",
        default_schedule="karras",
        brownian_noise=True,
    ),
    SamplerRecord(
        name="dpmpp_2s_ancestral",
        function=sample_dpmpp_2s_ancestral,
        stochastic=True,
        order=2,
        nfe_per_step=2,
        description="DPM-Solver++(2S) step + fresh noise each step ('DPM++ 2S a')",
        a1111_names=("DPM++ 2S a", "k_dpmpp_2s_a"),
        k_diffusion="sample_dpmpp_2s_ancestral",
        default_schedule="karras",
    ),
    SamplerRecord(
        name="dpmpp_2m_sde",
        function=sample_dpmpp_2m_sde,
        stochastic=True,
        order=2,
        nfe_per_step=1,
        description="DPM-Solver++(2M) SDE variant, eta=1",
        a1111_names=("DPM++ 2M SDE", "k_dpmpp_2m_sde"),
        k_diffusion="sample_dpmpp_2m_sde",
        default_schedule="exponential",
        brownian_noise=True,
        diffusers_scheduler=DiffusersScheduler(_DPMPP, (("algorithm_type", "sde-dpmsolver++"),)),
    ),
    SamplerRecord(
        name="dpmpp_2m_sde_heun",
        function=sample_dpmpp_2m_sde_heun,
        stochastic=True,
        order=2,
        nfe_per_step=1,
        description="DPM-Solver++(2M) SDE with the Heun-type 2nd-order weight, eta=1",
        a1111_names=("DPM++ 2M SDE Heun", "k_dpmpp_2m_sde_heun"),
        k_diffusion="sample_dpmpp_2m_sde",  # solver_type="heun"
        default_schedule="exponential",
        brownian_noise=True,
        diffusers_scheduler=DiffusersScheduler(
            _DPMPP, (("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun"))
        ),
    ),
    SamplerRecord(
        name="dpmpp_3m_sde",
        function=sample_dpmpp_3m_sde,
        stochastic=True,
        order=2,
        nfe_per_step=1,
        description="DPM-Solver++(3M) SDE as k-diffusion, eta=1 (exact=True: 3rd order)",
        a1111_names=("DPM++ 3M SDE", "k_dpmpp_3m_sde"),
        k_diffusion="sample_dpmpp_3m_sde",
        default_schedule="exponential",
        discard_penultimate_sigma=True,
        brownian_noise=True,
    ),
    SamplerRecord(
        name="unipc",
        function=sample_unipc,
        stochastic=False,
        order=3,
        nfe_per_step=1,
        description="UniPC bh2 predictor-corrector, order 2+1 (Zhao et al. 2023)",
        a1111_names=("UniPC",),
        aliases=("uni_pc", "uni_pc_bh2"),
        diffusers_scheduler=DiffusersScheduler("UniPCMultistepScheduler"),
    ),
    SamplerRecord(
        name="lcm",
        function=sample_lcm,
        stochastic=True,
        order=1,
        nfe_per_step=1,
        description="latent consistency multistep: x0, then fresh noise (Luo et al. 2023)",
        a1111_names=("LCM", "k_lcm"),
        default_schedule="lcm",
        diffusers_scheduler=DiffusersScheduler("LCMScheduler"),
    ),
)

#: Canonical name -> record, in listing order.
REGISTRY: Mapping[str, SamplerRecord] = MappingProxyType({r.name: r for r in RECORDS})

#: Canonical name -> sampler function (contract 3: "registered by name").
SAMPLERS: Mapping[str, Callable] = MappingProxyType({r.name: r.function for r in RECORDS})

#: Schedule words a sampler name may end with (A1111's older "DPM++ 2M Karras" spellings).
_SCHEDULE_SUFFIXES = {"karras": "karras", "exponential": "exponential"}


def normalize(name: str) -> tuple[str, str | None]:
    """(lookup key, schedule named by a trailing word or None) of a sampler spelling:
    lower case, "++" -> "pp", words joined by "_", a "k_" prefix dropped, so that
    "DPM++ 2M Karras", "dpmpp_2m_karras" and "k_dpmpp_2m" meet."""
    key = name.strip().lower().replace("++", "pp").replace("-", " ").replace("_", " ")
    words = key.split()
    schedule = None
    if len(words) > 1 and words[-1] in _SCHEDULE_SUFFIXES:
        schedule, words = _SCHEDULE_SUFFIXES[words[-1]], words[:-1]
    key = "_".join(words)
    if key.startswith("k_") and key[2:]:
        key = key[2:]
    return key, schedule


def _spelling_table() -> Mapping[str, SamplerRecord]:
    table: dict[str, SamplerRecord] = {}
    for record in RECORDS:
        if record.default_schedule not in DEFAULT_SCHEDULES:
            raise AssertionError(f"{record.name}: default_schedule {record.default_schedule}")
        for spelling in record.spellings():
            key, schedule = normalize(spelling)
            if schedule is not None or table.get(key, record) is not record:
                raise AssertionError(f"sampler spelling {spelling!r} is ambiguous")
            table[key] = record
    return MappingProxyType(table)


_BY_SPELLING = _spelling_table()


def sampler_choices() -> list[str]:
    """Every canonical name with its A1111 display name, for messages and listings."""
    return [r.name if r.display.lower() == r.name else f"{r.name} ({r.display})" for r in RECORDS]


def lookup(name: str) -> tuple[SamplerRecord, str | None]:
    """The record of any spelling (canonical, A1111's "DPM++ 2M Karras" / "k_dpmpp_2m",
    ComfyUI's "uni_pc"), and the schedule its trailing word names (or None)."""
    if not isinstance(name, str):
        raise ConfigError(f"sampler name must be a string, got {type(name).__name__}")
    key, schedule = normalize(name)
    record = _BY_SPELLING.get(key)
    if record is None:
        names = [s for r in RECORDS for s in (r.name, r.display)]
        guess = closest(name, names)
        hint = f"did you mean '{guess}'? " if guess else ""
        raise UnknownNameError(
            f"unknown sampler '{name}'; {hint}choose one of: {', '.join(sampler_choices())}"
        )
    return record, schedule


__all__ = [
    "DEFAULT_SCHEDULES",
    "RECORDS",
    "REGISTRY",
    "SAMPLERS",
    "DiffusersScheduler",
    "SamplerRecord",
    "lookup",
    "normalize",
    "sampler_choices",
]
