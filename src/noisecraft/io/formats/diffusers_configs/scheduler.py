"""A diffusers ``scheduler/scheduler_config.json`` <-> our noise schedule and prediction.

The schedule follows diffusers' schedulers (``beta_schedule`` linear / scaled_linear /
squaredcos_cap_v2 / sigmoid, ``trained_betas``, ``rescale_betas_zero_snr``). The scheduler's
class and its sampling options (:data:`SCHEDULER_OPTIONS`) are kept by the reader; the writer
falls back to :data:`DEFAULT_SCHEDULER` (see :mod:`..diffusers_folder`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.formats.diffusers_files import one_line

__all__ = [
    "DEFAULT_SCHEDULER",
    "PREDICTIONS",
    "SCHEDULER_OPTIONS",
    "schedule_from_diffusers",
    "schedule_to_diffusers",
]

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

#: Sampling options kept in ``info.diffusion["scheduler"]`` (None: absent, the class default).
SCHEDULER_OPTIONS = ("timestep_spacing", "steps_offset", "use_karras_sigmas")
#: What a folder is written with when the model came with no scheduler (see
#: :mod:`..diffusers_folder`): Euler with linspace spacing, which the ``euler`` sampler
#: reproduces step for step.
DEFAULT_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "timestep_spacing": "linspace",
    "steps_offset": 1,  # Stable Diffusion's published value; only "leading" spacing reads it
    "use_karras_sigmas": False,
    "interpolation_type": "linear",
}


def schedule_from_diffusers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "scheduler/scheduler_config.json"
) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction) of a diffusers scheduler config.

    As diffusers' schedulers: ``trained_betas`` wins over ``beta_schedule``; linear and
    scaled_linear (linear in sqrt(beta)) from ``beta_start`` to ``beta_end``,
    ``squaredcos_cap_v2`` the improved-DDPM cosine (s = 0.008, betas capped at 0.999),
    ``sigmoid`` as DDPMScheduler's; ``rescale_betas_zero_snr`` applies Lin et al. 2023.
    ``prediction_type`` epsilon / v_prediction / sample -> "eps" / "v" / "x0".
    """

    def bad(field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field}={value!r} is not supported ({expected})")

    steps = d.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise bad("num_train_timesteps", steps, "an integer >= 2")
    start, end = d.get("beta_start", 0.0001), d.get("beta_end", 0.02)
    trained = d.get("trained_betas")
    kind = d.get("beta_schedule", "linear")
    try:
        if trained is not None:
            if not isinstance(trained, list) or len(trained) != steps:
                raise bad("trained_betas", "...", f"a list of num_train_timesteps={steps} betas")
            schedule = NoiseSchedule(torch.tensor(trained, dtype=torch.float64))
        elif kind == "linear":
            schedule = NoiseSchedule.linear(steps, start, end)
        elif kind == "scaled_linear":
            schedule = NoiseSchedule.scaled_linear(steps, start, end)
        elif kind == "squaredcos_cap_v2":
            schedule = NoiseSchedule.cosine(steps)
        elif kind == "sigmoid":
            schedule = NoiseSchedule.sigmoid(steps, start, end)
        else:
            raise bad("beta_schedule", kind, f"one of {', '.join(_BETA_SCHEDULES)}")
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {one_line(e)}") from None
    if d.get("rescale_betas_zero_snr", False):
        schedule = schedule.rescale_zero_terminal_snr()
    prediction_type = d.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTIONS:
        raise bad("prediction_type", prediction_type, f"one of {', '.join(PREDICTIONS)}")
    return schedule, PREDICTIONS[prediction_type]


def schedule_to_diffusers(schedule: NoiseSchedule, prediction: str) -> dict[str, Any]:
    """The schedule keys of a diffusers scheduler config (inverse of the above).

    Named schedules with diffusers' parameters are written by name; any other is written
    as ``trained_betas`` (float64 values in JSON, read back exactly).
    """
    params = schedule.params
    base: NoiseSchedule | None = schedule
    out: dict[str, Any] = {
        "num_train_timesteps": schedule.num_steps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": {v: k for k, v in PREDICTIONS.items()}[prediction],
        "rescale_betas_zero_snr": schedule.zero_terminal_snr,
    }
    if schedule.name in ("linear", "scaled_linear") and set(params) == {"beta_start", "beta_end"}:
        out.update(beta_schedule=schedule.name, **params)
    elif schedule.name == "cosine" and params == {"s": 0.008, "max_beta": 0.999}:
        out["beta_schedule"] = "squaredcos_cap_v2"
    else:
        base = None
    if base is not None:
        # the named schedule must rebuild these exact betas (a schedule built by name may
        # still carry edited betas, e.g. from NoiseSchedule(betas, "linear", ...))
        rebuilt, _ = schedule_from_diffusers(out)
        if not torch.equal(rebuilt.betas, schedule.betas):
            base = None
    if base is None:
        out.update(
            beta_schedule="linear",
            trained_betas=[float(b) for b in schedule.betas],
            rescale_betas_zero_snr=False,
        )
    return out
