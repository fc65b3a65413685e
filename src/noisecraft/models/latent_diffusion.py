"""Latent diffusion with a text encoder: U-Net + VAE + CLIP text encoder + tokenizer + schedule.

Rombach et al. 2022 (LDM): the diffusion model works on the VAE's latents ``z = E(x)``
(scaled by the VAE's ``scaling_factor``), conditioned on a prompt through cross-attention to
the text encoder's last hidden state (sec. 3.3). :class:`LatentDiffusion` holds the parts and
what each step of sampling needs from them (the denoiser, prompt encoding, VAE encode /
decode, previews); :mod:`noisecraft.pipelines` drives it, so text-to-image, img2img and
inpainting all run through the one ``generate()``.

Saved as ONE native ``.safetensors`` file (kind ``latent_diffusion``; written and read by
:mod:`noisecraft.io.native`): tensors prefixed ``unet.``, ``vae.``, ``text_encoder.``; the
metadata holds each config, the schedule, the parametrisation, the VAE scaling factor and
the tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion import DiscreteDenoiser, NoiseSchedule
from noisecraft.diffusion.parametrization import c_skip_for, check_prediction
from noisecraft.diffusion.sigmas import TIMESTEP_SPACINGS
from noisecraft.errors import ConfigError
from noisecraft.models.latent_preview import (
    SD_LATENT_RGB,
    fit_latent_rgb,
    latent_to_rgb,
    sd_latent_rgb,
)
from noisecraft.models.prompt_tokens import PromptWord, words_of_tokenizer
from noisecraft.models.text_encoder import CLIPTextEncoder, encode_prompt_chunks
from noisecraft.models.unet import UNet
from noisecraft.models.vae import AutoencoderKL
from noisecraft.models.vae_tiling import decode_latents
from noisecraft.nn.quantize import quantize_int8

#: Anything that maps a list of prompts to (B, 77) token ids; a CLIPTokenizer also chunks
#: long prompts (``encode_chunks``) and reads A1111 weights (``encode_weighted``).
Tokenizer = Callable[[list[str]], Tensor]


class _UNetCall:
    """``model(x_t, t, context=..., concat=...)`` for :class:`DiscreteDenoiser`.

    ``concat`` (a 9-channel inpainting U-Net's mask and masked-image latents) is appended to
    the *scaled* input, as diffusers does (``cat([scale_model_input(latents), mask,
    masked_latents])``): only the noisy latents are scaled by ``1 / sqrt(1 + sigma^2)``.

    A U-Net in half precision gets its floating-point inputs in its own dtype and its output
    is returned in the sampler's dtype (float32 latents): the sampler's arithmetic stays in
    float32 whatever the weights are.
    """

    def __init__(self, unet: UNet):
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor, *, concat: Tensor | None = None, **kw: Any) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        out_dtype = x.dtype
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        kw = {k: _cast(v, dtype) for k, v in kw.items()}
        return self.unet(x.to(dtype), t, **kw).to(out_dtype)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors (also in a list or tuple, e.g. ControlNet residuals) to ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


@dataclass(eq=False)
class LatentDiffusion:
    """What text-to-image sampling needs (see the module docstring).

    * ``prediction``: what the U-Net predicts, "eps" (SD 1.x, SD 2 base) or "v" (SD 2 768-v).
    * ``image_size``: default (square) image size in pixels (latents are ``1/8`` of it).
    * ``clip_skip``: 1 = last text encoder layer, 2 = penultimate (A1111 numbering); None
      = the text encoder config's default.
    * ``sample_posterior``: img2img / inpainting encode the init image with a sample of the
      VAE posterior drawn from the image's generator (diffusers' ``retrieve_latents``);
      False uses its mode (mean).
    * ``prompt_weighting``: read A1111 emphasis ``(word:1.2)`` / ``[word]`` and ``BREAK``
      (tokenizer's ``encode_weighted``); False tokenizes the text as it is (still chunked).
    * ``execution_device``: where inputs go and the sampler runs when it is not where the
      weights are; set by sequential CPU offload
      (:func:`~noisecraft.pipelines.offload.offload_latent_diffusion`), with ``offload`` its
      hooks. None = the U-Net's device.
    * ``tiny_decoder``: an optional TAESD-like
      :class:`~noisecraft.models.tiny_decoder.TinyDecoder` trained for this VAE, for
      ``preview="tiny"`` and ``GenerateRequest(fast_decode=True)`` (:meth:`tiny_decode`).
      Not saved with the model: it is its own checkpoint (kind ``"tiny_decoder"``).
    * ``textual_inversion``: the embeddings a prompt may name (Gal et al. 2022), an
      :class:`~noisecraft.adapters.embeddings.EmbeddingSet` or anything with its two members:
      called on a prompt fragment's token ids it returns them with each embedding's name
      replaced by a tuple of new ids (from the text encoder's ``vocab_size`` on), and
      ``vectors`` (k, width) are those ids' token vectors. Not saved with the model.
    """

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: Any
    schedule: NoiseSchedule
    prediction: str = "eps"
    image_size: int = 512
    clip_skip: int | None = None
    sample_posterior: bool = True
    prompt_weighting: bool = True
    info: Any = None  # the file's noisecraft.io.checkpoint.CheckpointInfo, if loaded
    x0_range: tuple[float, float] | None = None
    execution_device: torch.device | None = None
    offload: Any = None
    tiny_decoder: Any = None
    textual_inversion: Any = None
    _latent_rgb: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        self._check_tiny_decoder()
        u, z = self.unet.config, self.vae.config.z_channels
        if u.context_dim is None:
            raise ConfigError(
                "a text-to-image U-Net needs cross-attention: set context_dim in its config"
            )
        if u.context_dim != self.text_encoder.config.width:
            raise ConfigError(
                f"U-Net context_dim {u.context_dim} differs from the text encoder width "
                f"{self.text_encoder.config.width}; they must match"
            )
        if u.in_channels not in (z, 2 * z + 1) or u.out_channels != z or u.learn_sigma:
            raise ConfigError(
                f"U-Net in/out channels {u.in_channels}/{u.out_channels} do not fit the VAE's "
                f"{z} latent channels (in {z}, or {2 * z + 1} for inpainting; out {z})"
            )
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")

    # ------------------------------------------------------------------ protocol
    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:
            return self.execution_device
        return next(self.unet.parameters()).device

    @property
    def default_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_channels

    @property
    def downsample_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def per_image_seeds(self) -> bool:
        return True

    @property
    def inpaint_unet(self) -> bool:
        """A 9-channel inpainting U-Net: [latents, mask, masked-image latents]."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    def denoiser(self, spacing: str = "linspace") -> DiscreteDenoiser:
        """The U-Net as a denoiser; for leading / trailing / linspace spacing the timestep is
        recovered by inverting the linear-in-sigma interpolation, so the U-Net sees exactly
        diffusers' Euler timesteps (log-sigma interpolation for karras / exponential)."""
        interpolation = "linear" if spacing in TIMESTEP_SPACINGS else "log"
        return DiscreteDenoiser(
            _UNetCall(self.unet),
            self.schedule,
            self.prediction,
            timestep_interpolation=interpolation,
        )

    def encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (posterior sample or mode)."""
        images = images.to(device=self.device, dtype=next(self.vae.parameters()).dtype)
        return self.vae.encode_latents(images, generator, sample=self.sample_posterior)

    def decode(self, latents: Tensor, tiled: bool | None = None) -> Tensor:
        """Scaled latents -> images, roughly in [-1, 1].

        ``tiled``: decode in overlapping tiles (:mod:`~noisecraft.models.vae_tiling`), True /
        False to force it; None tiles only large images
        (:func:`~noisecraft.models.vae_tiling.decode_latents`).
        """
        return decode_latents(self.vae, latents.to(next(self.vae.parameters()).dtype), tiled)

    def inpaint_conditioning(self, mask: Tensor, masked_latents: Tensor) -> dict[str, Tensor]:
        """``concat`` = [mask (B, 1, h, w), masked-image latents (B, z, h, w)] for the U-Net."""
        return {"concat": torch.cat([mask.to(masked_latents.dtype), masked_latents], dim=1)}

    def _check_tiny_decoder(self) -> None:
        td = self.tiny_decoder
        if td is None:
            return
        v, c = self.vae.config, td.config
        if (c.latent_channels, c.upsample_factor, c.out_channels) != (
            v.z_channels,
            v.downsample_factor,
            v.out_channels,
        ):
            raise ConfigError(
                f"the tiny decoder ({c.latent_channels} latent channels, factor "
                f"{c.upsample_factor}, {c.out_channels} image channels) does not fit this VAE "
                f"({v.z_channels}, {v.downsample_factor}, {v.out_channels}); use one made for "
                "this model's latent space (TAESD's taesd_decoder for SD 1.x / 2.x; TAESD3 and "
                "TAEF1 decode the 16-channel latents of SD3 and FLUX)"
            )

    def tiny_decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] with :attr:`tiny_decoder` (TAESD-like, fast)."""
        if self.tiny_decoder is None:
            raise ConfigError("this model has no tiny decoder; set tiny_decoder first")
        return self.tiny_decoder.decode(latents)

    def preview(self, denoised: Tensor, mode: str) -> Tensor:
        if mode == "vae":
            return self.decode(denoised).clamp(-1, 1)
        if mode == "tiny":
            return self.tiny_decode(denoised)
        return latent_to_rgb(denoised, self.latent_rgb())

    def latent_rgb(self) -> Tensor:
        """(C + 1, out) factors of the cheap preview (:mod:`~noisecraft.models.latent_preview`):
        AUTOMATIC1111's for SD's VAE (4 latent channels, RGB), else fitted once to this
        model's VAE decoder and kept."""
        cfg = self.vae.config
        if cfg.z_channels == 4 and cfg.out_channels == 3:
            return sd_latent_rgb()
        if self._latent_rgb is None:
            self._latent_rgb = fit_latent_rgb(
                self.decode,
                lambda im: self.vae.encode_latents(im, None, sample=False),
                cfg.z_channels,
                device=self.device,
            )
        return self._latent_rgb

    def c_skip(self, sigma: Tensor) -> Tensor:
        return c_skip_for(self.prediction, sigma)

    # ------------------------------------------------------------------ prompts
    def tokenize_prompt(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        """(n_chunks, 77) ids and weights (None = all 1) of one prompt; never truncated.
        Ids from the text encoder's ``vocab_size`` on are :attr:`textual_inversion` vectors."""
        tok, ti = self.tokenizer, self.textual_inversion
        kw = {} if ti is None else {"embeddings": ti}
        if self.prompt_weighting and hasattr(tok, "encode_weighted"):
            ids, weights = tok.encode_weighted(prompt, **kw)
            return ids, None if bool((weights == 1).all()) else weights
        if hasattr(tok, "encode_chunks"):
            return tok.encode_chunks(prompt, **kw), None
        ids = tok([prompt])
        return ids.reshape(-1, ids.shape[-1]), None

    def prompt_words(self, prompt: str) -> list[PromptWord]:
        """The words of ``prompt`` with their positions in its context (the ids that
        :meth:`encode_prompt` encodes; :mod:`noisecraft.models.prompt_tokens`)."""
        if not hasattr(self.tokenizer, "vocab"):
            raise ConfigError("reading a prompt's words needs a CLIP tokenizer with a vocabulary")
        ids, weights = self.tokenize_prompt(prompt)
        ti, extra = self.textual_inversion, {}
        if ti is not None:  # an embedding's vectors read back as its name
            vocab = self.text_encoder.config.vocab_size
            extra = {i: ti.piece_of(i - vocab) for i in set(ids.flatten().tolist()) if i >= vocab}
        return words_of_tokenizer(ids, weights, self.tokenizer, extra=extra)

    def encode_prompt(self, prompts: Sequence[str], clip_skip: int | None = None) -> Tensor:
        """Text encoder context of each prompt: (B, 77 * k, width).

        ``clip_skip``: the text encoder layer to read, A1111's numbering (None = the model's
        :attr:`clip_skip`, else its text encoder config's).

        Long prompts are split into 75-token chunks (A1111), each encoded on its own and
        concatenated, with A1111 emphasis weights when the tokenizer reads them. Within a
        batch every prompt gets the largest chunk count ``k``; shorter ones are padded with
        the encoding of the empty prompt, as A1111 pads cond and uncond. (So a prompt padded
        in a mixed batch does not give the same image as alone.)
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tokenized = [self.tokenize_prompt(p) for p in prompts]
        k = max(ids.shape[0] for ids, _ in tokenized)
        empty = self.tokenizer([""]).reshape(1, -1)
        any_weights = any(w is not None for _, w in tokenized)
        all_ids, all_w = [], []
        for ids, w in tokenized:
            pad = k - ids.shape[0]
            if w is None:
                w = torch.ones(ids.shape, dtype=torch.float32)
            if pad:
                ids = torch.cat([ids, empty.expand(pad, -1)])
                w = torch.cat([w, torch.ones((pad, w.shape[1]), dtype=w.dtype)])
            all_ids.append(ids)
            all_w.append(w)
        ids = torch.cat(all_ids).to(self.device)
        weights = torch.cat(all_w) if any_weights else None
        skip = self.clip_skip if clip_skip is None else clip_skip
        extra = None if self.textual_inversion is None else self.textual_inversion.vectors
        z = encode_prompt_chunks(
            self.text_encoder, ids, weights, clip_skip=skip, extra_tokens=extra
        )
        return z.reshape(len(prompts), -1, z.shape[-1])

    def effective_clip_skip(self, clip_skip: int | None = None) -> int:
        """The clip skip a prompt is encoded with: ``clip_skip``, else the model's, else its
        text encoder config's (1 = the last layer)."""
        for value in (clip_skip, self.clip_skip, self.text_encoder.config.clip_skip):
            if value is not None:
                return int(value)
        return 1

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """The same model with its modules moved / cast in place (VAE: :func:`vae_dtype_for`);
        for a model already loaded in float32, e.g. from a diffusers folder."""
        for module, d in (
            (self.unet, dtype),
            (self.text_encoder, dtype),
            (self.vae, None if dtype is None else vae_dtype_for(dtype)),
        ):
            module.to(device=device, dtype=d)
        if self.tiny_decoder is not None:
            self.tiny_decoder.to(
                device=device, dtype=None if dtype is None else vae_dtype_for(dtype)
            )
        return self

    def replace(self, **changes: Any) -> LatentDiffusion:
        return dataclasses.replace(self, **changes)

    def int8(
        self, *, convs: bool = False, text_encoder: bool = True, inplace: bool = False
    ) -> LatentDiffusion:
        """A copy whose U-Net (and text encoder) Linear layers -- and with ``convs`` the
        U-Net's Conv2d layers -- are dynamically quantised to int8 for CPU inference
        (:func:`noisecraft.nn.quantize.quantize_int8`); the VAE stays float32. Fast mode's
        ``int8`` option; docs/performance.md gives its speed and quality cost. ``inplace``
        quantises this model's own modules (no float32 copy; this model changes too)."""
        unet = quantize_int8(self.unet, convs=convs, inplace=inplace)
        changes: dict[str, Any] = {"unet": unet}
        if text_encoder:
            changes["text_encoder"] = quantize_int8(self.text_encoder, skip=(), inplace=inplace)
        return self.replace(**changes)


def vae_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype when the rest runs in ``dtype``: float32 for float16 (SD's VAE decoder
    overflows float16 at large sizes; diffusers' ``force_upcast``), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


__all__ = ["SD_LATENT_RGB", "LatentDiffusion", "latent_to_rgb", "vae_dtype_for"]
