"""ControlNet inside the one generate() core: residuals computed per U-Net call.

A ControlNet (Zhang, Rao & Agrawala 2023) reads the U-Net's own input (the scaled noisy
latents, the timestep and the prompt's ``context``) plus a control image (the "hint") and
returns one residual per skip connection and one for the middle block, which the U-Net adds
(:meth:`noisecraft.models.unet.UNet.forward`'s ``down_residuals`` / ``mid_residual``). So
control is a wrapper of the model call that the denoiser makes, not a second pipeline:
:func:`with_controls` puts :class:`ControlledCall` between the
:class:`~noisecraft.diffusion.DiscreteDenoiser` and the U-Net, and every sampler, img2img,
inpainting and classifier-free guidance work unchanged.

Per unit (:class:`ControlInput`), as diffusers' ``StableDiffusionControlNetPipeline`` does:

* ``weight`` multiplies the unit's residuals (``controlnet_conditioning_scale``); the
  residuals of several units are summed (``MultiControlNetModel``);
* ``start`` / ``end``: the unit acts at step ``i`` of the ``n`` steps that run exactly when
  ``i / n >= start`` and ``(i + 1) / n <= end`` (``control_guidance_start`` / ``_end``; for
  img2img, ``n`` counts the steps that run after ``strength``); a call belongs to the step
  whose noise levels hold its own (``sigma_i >= sigma > sigma_i+1``, read off its
  timestep), so a midpoint evaluation (DPM++ 2S, DPM++ SDE) stays in its step, and one at
  the next step's sigma (Heun's, DPM2's second) is counted in the next step;
* ``guess_mode``: the ControlNet sees only the conditional half of the guidance batch (the
  unconditional half gets no residual) and its residuals are scaled from 0.1 (shallowest)
  to 1 (middle), :func:`noisecraft.models.controlnet.guess_mode_scales`.

Which rows of a (CFG-doubled) batch are conditional travels with the conditioning as the
boolean tensor :data:`ROWS_KEY` (True in ``cond``, False in ``uncond``), so the wrapper does
not depend on how :class:`~noisecraft.diffusion.CFGDenoiser` orders its halves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion import DiscreteDenoiser
from noisecraft.errors import ConfigError

#: The conditioning key that marks the conditional rows of a batch (module docstring).
ROWS_KEY = "control_rows"


@dataclass(frozen=True, eq=False)
class ControlInput:
    """One ControlNet unit of a :class:`~noisecraft.pipelines.request.GenerateRequest`.

    * ``net``: a :class:`~noisecraft.models.controlnet.ControlNet` (anything called as
      ``net(x, t, context, hint, scale=, guess_mode=) -> (down_residuals, mid_residual)``);
    * ``hint``: the control image (1, 3, H, W), RGB in [0, 1], at the size of the images
      (already preprocessed and resized: :mod:`noisecraft.pipelines.control_preprocess`);
    * ``weight``, ``start``, ``end``, ``guess_mode``: module docstring.
    """

    net: Any
    hint: Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def check(self, index: int, height: int, width: int) -> None:
        """One-line errors for a unit that cannot run on images of ``height`` x ``width``."""
        what = f"control {index}"
        for name in ("weight", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{what}: {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{what}: {name} must be finite, got {value}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(
                f"{what}: start and end are fractions of the steps with 0 <= start < end <= 1, "
                f"got start {self.start}, end {self.end}"
            )
        hint = self.hint
        if not isinstance(hint, Tensor) or hint.ndim != 4 or hint.shape[:2] != (1, 3):
            shape = tuple(hint.shape) if isinstance(hint, Tensor) else type(hint).__name__
            raise ConfigError(
                f"{what}: the control image must be a (1, 3, H, W) tensor, got {shape}"
            )
        if tuple(hint.shape[-2:]) != (height, width):
            raise ConfigError(
                f"{what}: the control image is {hint.shape[-1]}x{hint.shape[-2]} but the images "
                f"are {width}x{height}; resize it to the image size"
            )


def control_active(step: int, steps: int, start: float, end: float) -> bool:
    """Whether a unit with ``start`` / ``end`` acts at ``step`` of ``steps`` (diffusers'
    ``controlnet_keep``: not ``i / n < start or (i + 1) / n > end``)."""
    return not (step / steps < start or (step + 1) / steps > end)


class ControlledCall:
    """``model(x_t, t, context=..., control_rows=..., **kw)``: ``model`` (the U-Net call of a
    :class:`DiscreteDenoiser`) with the summed residuals of the units active at this step.

    ``step_t``: the timestep each of the ``n`` sampling steps starts at (descending); a call
    at timestep ``t`` belongs to the last step that starts at or above it.
    """

    def __init__(self, model: Any, controls: Sequence[ControlInput], step_t: Tensor):
        self.model = model
        self.controls = tuple(controls)
        self.step_t = step_t.detach().to("cpu", torch.float64)

    def step_of(self, t: Tensor) -> int:
        """The index of the sampling step a call at timesteps ``t`` belongs to."""
        t0 = float(t.reshape(-1)[0])
        return int((self.step_t[1:] >= t0 - 1e-3).sum())

    def residuals(
        self, x: Tensor, t: Tensor, context: Tensor | None, rows: Tensor | None
    ) -> tuple[list[Tensor], Tensor] | None:
        """The summed ``(down_residuals, mid_residual)`` of the active units, or None."""
        step, steps = self.step_of(t), len(self.step_t)
        downs: list[Tensor] | None = None
        mid: Tensor | None = None
        for unit in self.controls:
            if unit.weight == 0 or not control_active(step, steps, unit.start, unit.end):
                continue
            d, m = _unit_residuals(unit, x, t, context, rows)
            if downs is None or mid is None:
                downs, mid = d, m
            else:
                downs = [a + b for a, b in zip(downs, d, strict=True)]
                mid = mid + m
        return None if downs is None or mid is None else (downs, mid)

    def __call__(self, x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        rows = kw.pop(ROWS_KEY, None)
        found = self.residuals(x, t, kw.get("context"), rows)
        if found is not None:
            kw["down_residuals"], kw["mid_residual"] = found
        return self.model(x, t, **kw)


def _unit_residuals(
    unit: ControlInput, x: Tensor, t: Tensor, context: Tensor | None, rows: Tensor | None
) -> tuple[list[Tensor], Tensor]:
    """One unit's residuals for the whole batch; in guess mode only the conditional rows get
    the ControlNet (diffusers runs it on ``prompt_embeds.chunk(2)[1]``), the others zeros."""
    net = unit.net
    dtype = next(net.parameters()).dtype
    hint = unit.hint.to(device=x.device, dtype=dtype)
    ctx = None if context is None else context.to(dtype)
    t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
    only = None
    if unit.guess_mode and rows is not None:
        rows = rows.to(x.device).reshape(-1).bool()
        if not bool(rows.all()):
            only = rows
    if only is None:
        return net(x.to(dtype), t, ctx, hint, scale=unit.weight, guess_mode=unit.guess_mode)
    sub_ctx = None if ctx is None else ctx[only]
    d, m = net(x[only].to(dtype), t[only], sub_ctx, hint, scale=unit.weight, guess_mode=True)
    return [_scatter(r, only) for r in d], _scatter(m, only)


def _scatter(r: Tensor, rows: Tensor) -> Tensor:
    full = r.new_zeros((rows.shape[0], *r.shape[1:]))
    full[rows] = r
    return full


def with_controls(
    denoiser: DiscreteDenoiser, controls: Sequence[ControlInput], sigmas: Tensor
) -> DiscreteDenoiser:
    """``denoiser`` whose model calls add the residuals of ``controls``; ``sigmas``: the
    sigmas the sampler runs on (``steps run + 1``, the last one 0)."""
    if not isinstance(denoiser, DiscreteDenoiser):
        raise ConfigError(
            f"ControlNet needs a U-Net denoiser, got a {type(denoiser).__name__}; leave out control"
        )
    step_t = denoiser.sigma_to_t(sigmas[:-1].to(torch.float64))
    return DiscreteDenoiser(
        ControlledCall(denoiser.model, controls, step_t),
        denoiser.schedule,
        denoiser.prediction,
        learned_variance=denoiser.learned_variance,
        quantize=denoiser.quantize,
        timestep_interpolation=denoiser.timestep_interpolation,
    )


def control_rows(n: int, conditional: bool, device: torch.device) -> dict[str, Tensor]:
    """The :data:`ROWS_KEY` entry of ``n`` images' conditioning (True = conditional)."""
    return {ROWS_KEY: torch.full((n,), conditional, dtype=torch.bool, device=device)}


__all__ = [
    "ROWS_KEY",
    "ControlInput",
    "ControlledCall",
    "control_active",
    "control_rows",
    "with_controls",
]
