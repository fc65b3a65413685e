"""What noisecraft runs to give one diffusers scheduler's image: :class:`DiffusersSampling`.

The rules that build it from a scheduler class and config, and the reasons behind each
field, are in :mod:`noisecraft.pipelines.diffusers_schedulers`. Also here: Stable Diffusion
1.5's scheduler config and the schedulers its users swap in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.diffusion.sigmas import discrete_timesteps, make_sigmas
from noisecraft.errors import ConfigError

#: Stable Diffusion 1.5's published ``scheduler/scheduler_config.json`` (a PNDMScheduler's;
#: pipelines build any other scheduler from it with ``from_config``). No timestep_spacing.
SD15_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "trained_betas": None,
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
    }
)

#: The schedulers SD 1.5 users swap in, as (class name, config): the ones
#: tests/test_diffusers_schedulers.py compares image for image.
SD15_SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "ddim": ("DDIMScheduler", SD15_SCHEDULER_CONFIG),
        "euler": ("EulerDiscreteScheduler", SD15_SCHEDULER_CONFIG),
        "euler_ancestral": ("EulerAncestralDiscreteScheduler", SD15_SCHEDULER_CONFIG),
        "lms": ("LMSDiscreteScheduler", SD15_SCHEDULER_CONFIG),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", SD15_SCHEDULER_CONFIG),
        "dpmpp_2m_karras": (
            "DPMSolverMultistepScheduler",
            MappingProxyType({**SD15_SCHEDULER_CONFIG, "use_karras_sigmas": True}),
        ),
        "dpmpp_2m_sde": (
            "DPMSolverMultistepScheduler",
            MappingProxyType({**SD15_SCHEDULER_CONFIG, "algorithm_type": "sde-dpmsolver++"}),
        ),
        "unipc": ("UniPCMultistepScheduler", SD15_SCHEDULER_CONFIG),
        "lcm": ("LCMScheduler", SD15_SCHEDULER_CONFIG),
    }
)


@dataclass(frozen=True)
class DiffusersSampling:
    """How noisecraft samples to give one diffusers scheduler's image.

    * ``scheduler``: the diffusers class name; ``sampler``: the noisecraft sampler.
    * ``spacing``: the :func:`make_sigmas` spacing (the config's ``timestep_spacing``, or
      karras / exponential); ``timestep_spacing`` the grid it is based on.
    * ``grid``: whose timestep grid ("euler", "ddim", "multistep"; see diffusion/sigmas.py).
    * ``quantize``: the model sees timesteps rounded to integers.
    * ``noise_scale``: initial noise of text-to-image, "sigma" (unit noise * sigma_max) or
      "vp" (* sqrt(1 + sigma_max^2): VP latents of std 1).
    * ``final_sigma``: "zero", or "sigma_min" (DDIM's last step to ``alphas_cumprod[0]``).
    * ``sigma_range``: the ends of karras / exponential sigmas, "schedule" or "grid".
    * ``original_steps``: the distillation grid of the "lcm" spacing (``LCMScheduler``'s
      ``original_inference_steps``).
    * ``options``: fixed sampler options; ``takes_eta``: whether the pipeline's ``eta``
      reaches the scheduler; ``lms_history``: LMS img2img weights on the full grid.
    """

    scheduler: str
    sampler: str
    spacing: str
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    grid: str = "euler"
    quantize: bool = False
    noise_scale: str = "sigma"
    final_sigma: str = "zero"
    sigma_range: str = "schedule"
    sigma_min: float | None = None
    sigma_max: float | None = None
    lambda_min_clipped: float = -math.inf
    original_steps: int = 50
    options: tuple[tuple[str, Any], ...] = ()
    takes_eta: bool = False
    lms_history: bool = False

    # ------------------------------------------------------------------ grids
    def _range(self, schedule: NoiseSchedule, steps: int) -> tuple[float | None, float | None]:
        lo, hi = self.sigma_min, self.sigma_max
        if self.sigma_range == "grid" and self.spacing in ("karras", "exponential"):
            base = make_sigmas(
                schedule,
                steps,
                self.timestep_spacing,
                steps_offset=self.steps_offset,
                dtype=torch.float64,
            )
            lo = float(base[-2]) if lo is None else lo
            hi = float(base[0]) if hi is None else hi
        return lo, hi

    def _check_schedule(self, schedule: NoiseSchedule) -> None:
        if math.isfinite(self.lambda_min_clipped) and bool(
            (-schedule.log_sigmas < self.lambda_min_clipped).any()
        ):
            raise ConfigError(
                f"{self.scheduler}: lambda_min_clipped={self.lambda_min_clipped} clips this "
                "schedule's timesteps, which noisecraft does not reproduce; remove the key"
            )

    def sigmas(
        self, schedule: NoiseSchedule, steps: int, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The ``steps + 1`` sigmas (ending in 0) of the scheduler's ``set_timesteps(steps)``
        (``scheduler.sigmas``; for DDIM the sigmas of ``alphas_cumprod[timesteps]``)."""
        self._check_schedule(schedule)
        lo, hi = self._range(schedule, steps)
        return make_sigmas(
            schedule,
            steps,
            self.spacing,
            steps_offset=self.steps_offset,
            sigma_min=lo,
            sigma_max=hi,
            dtype=dtype,
            grid=self.grid,
            original_steps=self.original_steps,
        )

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> Tensor:
        """The timesteps the model is called with (``scheduler.timesteps``), float64."""
        self._check_schedule(schedule)
        lo, hi = self._range(schedule, steps)
        return discrete_timesteps(
            schedule,
            steps,
            self.spacing,
            self.steps_offset,
            sigma_min=lo,
            sigma_max=hi,
            grid=self.grid,
            original_steps=self.original_steps,
        )

    # ------------------------------------------------------------------ sampling
    def initial_sigma(self, sigma_max: float) -> float:
        """Std of the text-to-image start x (VE view) given the first sigma: the pipeline's
        ``init_noise_sigma`` in VE units."""
        return math.sqrt(1.0 + sigma_max**2) if self.noise_scale == "vp" else sigma_max

    def sampler_options(
        self,
        schedule: NoiseSchedule,
        sigmas: Tensor | None = None,
        start: int = 0,
        eta: float | None = None,
    ) -> dict[str, Any]:
        """Keyword options of the sampler for a run over ``sigmas[start:]`` (``sigmas``: the
        full grid of :meth:`sigmas`; ``start`` > 0 for img2img); ``eta`` is the pipeline's."""
        options = dict(self.options)
        if eta is not None:
            if not self.takes_eta:
                raise ConfigError(
                    f"diffusers' {self.scheduler} takes no eta (only DDIM does); leave out --eta"
                )
            options["eta"] = float(eta)
        if self.final_sigma == "sigma_min":
            options["final_sigma"] = float(schedule.sigmas[0])
        if self.lms_history and start > 0 and sigmas is not None:
            options["history_sigmas"] = sigmas[:start].double()
        return options


__all__ = ["SD15_SCHEDULERS", "SD15_SCHEDULER_CONFIG", "DiffusersSampling"]
