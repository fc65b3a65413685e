"""What to generate: :class:`GenerateRequest`, the one validated settings object.

Every check of a generation setting is made here (and, for what depends on the model family,
by its adapter's ``check_request``, :mod:`noisecraft.pipelines.backends`), before any work
starts; messages name the setting as the Python API does (``@name``, see
:mod:`noisecraft.errors`). The sampler choice is parsed once per request
(:attr:`GenerateRequest.spec`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from noisecraft.errors import ConfigError
from noisecraft.pipelines.backends import DiffusionModel, as_model
from noisecraft.pipelines.control import ControlInput
from noisecraft.pipelines.diffusers_schedulers import DiffusersSampling, for_sampler
from noisecraft.pipelines.fast import FastMode, as_fast_mode
from noisecraft.samplers import SamplerSpec, as_spec

#: img2img strength used when an init image is given without one (diffusers' img2img
#: default); inpainting defaults to 1.0 (diffusers' inpaint default).
DEFAULT_IMG2IMG_STRENGTH = 0.8


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate. Fields after ``eta`` are the text-to-image / img2img / inpaint ones.

    * ``classes``: one label per image (None = unconditional / null class); pixel models only.
    * ``prompts``: one prompt per image, or one for all; latent models only (None = "").
    * ``negative_prompt``: one for all images or one per image; the unconditional half of
      classifier-free guidance (an empty one is the empty prompt, as in diffusers).
    * ``cfg``: guidance scale ``w`` of ``u + w (c - u)``; 1 = no unconditional pass.
    * ``guidance_rescale``: phi of Lin et al. 2023 eq. 16, in [0, 1] (see
      :class:`~noisecraft.diffusion.CFGDenoiser`).
    * ``seeds``: one seed per image; None = ``seed + i`` for image ``i`` (latent models) or the
      whole-batch rule of pixel models (module docstring).
    * ``width`` / ``height``: image size; None = the init image's size, else the model's.
      Latent models need multiples of the VAE factor (8 for SD); the U-Net takes any size.
    * ``init_image``: (1 or n, C, H, W) in [-1, 1] for img2img / inpainting.
    * ``strength``: img2img denoising strength in [0, 1]; None = 0.8 for img2img, 1.0 for
      inpainting. Steps run = ``int(steps * strength)`` (diffusers' ``get_timesteps``).
    * ``mask``: (1 or n, 1, H, W) (or (H, W)) in [0, 1], 1 (white) = repaint, binarised at 0.5.
    * ``scheduler_config``: a diffusers scheduler config (a pipeline's
      ``scheduler_config.json``, e.g. ``SD15_SCHEDULER_CONFIG``): sample exactly as diffusers
      does with the scheduler it uses for ``sampler`` (timestep grid and rounding, initial
      noise, DDIM's final alpha, ...; :mod:`noisecraft.pipelines.diffusers_schedulers`).
      None = noisecraft's own rules.
    * ``vae_tiling``: decode latents in overlapping tiles (True), whole (False), or tiled
      only for images above 1024x1024 pixels (None; :mod:`noisecraft.models.vae_tiling`).
      Pixel models have nothing to tile and ignore it.
    * ``fast_decode``: decode the final latents with the model's TAESD-like tiny decoder
      (``LatentDiffusion.tiny_decoder``, :mod:`noisecraft.models.tiny_decoder`) instead of
      the VAE; its quality cost is in docs/performance.md ("Tiny decoder").
    * ``fast``: fast mode (:mod:`noisecraft.pipelines.fast`): True = ``FAST`` (DeepCache
      interval 2, branch 2), or a :class:`~noisecraft.pipelines.fast.FastMode`; the U-Net
      then reuses its deep features on alternate calls. It does not change ``sampler`` /
      ``steps``: ``FAST.request(...)`` also picks the fast sampler and steps.
    * ``clip_skip``: the text encoder layer the prompts are read from (A1111's "Clip skip";
      None = the model's own); latent models only.
    * ``controls``: ControlNet units (:class:`~noisecraft.pipelines.control.ControlInput`:
      a ControlNet, its hint at the image size, weight, start / end, guess mode), their
      residuals summed in every U-Net call (:mod:`noisecraft.pipelines.control`); latent
      models only.
    """

    n: int = 16
    sampler: str | SamplerSpec = "dpmpp_2m"  # any spelling, or a parsed spec (parse_sampler)
    steps: int = 20
    spacing: str | None = None  # None: the name's "... Karras", else the sampler's A1111 default
    cfg: float = 1.0
    classes: Sequence[int] | None = None
    seed: int = 0
    batch_size: int = 256
    eta: float | None = None  # ddim / ancestral noise amount (sampler default when None)
    prompts: Sequence[str] | None = None
    negative_prompt: str | Sequence[str] = ""
    guidance_rescale: float = 0.0
    seeds: Sequence[int] | None = None
    width: int | None = None
    height: int | None = None
    init_image: Tensor | None = None
    strength: float | None = None
    mask: Tensor | None = None
    scheduler_config: Mapping[str, Any] | None = None
    vae_tiling: bool | None = None
    fast_decode: bool = False
    fast: FastMode | bool | None = None
    clip_skip: int | None = None
    controls: Sequence[ControlInput] = ()

    # ------------------------------------------------------------------ derived values
    @functools.cached_property
    def spec(self) -> SamplerSpec:
        """The sampler choice (``sampler`` + ``spacing``), parsed once per request
        (:mod:`noisecraft.samplers.spec`: explicit schedule, else the sampler's A1111 default
        grid and its discard rule)."""
        return as_spec(self.sampler, self.spacing)

    def image_seeds(self) -> list[int]:
        """The seed of each image: ``seeds``, or ``seed + i`` (AUTOMATIC1111's rule)."""
        if self.seeds is not None:
            return [int(s) for s in self.seeds]
        return [int(self.seed) + i for i in range(self.n)]

    def image_prompts(self) -> list[str]:
        """One prompt per image ("" when there are none)."""
        if self.prompts is None:
            return [""] * self.n
        prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)
        return prompts * self.n if len(prompts) == 1 else prompts

    def image_negative_prompts(self) -> list[str]:
        """One negative prompt per image."""
        neg = self.negative_prompt
        negs = [neg] if isinstance(neg, str) else list(neg)
        return negs * self.n if len(negs) == 1 else negs

    def effective_strength(self) -> float | None:
        """The img2img strength in use: None without an init image."""
        if self.init_image is None:
            return None
        if self.strength is not None:
            return float(self.strength)
        return 1.0 if self.mask is not None else DEFAULT_IMG2IMG_STRENGTH

    def start_index(self) -> int:
        """Index into the ``steps + 1`` sigmas where sampling starts (0 without an init image).

        diffusers' ``get_timesteps``: ``init = min(int(steps * strength), steps)``,
        ``t_start = max(steps - init, 0)``. Note ``int(steps * strength)``, not
        ``int(steps * (1 - strength))``: they differ by one where ``steps * strength`` rounds
        down (e.g. 100 * 0.29 = 28.999...).
        """
        strength = self.effective_strength()
        if strength is None:
            return 0
        return img2img_start(self.steps, strength)

    def diffusers_sampling(self) -> DiffusersSampling | None:
        """How diffusers samples this request (None without ``scheduler_config``)."""
        if self.scheduler_config is None:
            return None
        return for_sampler(self.spec, self.scheduler_config)

    # ------------------------------------------------------------------ validation
    def validate(self, model: Any) -> None:
        """Raise a one-line :class:`ConfigError` / unknown-name error before any work starts."""
        m = as_model(model)
        self.spec  # noqa: B018 -- parses the sampler choice: an unknown name fails here
        diffusers = self.diffusers_sampling()
        if diffusers is not None:
            diffusers.sampler_options(m.schedule, eta=self.eta)  # eta only where diffusers has it
        _check_int("n", self.n, 1)
        _check_int("steps", self.steps, 1)
        if self.steps > m.schedule.num_steps:
            raise ConfigError(
                f"@steps must be at most {m.schedule.num_steps} (the model's training "
                f"timesteps; more steps add nothing), got {self.steps}",
                settings=["steps"],
            )
        for seed in self.image_seeds() if self.seeds is not None else [self.seed]:
            _check_int("seed", seed, 0, 2**64)
        for name in ("cfg", "eta", "guidance_rescale", "strength"):
            _check_finite(name, getattr(self, name), optional=name in ("eta", "strength"))
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(
                f"@guidance_rescale must be in [0, 1], got {self.guidance_rescale}",
                settings=["guidance_rescale"],
            )
        if self.seeds is not None and len(self.seeds) != self.n:
            raise ConfigError(f"got {len(self.seeds)} seeds for {self.n} images")
        prompts, negatives = self.prompts, self.negative_prompt
        if prompts is not None and not isinstance(prompts, str) and len(prompts) not in (1, self.n):
            raise ConfigError(
                f"got {len(prompts)} prompts for {self.n} images; give one prompt, or one per image"
            )
        if not isinstance(negatives, str) and len(negatives) not in (1, self.n):
            raise ConfigError(
                f"got {len(self.negative_prompt)} negative prompts for {self.n} images; "
                "give one, or one per image"
            )
        if self.strength is not None:
            if not 0.0 <= self.strength <= 1.0:
                raise ConfigError(
                    f"@strength must be in [0, 1], got {self.strength}", settings=["strength"]
                )
            if self.init_image is None:
                raise ConfigError(
                    "@strength needs @init_image (the picture to change)",
                    settings=["strength", "init_image"],
                )
        if self.mask is not None and self.init_image is None:
            raise ConfigError(
                "@mask needs @init_image (the picture to inpaint)",
                settings=["mask", "init_image"],
            )
        as_fast_mode(self.fast)
        m.check_request(self)
        if self.fast_decode and m.tiny_decoder is None:
            raise ConfigError(
                "fast_decode needs a model with a tiny decoder; load one "
                "(noisecraft.io.native.load_tiny_decoder) and set "
                "model.tiny_decoder, or leave fast decode off"
            )
        height, width = image_size(m, self)
        _check_size(m, height, width)
        if self.init_image is not None:
            _image_batch(self.init_image, m.image_channels, height, width, self.n, "init image")
        if self.mask is not None:
            _mask_batch(self.mask, height, width, self.n)
        for i, unit in enumerate(self.controls):
            if not isinstance(unit, ControlInput):
                raise ConfigError(f"controls must be ControlInput units, got {type(unit).__name__}")
            unit.check(i, height, width)


def _check_int(setting: str, value: Any, lo: int, hi: int | None = None) -> None:
    """A one-line error unless ``value`` is an integer in [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"@{setting} must be an integer, got {value!r}", settings=[setting])
    if value < lo or (hi is not None and value >= hi):
        top = "2^64" if hi == 2**64 else hi
        bound = f"at least {lo}" if hi is None else f"in [{lo}, {top})"
        raise ConfigError(f"@{setting} must be {bound}, got {value}", settings=[setting])


def _check_finite(setting: str, value: Any, optional: bool = False) -> None:
    """A one-line error unless ``value`` is a finite number (or None, if ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"@{setting} must be a number, got {value!r}", settings=[setting])
    if not math.isfinite(value):
        raise ConfigError(f"@{setting} must be a finite number, got {value}", settings=[setting])


def img2img_start(steps: int, strength: float) -> int:
    """diffusers' img2img ``t_start``: the first of ``steps`` sigmas that is sampled from."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def image_size(model: Any, request: GenerateRequest) -> tuple[int, int]:
    """(height, width) of the images ``request`` makes."""
    m = as_model(model)
    default_h, default_w = m.default_size
    if request.init_image is not None and request.init_image.ndim >= 2:
        default_h, default_w = (int(s) for s in request.init_image.shape[-2:])
    height = default_h if request.height is None else int(request.height)
    width = default_w if request.width is None else int(request.width)
    return height, width


def _check_size(m: DiffusionModel, height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ConfigError(f"size {width}x{height} must be positive")
    f = m.downsample_factor
    if f > 1 and (height % f or width % f):
        raise ConfigError(
            f"size {width}x{height} is not a multiple of {f} (the VAE's downsampling factor); "
            f"choose a width and height divisible by {f}"
        )


def _image_batch(image: Tensor, channels: int, height: int, width: int, n: int, what: str) -> None:
    if image.ndim != 4 or image.shape[1] != channels:
        raise ConfigError(
            f"{what} must be a tensor (batch, {channels}, height, width), got {tuple(image.shape)}"
        )
    if image.shape[0] not in (1, n):
        raise ConfigError(f"got {image.shape[0]} {what}s for {n} images; give 1 or {n}")
    h, w = image.shape[-2:]
    if (h, w) != (height, width):
        raise ConfigError(
            f"{what} is {w}x{h} but the images are {width}x{height}; "
            "resize it or leave out the size"
        )


def _mask_batch(mask: Tensor, height: int, width: int, n: int) -> None:
    if mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        raise ConfigError(
            f"mask must be (height, width) or (batch, 1, height, width), got {tuple(mask.shape)}"
        )
    b = 1 if mask.ndim == 2 else mask.shape[0]
    if b not in (1, n):
        raise ConfigError(f"got {b} masks for {n} images; give 1 or {n}")
    h, w = mask.shape[-2:]
    if (h, w) != (height, width):
        raise ConfigError(
            f"mask is {w}x{h} but the init image is {width}x{height}; they must match"
        )


__all__ = ["DEFAULT_IMG2IMG_STRENGTH", "GenerateRequest", "image_size", "img2img_start"]
