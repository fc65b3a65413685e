"""What :func:`~noisecraft.pipelines.generate.generate` needs from a model, per model family.

The core loop is written once; what differs between a pixel-space model
(:class:`~noisecraft.models.pixel_diffusion.PixelDiffusion`) and a latent text-to-image
model (:class:`~noisecraft.models.latent_diffusion.LatentDiffusion`) sits behind the
:class:`DiffusionModel` protocol, implemented here by one small adapter per family that
reads the request (prompts or class labels) and calls the model:

- ``latent_shape(height, width)``: (C, h, w) of the tensor the sampler works on (the image
  itself for a pixel model, the VAE latent for a latent model);
- ``conditioning(request, start, stop)``: ``(cond, uncond)`` keyword arguments of the
  denoiser for images ``start:stop`` (class labels, or the text encoder's ``context``);
  ``uncond`` is None when the model has no unconditional input (then there is no CFG);
- ``denoiser(spacing)``: ``denoiser(x, sigma, **cond) -> x0_hat`` (DESIGN.md contract 2);
- ``encode(images, generator)`` / ``decode(latents)``: between images in [-1, 1] and the
  sampler's space (identity for pixel models, the VAE for latent models);
- ``inpaint_conditioning(mask, masked_latents)``: the extra input of a 9-channel
  inpainting U-Net;
- ``preview(denoised, mode)``: a cheap RGB picture of an x0 estimate, for progress previews;
- ``controlled(denoiser, controls, sigmas)``: the denoiser with ControlNet residuals added to
  each U-Net call (:mod:`noisecraft.pipelines.control`; latent models only), the rows flag
  it needs is part of ``conditioning``;
- ``c_skip(sigma)``: ``a`` in ``x0 = a x + b * output`` (for guidance rescale);
- attributes ``schedule``, ``device``, ``x0_range``, ``downsample_factor``,
  ``per_image_seeds``, ``inpaint_unet``, ``tiny_decoder`` and
  ``check_request(request)`` for the family's own one-line errors.

The models stay free of requests: models/ never imports pipelines/.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from noisecraft.diffusion import NoiseSchedule
from noisecraft.diffusion.parametrization import c_skip_for
from noisecraft.errors import ConfigError
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.pixel_diffusion import PixelDiffusion
from noisecraft.pipelines.control import ControlInput, control_rows, with_controls

if TYPE_CHECKING:
    from noisecraft.pipelines.generate import GenerateRequest

Denoiser = Callable[..., Tensor]


@runtime_checkable
class DiffusionModel(Protocol):
    """What :func:`~noisecraft.pipelines.generate.generate` needs (module docstring)."""

    schedule: NoiseSchedule
    x0_range: tuple[float, float] | None
    tiny_decoder: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def default_size(self) -> tuple[int, int]: ...

    @property
    def image_channels(self) -> int: ...

    @property
    def downsample_factor(self) -> int: ...

    @property
    def per_image_seeds(self) -> bool: ...

    @property
    def inpaint_unet(self) -> bool: ...

    @property
    def unet(self) -> Any: ...

    def check_request(self, request: GenerateRequest) -> None: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]: ...

    def conditioning(
        self, request: GenerateRequest, start: int, stop: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]: ...

    def denoiser(self, spacing: str) -> Denoiser: ...

    def encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor: ...

    def decode(self, latents: Tensor, tiled: bool | None = None) -> Tensor: ...

    def tiny_decode(self, latents: Tensor) -> Tensor: ...

    def inpaint_conditioning(self, mask: Tensor, masked_latents: Tensor) -> dict[str, Tensor]: ...

    def preview(self, denoised: Tensor, mode: str) -> Tensor: ...

    def c_skip(self, sigma: Tensor) -> Tensor: ...

    def controlled(
        self, denoiser: Denoiser, controls: Sequence[ControlInput], sigmas: Tensor
    ) -> Denoiser: ...


class PixelModel:
    """:class:`PixelDiffusion` seen through the :class:`DiffusionModel` protocol.

    Sampling works on the image itself (``encode`` / ``decode`` are the identity), the
    conditioning is a class label with the null class as the unconditional input, and the
    predicted x0 is clipped to ``x0_range``. Pixel img2img and inpainting come for free.
    """

    downsample_factor = 1
    inpaint_unet = False
    per_image_seeds = False
    tiny_decoder = None

    def __init__(self, model: PixelDiffusion):
        self.model = model
        self.schedule = model.schedule
        self.x0_range = model.x0_range

    @property
    def unet(self) -> Any:
        return self.model.unet

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @property
    def default_size(self) -> tuple[int, int]:
        return (self.model.image_size, self.model.image_size)

    @property
    def image_channels(self) -> int:
        return self.model.unet.config.in_channels

    def check_request(self, request: GenerateRequest) -> None:
        if request.clip_skip is not None:
            raise ConfigError("@clip_skip is for text-to-image models", settings=["clip_skip"])
        if request.controls:
            raise ConfigError("@control (ControlNet) is for latent models", settings=["control"])
        if request.prompts is not None or _any_text(request.negative_prompt):
            raise ConfigError(
                "this model takes @class_label, not @prompt", settings=["class_label", "prompt"]
            )
        num_classes = self.model.num_classes
        if request.classes is not None:
            if num_classes is None:
                raise ConfigError(
                    "this model is unconditional; leave out @class_label", settings=["class_label"]
                )
            if len(request.classes) != request.n:
                raise ConfigError(f"got {len(request.classes)} class labels for {request.n} images")
            bad = [c for c in request.classes if not 0 <= c < num_classes]
            if bad:
                raise ConfigError(
                    f"class {bad[0]} out of range; this model has classes 0..{num_classes - 1}"
                )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.image_channels, height, width)

    def conditioning(
        self, request: GenerateRequest, start: int, stop: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.model.num_classes is None:
            return {}, None
        null = self.model.unet.null_class
        labels = list(request.classes) if request.classes is not None else [null] * request.n
        cond = torch.tensor(labels[start:stop], device=self.device)
        return {"class_labels": cond}, {"class_labels": torch.full_like(cond, null)}

    def denoiser(self, spacing: str) -> Denoiser:
        return self.model.denoiser()

    def encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        return images

    def decode(self, latents: Tensor, tiled: bool | None = None) -> Tensor:
        return latents

    def tiny_decode(self, latents: Tensor) -> Tensor:
        raise ConfigError("a pixel model has no tiny decoder (it has no latents to decode)")

    def inpaint_conditioning(self, mask: Tensor, masked_latents: Tensor) -> dict[str, Tensor]:
        raise ConfigError("a pixel U-Net has no inpainting input")

    def preview(self, denoised: Tensor, mode: str) -> Tensor:
        return denoised.clamp(-1, 1)

    def c_skip(self, sigma: Tensor) -> Tensor:
        return c_skip_for(self.model.prediction, sigma)

    def controlled(
        self, denoiser: Denoiser, controls: Sequence[ControlInput], sigmas: Tensor
    ) -> Denoiser:
        raise ConfigError("@control (ControlNet) is for latent models", settings=["control"])


class LatentModel:
    """:class:`LatentDiffusion` seen through the :class:`DiffusionModel` protocol: prompts
    become the text encoder's ``context``, the sampler works on VAE latents, and each image
    draws from its own seed's generator (``per_image_seeds``)."""

    per_image_seeds = True

    def __init__(self, model: LatentDiffusion):
        self.model = model
        self.schedule = model.schedule
        self.x0_range = model.x0_range

    # the model's own properties and steps, unchanged
    unet = property(lambda self: self.model.unet)
    tiny_decoder = property(lambda self: self.model.tiny_decoder)
    device = property(lambda self: self.model.device)
    default_size = property(lambda self: self.model.default_size)
    image_channels = property(lambda self: self.model.image_channels)
    downsample_factor = property(lambda self: self.model.downsample_factor)
    inpaint_unet = property(lambda self: self.model.inpaint_unet)

    def denoiser(self, spacing: str) -> Denoiser:
        return self.model.denoiser(spacing)

    def encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.model.encode(images, generator)

    def decode(self, latents: Tensor, tiled: bool | None = None) -> Tensor:
        return self.model.decode(latents, tiled)

    def tiny_decode(self, latents: Tensor) -> Tensor:
        return self.model.tiny_decode(latents)

    def inpaint_conditioning(self, mask: Tensor, masked_latents: Tensor) -> dict[str, Tensor]:
        return self.model.inpaint_conditioning(mask, masked_latents)

    def preview(self, denoised: Tensor, mode: str) -> Tensor:
        return self.model.preview(denoised, mode)

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.model.c_skip(sigma)

    def controlled(
        self, denoiser: Denoiser, controls: Sequence[ControlInput], sigmas: Tensor
    ) -> Denoiser:
        """``denoiser`` (the U-Net's) with the residuals of ``controls`` added to every U-Net
        call; ``sigmas``: the ones the sampler runs on (for each unit's start / end)."""
        return with_controls(denoiser, controls, sigmas)

    # what reads the request
    def check_request(self, request: GenerateRequest) -> None:
        if request.classes is not None:
            raise ConfigError(
                "this model takes @prompt, not @class_label", settings=["prompt", "class_label"]
            )
        layers = self.model.text_encoder.config.layers
        skip = request.clip_skip
        if skip is not None and (not _is_int(skip) or not 1 <= skip <= layers):
            raise ConfigError(
                f"@clip_skip must be an integer in [1, {layers}] (1 = the text encoder's last "
                f"layer), got {skip!r}",
                settings=["clip_skip"],
            )
        for i, unit in enumerate(request.controls):
            if isinstance(unit, ControlInput):
                self._check_controlnet(i, unit.net)

    def _check_controlnet(self, i: int, net: Any) -> None:
        """One-line error for a ControlNet made for another U-Net or VAE."""
        unet = self.model.unet
        theirs = list(getattr(net, "skip_channels", []))
        if theirs != list(unet.skip_channels):
            raise ConfigError(
                f"control {i}: this ControlNet is for another U-Net (residual channels "
                f"{theirs}, this model's skips {list(unet.skip_channels)}); use one made for "
                "this model's base",
                settings=["control"],
            )
        config = getattr(net, "controlnet_config", None)
        factor = getattr(config, "hint_factor", self.downsample_factor)
        if factor != self.downsample_factor:
            raise ConfigError(
                f"control {i}: this ControlNet reads hints at {factor}x the latent size, this "
                f"model's VAE works at {self.downsample_factor}x; use one made for this model",
                settings=["control"],
            )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.downsample_factor
        return (self.model.latent_channels, height // f, width // f)

    def conditioning(
        self, request: GenerateRequest, start: int, stop: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Text ``context`` of images ``start:stop``; with CFG also the negative prompts'.
        With ControlNet units, each also marks its rows conditional or not
        (:data:`~noisecraft.pipelines.control.ROWS_KEY`).

        Prompts and negative prompts are encoded in one batch, so both come out with the
        same number of 77-token chunks (shorter ones padded with empty-prompt chunks).
        """
        prompts = request.image_prompts()[start:stop]

        def rows(conditional: bool) -> dict[str, Tensor]:  # for ControlNet's guess mode
            if not request.controls:
                return {}
            return control_rows(stop - start, conditional, self.device)

        if request.cfg == 1.0:
            context = self.model.encode_prompt(prompts, request.clip_skip)
            return {"context": context, **rows(True)}, None
        negatives = request.image_negative_prompts()[start:stop]
        both = self.model.encode_prompt(prompts + negatives, request.clip_skip)
        cond, uncond = both.split(len(prompts))
        return {"context": cond, **rows(True)}, {"context": uncond, **rows(False)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _any_text(value: str | Sequence[str]) -> bool:
    return bool(value) if isinstance(value, str) else any(bool(v) for v in value)


def as_model(model: Any) -> DiffusionModel:
    """``model`` as a :class:`DiffusionModel`: a :class:`PixelDiffusion` or
    :class:`LatentDiffusion` wrapped in its adapter; an adapter as it is."""
    if isinstance(model, PixelDiffusion):
        return PixelModel(model)
    if isinstance(model, LatentDiffusion):
        return LatentModel(model)
    if isinstance(model, (PixelModel, LatentModel)):
        return model
    raise ConfigError(f"cannot generate with a {type(model).__name__}; load a noisecraft model")


__all__ = ["DiffusionModel", "LatentModel", "PixelModel", "as_model"]
