"""The generate() core: seeds -> noise -> sigmas -> (guided) denoiser -> sampler -> images.

Every surface (the Python API, CLI ``sample`` and ``generate``, training-time sample grids,
the demo, the evaluation scripts) calls :func:`generate`, for pixel-space models
(:class:`~noisecraft.models.pixel_diffusion.PixelDiffusion`) and latent text-to-image models
(:class:`~noisecraft.models.latent_diffusion.LatentDiffusion`) alike; what differs between
the two is behind the :class:`~noisecraft.pipelines.backends.DiffusionModel` protocol.
Everything else -- classifier-free guidance (a denoiser wrapper, Ho & Salimans 2022 eq. 6),
guidance rescale (Lin et al. 2023 eq. 15-16), img2img (SDEdit, Meng et al. 2022: start at a
later sigma, not a flag), inpainting (RePaint-style blending, Lugmayr et al. 2022, as a
denoiser wrapper), ControlNet (Zhang et al. 2023: residuals added inside each U-Net call,
:mod:`noisecraft.pipelines.control`) -- is written once, here, and no sampler knows about any
of it.

Seeds (see :meth:`GenerateRequest.image_seeds`): with ``per_image_seeds`` (latent models, or
any model when ``request.seeds`` is given) image ``i`` has its own CPU generator seeded with
``seeds[i]`` (default ``seed + i``, as AUTOMATIC1111 numbers a batch), which draws, in
diffusers' order, the VAE posterior sample of the init image, then the initial noise
``torch.randn((1, C, h, w))`` (``randn_tensor`` with a list of generators), then the
posterior sample of the masked image (9-channel inpainting), then the sampler's noise (a
stochastic sampler gets the list of the batch's generators and draws each image's noise
from its own). So image ``i`` is the same whether it is made alone or in a batch. Pixel
models without ``seeds`` keep noisecraft's original rule: one generator seeded with ``seed``
draws the noise of all ``n`` images at once, and stochastic samplers share it across the
batch (training-time sample grids and ``noisecraft eval`` use it).

What to generate is a :class:`~noisecraft.pipelines.request.GenerateRequest` (the validated
settings); how a model family takes it, :mod:`noisecraft.pipelines.backends`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
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
from noisecraft.pipelines.fast import as_fast_mode
from noisecraft.pipelines.inpaint import InpaintDenoiser
from noisecraft.pipelines.observe import Observation
from noisecraft.pipelines.request import (
    DEFAULT_IMG2IMG_STRENGTH,
    GenerateRequest,
    image_size,
    img2img_start,
)
from noisecraft.samplers import get_sampler

Denoiser = Callable[..., Tensor]

PREVIEWS = ("cheap", "vae", "tiny")


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
    observation: Observation | None = None,
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
    ``observation`` (:mod:`noisecraft.pipelines.observe`) records what its observer asks
    for (cross-attention maps) during each run; None (the default) registers nothing.

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
    if request.controls:  # ControlNet residuals inside each U-Net call
        denoiser = m.controlled(denoiser, request.controls, sigmas)
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
        watch = contextlib.nullcontext()
        if observation is not None:
            watch = observation.run(m.unet, stop - start, tuple(shape[1:]))
        with watch as on_step:
            if on_step is not None:
                cb = _chain(on_step, cb)
            if steps_run > 0:
                with _fast_unet(m, request):
                    x = sampler(
                        fn,
                        x,
                        sigmas,
                        generator=run.generator,
                        callback=cb,
                        extra_args=cond,
                        **options,
                    )
        if inputs.blend:  # the known region is the clean init latents at the end
            x = (1.0 - run.mask) * run.known + run.mask * x
        if observation is not None:
            observation.final(x, steps_run)
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


def _chain(
    first: Callable[[dict], None], then: Callable[[dict], None] | None
) -> Callable[[dict], None]:
    if then is None:
        return first

    def cb(d: dict) -> None:
        first(d)
        then(d)

    return cb


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
