"""Which noisecraft sampler, sigma grid and options give a diffusers scheduler's image.

A diffusers scheduler is a class name plus a config dict (a pipeline's
``scheduler/scheduler_config.json``). :func:`from_diffusers` maps the pair to a
:class:`~noisecraft.pipelines.diffusers_sampling.DiffusersSampling`: the sampler (contract 3),
the sigma grid (:func:`~noisecraft.diffusion.sigmas.make_sigmas` with its ``grid``), whether
the model sees rounded timesteps, the initial noise scale and the sampler options that
reproduce it. Only the choices diffusers makes beyond the math live here; the math is in
the samplers.
:func:`for_sampler` goes the other way round, from a noisecraft sampler name ("DPM++ 2M
Karras") and a pipeline's config to the scheduler diffusers users swap in for it
(``DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)``); which
scheduler that is comes from the sampler records (``SamplerRecord.diffusers_scheduler``).

The rules, as read in diffusers 0.42 (``diffusers/schedulers/``; tested image for image in
tests/test_diffusers_schedulers.py):

- **Timestep spacing.** Each class has its own default when the config has no
  ``timestep_spacing`` (SD 1.5's has none): ``DDIMScheduler`` "leading" (``__init__``
  signature), the others "linspace". ``steps_offset`` is added to "leading" timesteps only.
- **Grids.** Euler, Euler ancestral and LMS use ``steps`` timesteps, fractional for linspace,
  sigmas interpolated linearly (scheduling_euler_discrete.py ``set_timesteps``: ``np.linspace(
  0, T - 1, steps, dtype=np.float32)``, ``np.interp``). DDIM rounds the same timesteps
  (scheduling_ddim.py ``set_timesteps``: ``.round()[::-1]``; SD: 876, 751, ..., 1 at 8 steps
  with ``steps_offset=1``). DPM++ and UniPC space ``steps + 1`` points, round them and drop
  the last (scheduling_dpmsolver_multistep.py / scheduling_unipc_multistep.py
  ``set_timesteps``: ``np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1]``; for
  "leading" the ratio is ``T // (steps + 1)``). numpy rounds halves to even (499.5 -> 500 at
  8 steps), as ``torch.round`` does.
- **Karras sigmas** (``use_karras_sigmas``): rho = 7 between the schedule's own smallest and
  largest sigma (DPM++ / UniPC ``_convert_to_karras(np.flip(sigmas))``) or, for Euler and
  LMS, the ends of the spaced grid (``in_sigmas[-1]``, ``in_sigmas[0]``; the same for
  linspace), unless the config sets ``sigma_min`` / ``sigma_max``. Euler feeds the model the
  fractional ``_sigma_to_t`` (log-sigma interpolation); DPM++ and UniPC round it
  (``timesteps = np.array([self._sigma_to_t(...)]).round()``) while their updates keep the
  Karras sigma. So :attr:`DiffusersSampling.quantize` rounds the timestep in the denoiser
  (:class:`~noisecraft.diffusion.DiscreteDenoiser`), never the sigma.
- **Initial noise.** Pipelines multiply unit noise by ``scheduler.init_noise_sigma``: 1 for
  DDIM, DPM++ and UniPC (VP latents, i.e. sigma_max' = sqrt(1 + sigma_max^2) in the VE view
  the samplers use); for Euler, Euler ancestral and LMS sigma_max under "linspace" /
  "trailing" and sqrt(sigma_max^2 + 1) otherwise (``init_noise_sigma`` properties).
  img2img's ``add_noise`` is z + sigma * noise in the VE view for all of them.
- **DDIM.** ``prev_timestep = t - T // steps``; with ``set_alpha_to_one=False`` (SD) the last
  step goes to ``alphas_cumprod[0]``, not 1, and that noisy VP sample is decoded
  (``step``: ``alpha_prod_t_prev = ... else self.final_alpha_cumprod``) -> sampler option
  ``final_sigma``. ``clip_sample`` (default True!) clips x0 but not eps: not reproduced, SD
  sets it false. ``eta`` is a pipeline argument, used only by DDIM (the pipeline passes it
  where ``step`` accepts it).
- **DPM++ 2M** (``algorithm_type="dpmsolver++"``, ``solver_order=2``, midpoint): first order
  at the first step and at the last step when the final sigma is 0 (``lower_order_final =
  ... or self.config.final_sigmas_type == "zero"``), as ``sample_dpmpp_2m``;
  ``"sde-dpmsolver++"`` is ``sample_dpmpp_2m_sde`` (eta 1, one noise draw per step).
- **UniPC**: ``solver_order`` -> ``order``, ``solver_type`` bh1 / bh2 -> ``variant``,
  ``lower_order_final`` (required), corrector after every step but the last.
- **LMS**: order 4 (``step(..., order=4)``), coefficients by numerical integration of the
  Lagrange basis (exact here). In img2img the scheduler starts at ``begin_index`` and uses
  ``order = min(step_index + 1, 4)`` with the global index: weights of an order-4 polynomial
  through sigmas it never visited, of which only those of the derivatives it has are used
  (``zip(lms_coeffs, reversed(self.derivatives))``) -> sampler option ``history_sigmas``.

- **LCM** (``LCMScheduler``): timesteps from ``set_timesteps``'s "skipping step" subset of
  the ``original_inference_steps`` grid (``timestep_spacing`` is not read) -> the "lcm"
  spacing; VP latents (``init_noise_sigma`` 1); ``step`` re-noises ``c_out x0 + c_skip x``
  to the next timestep with one draw from the generator, except at the last step. The
  boundary scalings are ~(1, 0) on that grid with ``timestep_scaling`` 10 and are left out
  (:mod:`noisecraft.samplers.lcm`), so other scalings are refused.

Config keys that belong to the model (betas, ``num_train_timesteps``, ``prediction_type``,
``rescale_betas_zero_snr``, ``trained_betas``) are not read here. Values noisecraft does not
reproduce raise :class:`~noisecraft.errors.ConfigError` instead of giving another image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from noisecraft.errors import ConfigError, unknown_name
from noisecraft.pipelines.diffusers_sampling import (
    SD15_SCHEDULER_CONFIG,
    SD15_SCHEDULERS,
    DiffusersSampling,
)
from noisecraft.samplers import RECORDS, SamplerSpec, as_spec

_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------- config rules


class _Config:
    """A scheduler config read with the class's defaults; refuses what is not reproduced."""

    def __init__(self, scheduler: str, config: Mapping[str, Any], defaults: Mapping[str, Any]):
        self.scheduler = scheduler
        # diffusers' from_config keeps only the keys the class's __init__ takes
        self.values = {**defaults, **{k: v for k, v in config.items() if k in defaults}}

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def require(self, key: str, *allowed: Any) -> Any:
        value = self.values[key]
        if value not in allowed:
            want = " or ".join(repr(a) for a in allowed)
            raise ConfigError(
                f"{self.scheduler}: {key}={value!r} is not reproduced by noisecraft "
                f"(supported: {want}); change the scheduler config or pick another sampler"
            )
        return value

    def spacing(self) -> tuple[str, str]:
        """(make_sigmas spacing, timestep_spacing)."""
        ts = self.require("timestep_spacing", *_TIMESTEP_SPACINGS)
        for key, name in (
            ("use_karras_sigmas", "karras"),
            ("use_exponential_sigmas", "exponential"),
        ):
            if self.values.get(key):
                return name, ts
        if self.values.get("use_beta_sigmas"):
            self.require("use_beta_sigmas", False)
        return ts, ts

    def range(self) -> dict[str, float | None]:
        return {
            "sigma_min": self.values.get("sigma_min"),
            "sigma_max": self.values.get("sigma_max"),
        }


_SCHEDULE_KEYS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
}
_SIGMA_KEYS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def _euler_noise(timestep_spacing: str) -> str:
    # init_noise_sigma: max sigma for "linspace" / "trailing", sqrt(max^2 + 1) otherwise
    return "sigma" if timestep_spacing in ("linspace", "trailing") else "vp"


def _ddim(config: Mapping[str, Any]) -> DiffusersSampling:
    c = _Config(
        "DDIMScheduler",
        config,
        {
            **_SCHEDULE_KEYS,
            "clip_sample": True,
            "set_alpha_to_one": True,
            "steps_offset": 0,
            "thresholding": False,
            "timestep_spacing": "leading",
            "rescale_betas_zero_snr": False,
        },
    )
    c.require("clip_sample", False)
    c.require("thresholding", False)
    spacing, ts = c.spacing()
    return DiffusersSampling(
        scheduler=c.scheduler,
        sampler="ddim",
        spacing=spacing,
        timestep_spacing=ts,
        steps_offset=int(c["steps_offset"]),
        grid="ddim",
        quantize=True,
        noise_scale="vp",
        final_sigma="zero" if c["set_alpha_to_one"] else "sigma_min",
        takes_eta=True,
    )


def _euler_like(
    name: str, sampler: str, config: Mapping[str, Any], extra: Mapping[str, Any]
) -> tuple[_Config, DiffusersSampling]:
    c = _Config(
        name, config, {**_SCHEDULE_KEYS, "timestep_spacing": "linspace", "steps_offset": 0, **extra}
    )
    spacing, ts = c.spacing()
    return c, DiffusersSampling(
        scheduler=name,
        sampler=sampler,
        spacing=spacing,
        timestep_spacing=ts,
        steps_offset=int(c["steps_offset"]),
        noise_scale=_euler_noise(ts),
        sigma_range="grid",
        **c.range(),
    )


def _euler(config: Mapping[str, Any]) -> DiffusersSampling:
    c, out = _euler_like(
        "EulerDiscreteScheduler",
        "euler",
        config,
        {
            **_SIGMA_KEYS,
            "interpolation_type": "linear",
            "sigma_min": None,
            "sigma_max": None,
            "timestep_type": "discrete",
            "final_sigmas_type": "zero",
        },
    )
    c.require("interpolation_type", "linear")
    c.require("timestep_type", "discrete")
    c.require("final_sigmas_type", "zero")
    return out


def _euler_ancestral(config: Mapping[str, Any]) -> DiffusersSampling:
    return _euler_like("EulerAncestralDiscreteScheduler", "euler_ancestral", config, {})[1]


def _lms(config: Mapping[str, Any]) -> DiffusersSampling:
    _, out = _euler_like("LMSDiscreteScheduler", "lms", config, dict(_SIGMA_KEYS))
    return dataclasses.replace(out, options=(("order", 4),), lms_history=True)


def _multistep_common(c: _Config) -> dict[str, Any]:
    c.require("thresholding", False)
    c.require("final_sigmas_type", "zero")
    c.require("use_flow_sigmas", False)
    c.require("use_dynamic_shifting", False)
    spacing, ts = c.spacing()
    if spacing == "exponential":  # timesteps truncated by the int64 cast, not rounded
        c.require("use_exponential_sigmas", False)
    return dict(
        scheduler=c.scheduler,
        spacing=spacing,
        timestep_spacing=ts,
        steps_offset=int(c["steps_offset"]),
        grid="multistep",
        quantize=True,
        noise_scale="vp",
    )


_MULTISTEP_KEYS = {
    **_SCHEDULE_KEYS,
    **_SIGMA_KEYS,
    "solver_order": 2,
    "thresholding": False,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}


def _dpmpp(config: Mapping[str, Any]) -> DiffusersSampling:
    c = _Config(
        "DPMSolverMultistepScheduler",
        config,
        {
            **_MULTISTEP_KEYS,
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "euler_at_final": False,
            "use_lu_lambdas": False,
            "lambda_min_clipped": -math.inf,
            "variance_type": None,
        },
    )
    algorithm = c.require("algorithm_type", "dpmsolver++", "sde-dpmsolver++")
    c.require("solver_order", 2)
    c.require("use_lu_lambdas", False)
    c.require("variance_type", None)
    common = _multistep_common(c)
    if algorithm == "dpmsolver++":
        c.require("solver_type", "midpoint")
        sampler, options = "dpmpp_2m", ()
    else:
        solver_type = c.require("solver_type", "midpoint", "heun")
        sampler, options = "dpmpp_2m_sde", (("solver_type", solver_type),)
    return DiffusersSampling(
        sampler=sampler,
        options=options,
        lambda_min_clipped=float(c["lambda_min_clipped"]),
        **common,
    )


def _unipc(config: Mapping[str, Any]) -> DiffusersSampling:
    c = _Config(
        "UniPCMultistepScheduler",
        config,
        {
            **_MULTISTEP_KEYS,
            "predict_x0": True,
            "solver_type": "bh2",
            "disable_corrector": [],
            "solver_p": None,
            "sigma_min": None,
            "sigma_max": None,
        },
    )
    order = c.require("solver_order", 1, 2, 3)
    variant = c.require("solver_type", "bh1", "bh2")
    c.require("predict_x0", True)
    c.require("lower_order_final", True)
    c.require("disable_corrector", [], ())
    c.require("solver_p", None)
    common = _multistep_common(c)
    return DiffusersSampling(
        sampler="unipc",
        options=(("order", int(order)), ("variant", variant)),
        **c.range(),
        **common,
    )


def _lcm(config: Mapping[str, Any]) -> DiffusersSampling:
    c = _Config(
        "LCMScheduler",
        config,
        {
            **_SCHEDULE_KEYS,
            "original_inference_steps": 50,
            "clip_sample": False,
            "thresholding": False,
            "timestep_scaling": 10.0,
            "rescale_betas_zero_snr": False,
        },
    )
    c.require("clip_sample", False)
    c.require("thresholding", False)
    c.require("timestep_scaling", 10.0, 10)
    return DiffusersSampling(
        scheduler=c.scheduler,
        sampler="lcm",
        spacing="lcm",
        timestep_spacing="lcm",
        grid="ddim",
        quantize=True,
        noise_scale="vp",
        original_steps=int(c["original_inference_steps"]),
    )


_RULES: dict[str, Callable[[Mapping[str, Any]], DiffusersSampling]] = {
    "DDIMScheduler": _ddim,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "LMSDiscreteScheduler": _lms,
    "DPMSolverMultistepScheduler": _dpmpp,
    "UniPCMultistepScheduler": _unipc,
    "LCMScheduler": _lcm,
}

#: noisecraft sampler -> (diffusers class, config keys that select the algorithm), from the
#: sampler records.
_SCHEDULER_FOR: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    r.name: (r.diffusers_scheduler.cls, dict(r.diffusers_scheduler.config))
    for r in RECORDS
    if r.diffusers_scheduler is not None
}

#: Samplers :func:`for_sampler` maps to a diffusers scheduler.
DIFFUSERS_SAMPLERS = tuple(_SCHEDULER_FOR)


def from_diffusers(scheduler: str, config: Mapping[str, Any] | None = None) -> DiffusersSampling:
    """How to sample like diffusers' ``scheduler`` (class name) built with ``config``
    (``Scheduler.from_config(config)``: keys the class does not take are ignored, missing
    ones take the class's defaults)."""
    rule = _RULES.get(scheduler)
    if rule is None:
        raise unknown_name("diffusers scheduler", scheduler, _RULES)
    return rule(dict(config or {}))


def scheduler_for(
    sampler: str | SamplerSpec, config: Mapping[str, Any] | None = None, spacing: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The diffusers (class name, config) a user of ``config``'s pipeline swaps in for the
    noisecraft ``sampler`` (any spelling, e.g. "DPM++ 2M Karras", or a parsed spec); its
    explicit schedule (``spacing``, the name's suffix) sets ``use_karras_sigmas`` /
    ``use_exponential_sigmas`` / ``timestep_spacing``, and without one the config decides."""
    spec = as_spec(sampler, spacing)
    name, spacing = spec.name, spec.explicit_schedule
    if name not in _SCHEDULER_FOR:
        raise ConfigError(
            f"sampler '{name}' has no diffusers scheduler counterpart here; choose one of "
            f"{', '.join(DIFFUSERS_SAMPLERS)}"
        )
    cls, select = _SCHEDULER_FOR[name]
    cfg = {**dict(config or {}), **select}
    if spacing is not None and (name == "lcm") != (spacing == "lcm"):
        what = "has only its own lcm timesteps" if name == "lcm" else "has no lcm timesteps"
        raise ConfigError(f"diffusers' {cls} {what}; leave out the {spacing} spacing")
    if spacing in ("karras", "exponential"):
        if name in ("ddim", "euler_ancestral"):
            raise ConfigError(
                f"diffusers' {cls} has no {spacing} sigmas; leave out the {spacing} spacing"
            )
        cfg["use_karras_sigmas"] = spacing == "karras"
        cfg["use_exponential_sigmas"] = spacing == "exponential"
    elif spacing is not None and spacing != "lcm":  # leading / trailing / linspace
        cfg["timestep_spacing"] = spacing
        cfg["use_karras_sigmas"] = cfg["use_exponential_sigmas"] = False
    return cls, cfg


def for_sampler(
    sampler: str | SamplerSpec,
    config: Mapping[str, Any] | None = SD15_SCHEDULER_CONFIG,
    spacing: str | None = None,
) -> DiffusersSampling:
    """:func:`from_diffusers` of :func:`scheduler_for`: sample as diffusers does with the
    scheduler for ``sampler`` built from ``config`` (default: SD 1.5's)."""
    return from_diffusers(*scheduler_for(sampler, config, spacing))


__all__ = [
    "DIFFUSERS_SAMPLERS",
    "SD15_SCHEDULERS",
    "SD15_SCHEDULER_CONFIG",
    "DiffusersSampling",
    "for_sampler",
    "from_diffusers",
    "scheduler_for",
]
