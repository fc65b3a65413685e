"""The generate() core: seeds -> noise -> sigmas -> (guided) denoiser -> sampler -> images.

Every surface (the Python API, CLI ``sample`` and ``generate``, training-time sample grids,
the demo, the evaluation scripts) calls :func:`generate`, for pixel-space models
(:class:`~noisecraft.models.pixel_diffusion.PixelDiffusion`) and latent text-to-image models
(:class:`~noisecraft.models.latent_diffusion.LatentDiffusion`) alike; what differs between
the two is behind the :class:`~noisecraft.pipelines.backends.DiffusionModel` protocol.
Everything else -- classifier-free guidance (a denoiser wrapper, Ho & Salimans 2022 eq. 6),
guidance rescale (Lin et al. 2023 eq. 15-16), img2img (SDEdit, Meng et al. 2022: start at a
later sigma, not a flag), inpainting (RePaint-style blending, Lugmayr et al. 2022, as a
denoiser wrapper) -- is written once, here, and no sampler knows about any of it.

Seeds (see :meth:`GenerateRequest.image_seeds`): with ``per_image_seeds`` (latent models, or
any model when ``request.seeds`` is given) image ``i`` has its own CPU generator seeded with
``seeds[i]`` (default ``seed + i``, as AUTOMATIC1111 numbers a batch), which draws, in
diffusers' order, the VAE posterior sample of the init image, then the initial noise
``torch.randn((1, C, h, w))`` (``randn_tensor`` with a list of generators), then the
posterior sample of the masked image (9-channel inpainting), then the sampler's noise (a
stochastic sampler gets the list of the batch's generators and draws each image's noise
from its own). So image ``i`` is the same whether it is made alone or in a batch. Pixel
models without ``seeds``
keep noisecraft's original rule: one generator seeded with ``seed`` draws the noise of all
``n`` images at once, and stochastic samplers share it across the batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from noisecraft.diffusion import (
    CFGDenoiser,
    ClippedDenoiser,
    DiscreteDenoiser,
)
from noisecraft.errors import ConfigError
from noisecraft.pipelines.backends import DiffusionModel, as_model
from noisecraft.pipelines.deepcache import deepcache
from noisecraft.pipelines.diffusers_schedulers import DiffusersSampling, for_sampler
from noisecraft.pipelines.fast import FastMode, as_fast_mode
from noisecraft.pipelines.inpaint import InpaintDenoiser
from noisecraft.samplers import SamplerSpec, as_spec, get_sampler

Denoiser = Callable[..., Tensor]

#: img2img strength used when an init image is given without one (diffusers' img2img
#: default); inpainting defaults to 1.0 (diffusers' inpaint default).
DEFAULT_IMG2IMG_STRENGTH = 0.8

PREVIEWS = ("cheap", "vae", "tiny")


# ---------------------------------------------------------------------------- request


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
        for seed in self.image_seeds() if self.seeds is not None else [self.seed]:
            _check_int("seed", seed, 0, 2**64)
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)):
            raise ConfigError(f"@cfg must be a number, got {self.cfg!r}", settings=["cfg"])
        if not math.isfinite(self.cfg):
            raise ConfigError(f"@cfg must be a finite number, got {self.cfg}", settings=["cfg"])
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


def _check_int(setting: str, value: Any, lo: int, hi: int | None = None) -> None:
    """A one-line error unless ``value`` is an integer in [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"@{setting} must be an integer, got {value!r}", settings=[setting])
    if value < lo or (hi is not None and value >= hi):
        top = "2^64" if hi == 2**64 else hi
        bound = f"at least {lo}" if hi is None else f"in [{lo}, {top})"
        raise ConfigError(f"@{setting} must be {bound}, got {value}", settings=[setting])


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


# ---------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class _Plan:
    sampler_name: str
    spacing: str
    sigmas: Tensor  # the full steps + 1 sigmas
    start: int  # img2img start index
    runs: list[tuple[int, int]]
    per_image: bool
    options: dict[str, Any]  # sampler options
    quantize: bool = False  # the model sees integer timesteps
    initial_sigma: float | None = None  # text-to-image start std; None = the first sigma

    @property
    def tail(self) -> Tensor:
        return self.sigmas[self.start :]

    @property
    def steps_per_run(self) -> int:
        return len(self.sigmas) - 1 - self.start


def _plan(m: DiffusionModel, request: GenerateRequest) -> _Plan:
    spec = request.spec
    start = request.start_index()
    per_image = m.per_image_seeds or request.seeds is not None
    size = request.batch_size
    runs = [(s, min(s + size, request.n)) for s in range(0, request.n, size)]
    diffusers = request.diffusers_sampling()
    if diffusers is not None:
        sigmas = diffusers.sigmas(m.schedule, request.steps)
        options = diffusers.sampler_options(m.schedule, sigmas, start, request.eta)
        initial = diffusers.initial_sigma(float(sigmas[0]))
        return _Plan(
            diffusers.sampler,
            diffusers.spacing,
            sigmas,
            start,
            runs,
            per_image,
            options,
            diffusers.quantize,
            initial,
        )
    sigmas = spec.sigmas(m.schedule, request.steps)
    options = {} if request.eta is None else {"eta": request.eta}
    return _Plan(spec.name, spec.schedule, sigmas, start, runs, per_image, options)


def count_steps(model: Any, request: GenerateRequest) -> int:
    """How many times :func:`generate` will call ``callback`` (for a progress bar's total)."""
    m = as_model(model)
    plan = _plan(m, request)
    return plan.steps_per_run * len(plan.runs)


def _broadcast(t: Tensor, start: int, stop: int) -> Tensor:
    return t if t.shape[0] == 1 else t[start:stop]


@torch.no_grad()
def generate(
    model: Any,
    request: GenerateRequest,
    *,
    callback: Callable[[dict], None] | None = None,
    preview_every: int = 0,
    preview: str = "cheap",
    decode: bool = True,
) -> Tensor:
    """Make ``request.n`` images; returns a float tensor (n, C, H, W) in [-1, 1] on the CPU.

    Images are produced in runs of up to ``request.batch_size`` (one image per run for a
    stochastic sampler with per-image seeds). ``callback`` gets the sampler's per-step dict
    plus ``batch`` (the run index) and ``start`` / ``stop`` (the images of the run); with
    ``preview_every = K > 0`` every K-th step (and the last) also carries ``preview``, an
    RGB picture (B, 3, h, w) in [-1, 1] of the current x0 estimate: ``preview="cheap"`` maps
    latents linearly to RGB at latent resolution (AUTOMATIC1111's "Approx cheap"; costs
    nothing), ``"vae"`` decodes them with the VAE (exact, costs a decode), ``"tiny"`` with
    the model's tiny decoder (:mod:`noisecraft.models.tiny_decoder`). Pixel models
    preview the x0 estimate itself. ``decode=False`` returns the final latents instead of
    images (for latent models; the same tensor for pixel models, not clamped).

    img2img (``init_image``) starts at ``sigmas[start_index()]`` from ``z + sigma * noise``
    (SDEdit, Meng et al. 2022) and runs the same sampler on the rest of the sigmas; strength 0
    runs no step and returns the VAE round trip of the init image. Inpainting (``mask``)
    blends known latents (:class:`InpaintDenoiser`) or, for a 9-channel U-Net, concatenates
    ``[latents, mask, masked-image latents]`` (diffusers' ``StableDiffusionInpaintPipeline``).
    """
    m = as_model(model)
    request.validate(m)
    if preview not in PREVIEWS:
        raise ConfigError(f"preview must be one of {', '.join(PREVIEWS)}, got {preview!r}")
    if preview_every < 0:
        raise ConfigError(f"preview_every must be >= 0, got {preview_every}")
    device = m.device
    plan = _plan(m, request)
    sampler = get_sampler(plan.sampler_name)
    sigmas = plan.tail.to(device)
    steps_run = plan.steps_per_run
    denoiser = m.denoiser(plan.spacing)
    if plan.quantize:
        denoiser = _quantized(denoiser)
    options = plan.options
    initial_sigma = sigmas[0] if plan.initial_sigma is None else plan.initial_sigma
    shape = m.latent_shape(*image_size(m, request))
    seeds = request.image_seeds()

    inputs = _Inputs.of(request, device, m.inpaint_unet)
    legacy: tuple[torch.Generator, Tensor] | None = None
    if not plan.per_image:  # pixel models without seeds: one generator for everything
        g = torch.Generator().manual_seed(request.seed)
        legacy = (g, torch.randn((request.n, *shape), generator=g))

    out: list[Tensor] = []
    for b, (start, stop) in enumerate(plan.runs):
        run = _draw(m, inputs, shape, seeds[start:stop], start, stop, legacy, device)
        if inputs.init is None or (inputs.mask is not None and inputs.strength_max):
            x = run.noise * initial_sigma
        else:
            x = run.known + run.noise * sigmas[0]  # SDEdit: the init latents noised to sigma

        cond, uncond = m.conditioning(request, start, stop)
        if inputs.nine:
            cond = {**cond, **m.inpaint_conditioning(run.mask, run.masked)}
        fn: Denoiser = denoiser
        if uncond is not None and request.cfg != 1.0:
            fn = CFGDenoiser(fn, request.cfg, uncond, request.guidance_rescale, c_skip=m.c_skip)
        if m.x0_range is not None:
            fn = ClippedDenoiser(fn, *m.x0_range)
        if inputs.blend:
            fn = InpaintDenoiser(fn, run.known, run.noise, run.mask, float(sigmas[0]))

        cb = None
        if callback is not None:
            cb = _make_callback(callback, m, b, start, stop, preview_every, preview, steps_run)
        if steps_run > 0:
            with _fast_unet(m, request):
                x = sampler(
                    fn, x, sigmas, generator=run.generator, callback=cb, extra_args=cond, **options
                )
        if inputs.blend:  # the known region is the clean init latents at the end
            x = (1.0 - run.mask) * run.known + run.mask * x
        if decode and request.fast_decode:
            x = m.tiny_decode(x)  # validate() checked that the model has a tiny decoder
        elif decode:
            x = m.decode(x) if request.vae_tiling is None else m.decode(x, request.vae_tiling)
        out.append(x.float().clamp(-1, 1).cpu() if decode else x.float().cpu())
    return torch.cat(out)


def _fast_unet(m: DiffusionModel, request: GenerateRequest) -> Any:
    """A context in which the model's U-Net runs in the request's fast mode (DeepCache with a
    fresh cache per sampling run), or a no-op."""
    fast = as_fast_mode(request.fast)
    if fast is None or fast.deepcache is None or fast.deepcache.interval == 1:
        return contextlib.nullcontext()
    return deepcache(m.unet, fast.deepcache)


def _quantized(denoiser: Denoiser) -> Denoiser:
    """The same denoiser calling the model with timesteps rounded to integers."""
    if isinstance(denoiser, DiscreteDenoiser):
        return denoiser.replace(quantize=True)
    raise ConfigError(
        f"cannot round the timesteps of a {type(denoiser).__name__} denoiser; "
        "leave out scheduler_config"
    )


@dataclass(frozen=True)
class _Inputs:
    """The request's init image and (binarised) mask on the device, and what they call for."""

    init: Tensor | None
    mask: Tensor | None
    strength_max: bool
    nine: bool  # 9-channel inpainting U-Net: concatenated conditioning
    blend: bool  # ordinary model with a mask: blend known latents

    @classmethod
    def of(cls, request: GenerateRequest, device: torch.device, inpaint_unet: bool) -> _Inputs:
        init = mask = None
        if request.init_image is not None:
            init = request.init_image.to(device=device, dtype=torch.float32)
        if request.mask is not None:
            mask = request.mask.to(device=device, dtype=torch.float32)
            mask = mask.reshape(-1, 1, *mask.shape[-2:])
            mask = (mask >= 0.5).to(torch.float32)  # binarised, as diffusers' mask processor
        strength = request.effective_strength()
        nine = mask is not None and inpaint_unet
        blend = mask is not None and not inpaint_unet
        return cls(init, mask, strength is not None and strength >= 1.0, nine, blend)

    def need_known(self) -> bool:
        """Clean latents of the init image are needed: img2img, every blended inpaint, and
        9-channel inpaint below strength 1 (diffusers' ``return_image_latents``)."""
        return self.init is not None and (self.mask is None or self.blend or not self.strength_max)


@dataclass
class _Run:
    noise: Tensor  # unit noise (B, C, h, w)
    known: Tensor | None  # clean init latents
    masked: Tensor | None  # latents of the masked init image (9-channel inpainting)
    mask: Tensor | None  # the mask at latent size (B, 1, h, w)
    generator: torch.Generator | list[torch.Generator] | None  # the sampler's, one per image


def _draw(
    m: DiffusionModel,
    inputs: _Inputs,
    shape: tuple[int, int, int],
    seeds: list[int],
    start: int,
    stop: int,
    legacy: tuple[torch.Generator, Tensor] | None,
    device: torch.device,
) -> _Run:
    """Everything random of images ``start:stop``, in diffusers' order per generator:
    the init image's posterior sample, the initial noise, the masked image's sample."""
    b = stop - start
    image = None if inputs.init is None else _broadcast(inputs.init, start, stop)
    mask = None if inputs.mask is None else _broadcast(inputs.mask, start, stop)
    masked_image = None if mask is None or image is None else image * (mask < 0.5)
    mask_lat = None
    if mask is not None:  # nearest-neighbour, as diffusers' prepare_mask_latents
        mask_lat = F.interpolate(mask, size=shape[1:]).expand(b, -1, -1, -1)
    known = masked = None
    if legacy is not None:
        g, all_noise = legacy
        noise = all_noise[start:stop].to(device)
        if inputs.need_known():
            known = m.encode(image, g).expand(b, -1, -1, -1)
        if inputs.nine:
            masked = m.encode(masked_image, g).expand(b, -1, -1, -1)
        generator = g
    else:
        noises, knowns, maskeds, generators = [], [], [], []
        for j, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            generators.append(g)
            if inputs.need_known():
                knowns.append(m.encode(_row(image, j), g))
            noises.append(torch.randn((1, *shape), generator=g))
            if inputs.nine:
                maskeds.append(m.encode(_row(masked_image, j), g))
        noise = torch.cat(noises).to(device)
        known = torch.cat(knowns) if knowns else None
        masked = torch.cat(maskeds) if maskeds else None
        generator = generators[0] if len(generators) == 1 else generators
    if known is not None:
        known = known.to(device=device, dtype=noise.dtype)
    if masked is not None:
        masked = masked.to(device=device, dtype=noise.dtype)
    return _Run(noise, known, masked, mask_lat, generator)


def _row(t: Tensor, j: int) -> Tensor:
    return t[j : j + 1] if t.shape[0] > 1 else t


def _make_callback(
    callback: Callable[[dict], None],
    m: DiffusionModel,
    b: int,
    start: int,
    stop: int,
    every: int,
    mode: str,
    steps: int,
) -> Callable[[dict], None]:
    def cb(d: dict) -> None:
        d = {**d, "batch": b, "start": start, "stop": stop}
        if every and (d["i"] % every == 0 or d["i"] == steps - 1):
            d["preview"] = m.preview(d["denoised"], mode).float().cpu()
        callback(d)

    return cb


def initial_noise(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """Unit Gaussian noise drawn on the CPU from ``seed`` (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g).to(device)


__all__ = [
    "DEFAULT_IMG2IMG_STRENGTH",
    "GenerateRequest",
    "count_steps",
    "generate",
    "image_size",
    "img2img_start",
    "initial_noise",
]
