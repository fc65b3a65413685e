"""The public generation API: a loaded model plus the policy every surface shares.

>>> import noisecraft
>>> pipe = noisecraft.load("mnist-text")                      # doctest: +SKIP
>>> result = pipe("a handwritten 7", seed=1, n=4)            # doctest: +SKIP
>>> result.images[0].save("seven.png")                       # doctest: +SKIP
>>> again = pipe.replay(result.infotexts[3])                 # the fourth image, alone

What this module decides, once, for the command line, the coming HTTP server and Python
users alike: the defaults (DPM++ 2M, 20 steps, CFG 7 for text-to-image and 2 for the class
model; fast mode's sampler and steps), which diffusers scheduler an imported Stable Diffusion
model samples with (so a seed gives diffusers' image), how seeds number a batch (image ``i``
has seed ``seed + i``, A1111's rule; ``-1`` draws a random one), the A1111 ``parameters``
text of each image (with its LoRAs: :mod:`noisecraft.api.loras`), and how such a text is
replayed. Every check of a setting is made by the one validated
:class:`~noisecraft.pipelines.generate.GenerateRequest` (and
:class:`~noisecraft.api.options.LoadOptions` for loading); errors name the setting as it is
called here, and the CLI shows its flag instead.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from noisecraft.api.embeddings import check_embeddings, embedding_set, ti_hashes
from noisecraft.api.images import ImageLike, image_tensor, mask_tensor, to_pil
from noisecraft.api.infotext import check_modes, mode_fields, read_parameters, settings_of
from noisecraft.api.limits import Limits
from noisecraft.api.loras import LORA_HASHES, LoadedLoRA, PipelineLoRAs, format_lora_hashes
from noisecraft.api.observed import Observed, attention_maps
from noisecraft.api.options import LoadOptions
from noisecraft.api.result import GenerationResult
from noisecraft.errors import ConfigError
from noisecraft.io.formats.single_file import SingleFileInfo
from noisecraft.models import LatentDiffusion
from noisecraft.pipelines import GenerateRequest, count_steps, generate
from noisecraft.pipelines.backends import as_model
from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG
from noisecraft.pipelines.fast import FAST
from noisecraft.pipelines.observe import Observation, Observer
from noisecraft.pipelines.png_params import (
    format_parameters,
    sampler_display,
)
from noisecraft.samplers import SamplerSpec, as_spec

DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 20
#: Classifier-free guidance scale by model family (the class model was tuned at 2).
DEFAULT_CFG = {"latent": 7.0, "pixel": 2.0}
#: The largest seed A1111 draws for ``-1`` (``random.randrange(4294967294)``).
RANDOM_SEED_RANGE = 4294967294


#: Steps of an LCM student when a call gives none (LCM paper: 2-4 steps).
LCM_STEPS = 4


class Pipeline:
    """A loaded model that makes images (module docstring). Build it with
    :func:`noisecraft.load`; ``model`` is the loaded
    :class:`~noisecraft.models.LatentDiffusion` or :class:`~noisecraft.models.PixelDiffusion`,
    ``name`` what the infotext calls it (``Model:``), ``limits`` what one call may ask for
    (:class:`~noisecraft.api.limits.Limits`)."""

    def __init__(
        self,
        model: Any,
        *,
        name: str = "model",
        options: LoadOptions | None = None,
        limits: Limits | None = None,
        decoder_name: str | None = None,
        loras: PipelineLoRAs | None = None,
    ):
        self.model = model
        self.name = name
        self.options = options or LoadOptions()
        self.limits = limits or Limits()
        self.decoder_name = decoder_name  # the tiny decoder's, for the infotext
        self._loras = loras or PipelineLoRAs(self.options.lora_dir)
        if isinstance(model, LatentDiffusion):
            from noisecraft.pipelines.lowmem import quantize_per_channel

            self._loras.bind(model, quantize_per_channel)

    # ------------------------------------------------------------------ LoRAs
    def load_lora(self, path: str | os.PathLike, weight: float = 1.0) -> LoadedLoRA:
        """Apply the LoRA file ``path`` (kohya / A1111 or diffusers / PEFT layout) with
        ``weight`` to every call until unloaded; several may be loaded
        (:mod:`noisecraft.api.loras`). Returns its entry (name = the file's stem)."""
        return self._loras.load(path, weight)

    def unload_lora(self, name: str) -> None:
        """Stop applying the loaded LoRA ``name``; its layers get their weights back exactly."""
        self._loras.unload(name)

    def unload_loras(self) -> None:
        """Stop applying every loaded LoRA (the base weights come back bit for bit)."""
        self._loras.unload()

    @property
    def loras(self) -> list[LoadedLoRA]:
        """The loaded LoRAs (name, path, weights, A1111 hash), in the order applied."""
        return self._loras.loaded

    @property
    def model_has_tiny_decoder(self) -> bool:
        return getattr(self.model, "tiny_decoder", None) is not None

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {self.kind}, device={self.options.device!r})"

    @property
    def kind(self) -> str:
        """ "latent" (text-to-image) or "pixel" (class-conditional or unconditional)."""
        return "latent" if isinstance(self.model, LatentDiffusion) else "pixel"

    def preview(self, denoised: Any, mode: str = "cheap") -> Image.Image:
        """A picture of a step's x0 estimate (``callback``'s ``denoised``, first image):
        ``"cheap"`` maps latents linearly to RGB at latent resolution (A1111's "Approx
        cheap"), ``"tiny"`` decodes with the tiny decoder, ``"vae"`` with the VAE. A pixel
        model's estimate is the picture itself."""
        with torch.no_grad():
            x = as_model(self.model).preview(denoised[:1], mode)
        return to_pil(x[0].float().cpu())

    def load_embedding(self, path: str | os.PathLike, token: str | None = None) -> Any:
        """Load a textual-inversion embedding (:mod:`noisecraft.adapters.embeddings`): the
        word ``token`` (default: the file's stem as in A1111, or the token a diffusers file
        names) in a prompt is then replaced by its vectors. Returns the embedding."""
        return embedding_set(self.model).load(path, token)

    # ------------------------------------------------------------------ policy
    def defaults(self) -> dict[str, Any]:
        """Sampler, schedule, steps and CFG used where a call gives none."""
        fast = self.options.fast
        if self.options.lcm_unet is not None:  # a consistency student: few steps, no CFG
            return {"sampler": "LCM", "schedule": None, "steps": LCM_STEPS, "cfg": 1.0}
        return {
            "sampler": FAST.sampler if fast else DEFAULT_SAMPLER,
            "schedule": FAST.spacing if fast else None,
            "steps": FAST.steps if fast else DEFAULT_STEPS,
            "cfg": DEFAULT_CFG[self.kind],
        }

    def scheduler_config(self, sampler: str | SamplerSpec) -> dict[str, Any] | None:
        """The diffusers scheduler config an imported Stable Diffusion model samples with, so
        that a seed gives the image diffusers gives: the folder's own
        ``scheduler_config.json``, or SD 1.5's for a single file. None (noisecraft's own
        rules) for native models and for samplers diffusers has no scheduler for."""
        info = getattr(self.model, "info", None)
        if info is None or as_spec(sampler).record.diffusers_scheduler is None:
            return None
        saved = info.diffusion.get("scheduler")
        if saved:
            return dict(saved["config"])
        if isinstance(info, SingleFileInfo):
            return dict(SD15_SCHEDULER_CONFIG)
        return None

    # ------------------------------------------------------------------ requests
    def request(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] = "",
        steps: int | None = None,
        cfg: float | None = None,
        seed: int = 0,
        sampler: str | SamplerSpec | None = None,
        schedule: str | None = None,
        width: int | None = None,
        height: int | None = None,
        init_image: ImageLike | None = None,
        strength: float | None = None,
        mask: ImageLike | None = None,
        n: int | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        class_label: int | Sequence[int] | None = None,
        eta: float | None = None,
        tiling: bool | None = None,
        fast_decode: bool | None = None,
    ) -> GenerateRequest:
        """The :class:`GenerateRequest` a call with these settings runs, defaults filled in
        (see :meth:`__call__` for the settings)."""
        d = self.defaults()
        if sampler is None:
            sampler, schedule = d["sampler"], schedule if schedule is not None else d["schedule"]
        spec = as_spec(sampler, schedule)  # the sampler choice, parsed once
        if n is None:  # one image per prompt of a list, else one
            n = len(prompt) if isinstance(prompt, (list, tuple)) else 1
        seed = _seed(seed)
        latent = self.kind == "latent"
        prompts = None
        if prompt is not None or latent:
            prompts = [prompt or ""] if prompt is None or isinstance(prompt, str) else prompt
        channels = self.model.vae.config.in_channels if latent else self.model.image_shape[0]
        if fast_decode is None:
            fast_decode = self.options.fast and self.model_has_tiny_decoder
        return GenerateRequest(
            n=n,
            sampler=spec,
            scheduler_config=self.scheduler_config(spec),
            steps=d["steps"] if steps is None else steps,
            cfg=d["cfg"] if cfg is None else cfg,
            classes=_classes(class_label, n),
            seed=seed,
            seeds=[seed + i for i in range(n)] if _is_int(n) and n >= 1 and _is_int(seed) else None,
            eta=eta,
            prompts=prompts,
            negative_prompt=negative_prompt,
            guidance_rescale=guidance_rescale,
            clip_skip=clip_skip,
            width=width,
            height=height,
            init_image=None if init_image is None else image_tensor(init_image, channels),
            strength=strength,
            mask=None if mask is None else mask_tensor(mask),
            vae_tiling=tiling
            if tiling is not None
            else (True if self.options.low_memory else None),
            fast=FAST if self.options.fast else None,
            fast_decode=fast_decode,
        )

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        callback: Callable[[dict], None] | None = None,
        progress: bool = False,
        observe: Observer | None = None,
        **settings: Any,
    ) -> GenerationResult:
        """Make images. ``prompt`` (text-to-image models; one, or one per image; A1111's
        ``<lora:NAME:W>`` tags apply LoRAs for this call, :mod:`noisecraft.api.loras`) and:

        * ``negative_prompt``: what to steer away from (the unconditional half of CFG);
        * ``steps``, ``cfg`` (guidance scale; 1 = no guidance), ``sampler`` (noisecraft or
          A1111 names, e.g. "DPM++ 2M Karras"; ``noisecraft samplers`` lists them) and
          ``schedule`` (A1111's Schedule type: "karras", "exponential", ...);
        * ``seed``: image ``i`` gets ``seed + i``; -1 draws a random seed;
        * ``n`` images (default: one per prompt of a list, else 1) of ``width`` x ``height``
          pixels (default: the model's size, or the init image's);
        * ``init_image`` (PIL image, path, array or tensor) with ``strength`` for img2img,
          plus ``mask`` (white = repaint) for inpainting;
        * ``guidance_rescale`` (Lin et al. 2023), ``clip_skip`` (A1111's), ``eta``;
        * ``class_label``: the class (or one per image) of a class-conditional model;
        * ``tiling``: decode in tiles (None = automatic), ``fast_decode``: decode with the
          tiny decoder;
        * ``callback(step)`` after every sampler step (``step`` holds ``i``, ``x``,
          ``sigma``, ``denoised``, the run's ``start`` / ``stop`` images, ``step`` / ``total``
          counted over the whole call); ``progress`` shows a progress bar;
        * ``observe``: an :class:`~noisecraft.pipelines.observe.Observer`; what it records
          is ``result.observed`` (:mod:`noisecraft.api.observed`): with ``attention=True``
          each image's cross-attention map per prompt word (DAAM), as arrays and overlays.
        """
        written, loras = None, []
        if self.kind == "latent":  # <lora:NAME:W> tags: removed from the text, applied
            texts = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
            stripped, loras = self._loras.for_call(texts)
            written = [self._loras.written_prompt(t, loras) for t in texts]
            if prompt is not None:
                prompt = stripped[0] if isinstance(prompt, str) else stripped
        req = self.request(prompt, **settings)
        req.validate(self.model)  # every mistake is reported before any output starts
        req = self.limits.apply(self.model, req, self.options.device)  # or refused: too large
        total = count_steps(self.model, req) if callback is not None or progress else 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total, desc=f"generating {req.n} image(s) ({req.spec}, {req.steps} steps)"
            )
        observation = self._observation(observe)
        done = 0

        def on_step(d: dict) -> None:
            nonlocal done
            done += 1
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback({**d, "step": done, "total": total})

        try:
            images = generate(
                self.model, req, callback=on_step if total else None, observation=observation
            )
        finally:
            if bar is not None:
                bar.close()
        pil = [to_pil(x) for x in images]
        return GenerationResult(
            images=pil,
            seeds=req.image_seeds(),
            infotexts=[
                self.infotext(
                    req,
                    i,
                    x.shape[-1],
                    x.shape[-2],
                    prompt=None if written is None else _per_image(written, req.n)[i],
                    loras=loras,
                )
                for i, x in enumerate(images)
            ],
            tensors=images,
            request=req,
            observed=None if observation is None else self._observed(req, observation, pil),
        )

    def _observation(self, observe: Observer | None) -> Observation | None:
        if observe is None:
            return None
        if not isinstance(observe, Observer):
            raise ConfigError(
                f"@observe must be an Observer, got {type(observe).__name__}", settings=["observe"]
            )
        if observe.attention and self.kind != "latent":
            raise ConfigError(
                "attention maps need a text-to-image model (this one has no cross-attention); "
                "leave out @observe",
                settings=["observe"],
            )
        if observe.attention and self.options.compile:
            raise ConfigError(
                "attention maps cannot be recorded from a compiled U-Net; load without compile",
                settings=["observe", "compile"],
            )
        return Observation(observe)

    def _observed(
        self, req: GenerateRequest, observation: Observation, images: list[Image.Image]
    ) -> Observed:
        if not observation.observer.attention:
            return Observed()
        prompts = req.image_prompts()
        return Observed(
            attention=[
                attention_maps(sums, self.model.prompt_words(prompts[i]), images[i])
                for i, sums in enumerate(observation.attention)
            ]
        )

    # ------------------------------------------------------------------ infotext
    def infotext(
        self,
        req: GenerateRequest,
        i: int,
        width: int,
        height: int,
        *,
        prompt: str | None = None,
        loras: Sequence[LoadedLoRA] = (),
    ) -> str:
        """Image ``i``'s A1111 ``parameters`` text; ``prompt``: the prompt as written (with
        its ``<lora:...>`` tags), ``loras``: the LoRAs applied (``Lora hashes``)."""
        latent = self.kind == "latent"
        diffusers = req.scheduler_config is not None
        display, schedule = sampler_display(req.spec, diffusers=diffusers)
        classes = req.classes
        if prompt is None:
            prompt = req.image_prompts()[i] if latent else ""
        negative = req.image_negative_prompts()[i] if latent else ""
        return format_parameters(
            prompt,
            negative,
            steps=req.steps,
            sampler=display,
            schedule_type=schedule,
            cfg_scale=req.cfg,
            seed=req.image_seeds()[i],
            width=width,
            height=height,
            model=self.name,
            denoising_strength=req.effective_strength(),
            clip_skip=self.model.effective_clip_skip(req.clip_skip) if latent else None,
            guidance_rescale=req.guidance_rescale,
            eta=req.eta,
            discard_penultimate_sigma=req.spec.discard_note(diffusers),
            extra={
                **({"Class": classes[i]} if classes is not None else {}),
                **mode_fields(self.options, req.fast_decode, self.decoder_name),
                **({LORA_HASHES: format_lora_hashes(loras)} if loras else {}),
                **(ti_hashes(self.model, prompt, negative) if latent else {}),
            },
        )

    def replay(self, source: str | os.PathLike | Image.Image, **overrides: Any) -> GenerationResult:
        """Make the image an A1111 ``parameters`` text describes again: ``source`` is the text
        itself, a PNG that carries it, or a PIL image read from one. ``overrides`` (any
        setting of :meth:`__call__`; None = keep the PNG's) replace what it says; an image
        made by img2img needs its ``init_image`` (and ``mask``) again."""
        params = read_parameters(source)
        check_modes(params, self.options, self.model_has_tiny_decoder)
        if LORA_HASHES in params.get("extra", {}):
            self._loras.check_hashes(params["extra"][LORA_HASHES])
        check_embeddings(params, self.model)
        settings = settings_of(params, self.kind == "latent")
        settings.update({k: v for k, v in overrides.items() if v is not None})
        if settings.get("init_image") is None and params.get("denoising_strength") is not None:
            raise ConfigError(
                f"this image was made by img2img (Denoising strength: "
                f"{params['denoising_strength']}); give the same @init_image (and @mask) again",
                settings=["init_image", "mask"],
            )
        if settings.get("init_image") is None:
            settings.pop("strength", None)
        return self(**settings)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seed(seed: Any) -> Any:
    """-1 = a random seed (A1111's convention); any other value is checked by the request."""
    return random.randrange(RANDOM_SEED_RANGE) if _is_int(seed) and seed == -1 else seed


def _per_image(texts: list[str], n: Any) -> list[str]:
    """One text per image, as :meth:`GenerateRequest.image_prompts` spreads prompts."""
    return texts * n if len(texts) == 1 and _is_int(n) else texts


def _classes(class_label: int | Sequence[int] | None, n: Any) -> list[int] | None:
    if class_label is None:
        return None
    if _is_int(class_label):
        return [class_label] * n if _is_int(n) and n >= 1 else [class_label]
    return list(class_label)


__all__ = ["DEFAULT_CFG", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "Pipeline"]
