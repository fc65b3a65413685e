"""Latent diffusion with a text encoder: U-Net + VAE + CLIP text encoder + tokenizer + schedule.

Rombach et al. 2022 (LDM): the diffusion model works on the VAE's latents ``z = E(x)``
(scaled by the VAE's ``scaling_factor``), conditioned on a prompt through cross-attention to
the text encoder's last hidden state (sec. 3.3). :class:`LatentDiffusion` implements the
:class:`~noisecraft.pipelines.generate.DiffusionModel` protocol, so text-to-image, img2img
and inpainting all run through the one :func:`~noisecraft.pipelines.generate.generate`.

A saved model is ONE native ``.safetensors`` file (kind ``latent_diffusion``): tensors
prefixed ``unet.``, ``vae.``, ``text_encoder.``; the metadata holds each config, the
schedule, the parametrisation, the VAE scaling factor and the tokenizer: ``"clip-default"``
for the shipped OpenAI vocabulary, or the whole vocabulary (``vocab.json`` and
``merges.txt`` contents as strings) for any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion import DiscreteDenoiser, NoiseSchedule
from noisecraft.diffusion.parametrization import c_skip_for, check_prediction
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.build import build_module
from noisecraft.io.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from noisecraft.models.text_encoder import (
    CLIPTextEncoder,
    TextEncoderConfig,
    encode_prompt_chunks,
)
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.models.vae_tiling import decode_latents
from noisecraft.pipelines.generate import (
    TIMESTEP_SPACINGS,
    GenerateRequest,
    image_size,
    latent_to_rgb,
)

KIND = "latent_diffusion"
DEFAULT_TOKENIZER = "clip-default"

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
    info: CheckpointInfo | None = None
    x0_range: tuple[float, float] | None = None
    execution_device: torch.device | None = None
    offload: Any = None
    tiny_decoder: Any = None

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

    def check_request(self, request: GenerateRequest) -> None:
        if request.classes is not None:
            raise ConfigError("this model takes a prompt, not --class")

    def latent_shape(self, request: GenerateRequest) -> tuple[int, int, int]:
        h, w = image_size(self, request)
        f = self.downsample_factor
        return (self.latent_channels, h // f, w // f)

    def conditioning(
        self, request: GenerateRequest, start: int, stop: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Text ``context`` of images ``start:stop``; with CFG also the negative prompts'.

        Prompts and negative prompts are encoded in one batch, so both come out with the
        same number of 77-token chunks (shorter ones padded with empty-prompt chunks).
        """
        prompts = request.image_prompts()[start:stop]
        if request.cfg == 1.0:
            return {"context": self.encode_prompt(prompts)}, None
        negatives = request.image_negative_prompts()[start:stop]
        both = self.encode_prompt(prompts + negatives)
        cond, uncond = both.split(len(prompts))
        return {"context": cond}, {"context": uncond}

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
                f"({v.z_channels}, {v.downsample_factor}, {v.out_channels}); use one trained "
                "for this model"
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
        return latent_to_rgb(denoised)

    def c_skip(self, sigma: Tensor) -> Tensor:
        return c_skip_for(self.prediction, sigma)

    # ------------------------------------------------------------------ prompts
    def _tokenize(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        """(n_chunks, 77) ids and weights (None = all 1) of one prompt; never truncated."""
        tok = self.tokenizer
        if self.prompt_weighting and hasattr(tok, "encode_weighted"):
            ids, weights = tok.encode_weighted(prompt)
            return ids, None if bool((weights == 1).all()) else weights
        if hasattr(tok, "encode_chunks"):
            return tok.encode_chunks(prompt), None
        ids = tok([prompt])
        return ids.reshape(-1, ids.shape[-1]), None

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Text encoder context of each prompt: (B, 77 * k, width).

        Long prompts are split into 75-token chunks (A1111), each encoded on its own and
        concatenated, with A1111 emphasis weights when the tokenizer reads them. Within a
        batch every prompt gets the largest chunk count ``k``; shorter ones are padded with
        the encoding of the empty prompt, as A1111 pads cond and uncond. (So a prompt padded
        in a mixed batch does not give the same image as alone.)
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tokenized = [self._tokenize(p) for p in prompts]
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
        z = encode_prompt_chunks(self.text_encoder, ids, weights, clip_skip=self.clip_skip)
        return z.reshape(len(prompts), -1, z.shape[-1])

    # ------------------------------------------------------------------ save / load
    def save(
        self, path: str | os.PathLike, *, training: dict | None = None, overwrite: bool = False
    ) -> None:
        """Write the whole model to one native ``.safetensors`` file (kind latent_diffusion)."""
        info = CheckpointInfo(
            kind=KIND,
            config={
                "unet": self.unet.config.to_dict(),
                "vae": self.vae.config.to_dict(),
                "text_encoder": self.text_encoder.config.to_dict(),
                "tokenizer": tokenizer_spec(self.tokenizer),
            },
            diffusion={
                "schedule": self.schedule.to_config(),
                "prediction": self.prediction,
                "image_size": self.image_size,
                "clip_skip": self.clip_skip,
                "vae_scaling_factor": self.vae.config.scaling_factor,
                "sample_posterior": self.sample_posterior,
                "prompt_weighting": self.prompt_weighting,
            },
            training=training or (self.info.training if self.info else {}),
        )
        tensors: dict[str, Tensor] = {}
        for prefix, module in (
            ("unet.", self.unet),
            ("vae.", self.vae),
            ("text_encoder.", self.text_encoder),
        ):
            tensors.update({prefix + k: v for k, v in module.state_dict().items()})
        save_checkpoint(path, tensors, info, overwrite=overwrite)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
    ) -> LatentDiffusion:
        """Rebuild the model from a native ``latent_diffusion`` checkpoint.

        The weights are the file's memory-mapped tensors (one copy; see
        :func:`~noisecraft.io.build.build_module`), cast to ``dtype`` and moved to ``device``
        tensor by tensor. On CUDA ``dtype=torch.float16`` or ``torch.bfloat16`` halves the
        weights' memory. ``vae_dtype`` (None = ``dtype``, except float32 when ``dtype`` is
        float16) is the VAE's: SD 1.x / SDXL VAE decoders have activations beyond float16's
        range (65504) at large sizes and then decode to NaN / black images, which is why
        diffusers upcasts the VAE (``force_upcast``); bfloat16 has float32's range. The VAE
        is 8 % of SD 1.5's weights, so keeping it in float32 costs little.
        """
        if vae_dtype is None:
            vae_dtype = vae_dtype_for(dtype)
        tensors, info = load_checkpoint(path, expect_kind=KIND)
        cfg = info.config
        try:
            configs = {
                "unet": UNetConfig.from_dict(cfg["unet"]),
                "vae": VAEConfig.from_dict(cfg["vae"]),
                "text_encoder": TextEncoderConfig.from_dict(cfg["text_encoder"]),
            }
            tokenizer = tokenizer_from_spec(cfg["tokenizer"])
        except KeyError as e:
            raise CheckpointError(
                f"{path}: the metadata has no {e} config; re-save the model"
            ) from None
        parts: dict[str, dict[str, Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
        for key, value in tensors.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise CheckpointError(
                    f"{path}: unexpected tensor {key}; not a latent_diffusion file"
                )
            parts[prefix][rest] = value
        classes = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder}
        dtypes = {"unet": dtype, "vae": vae_dtype, "text_encoder": dtype}
        unet, vae, text_encoder = (
            build_module(
                lambda n=name: classes[n](configs[n]),
                parts.pop(name),
                what=name,
                source=path,
                dtype=dtypes[name],
                device=device,
            )
            for name in ("unet", "vae", "text_encoder")
        )
        del tensors
        diff = info.diffusion
        return cls(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            schedule=NoiseSchedule.from_config(diff["schedule"]),
            prediction=diff.get("prediction", "eps"),
            image_size=int(diff.get("image_size", 512)),
            clip_skip=diff.get("clip_skip"),
            sample_posterior=bool(diff.get("sample_posterior", True)),
            prompt_weighting=bool(diff.get("prompt_weighting", True)),
            info=info,
        )

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
        (:func:`noisecraft.pipelines.fast.quantize_int8`); the VAE stays float32. Fast mode's
        ``int8`` option; docs/performance.md gives its speed and quality cost. ``inplace``
        quantises this model's own modules (no float32 copy; this model changes too)."""
        from noisecraft.pipelines.fast import quantize_int8

        unet = quantize_int8(self.unet, convs=convs, inplace=inplace)
        changes: dict[str, Any] = {"unet": unet}
        if text_encoder:
            changes["text_encoder"] = quantize_int8(self.text_encoder, skip=(), inplace=inplace)
        return self.replace(**changes)


def vae_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype when the rest runs in ``dtype``: float32 for float16 (SD's VAE decoder
    overflows float16 at large sizes; diffusers' ``force_upcast``), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


# ---------------------------------------------------------------------------- tokenizer io


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """JSON description of a :class:`~noisecraft.models.tokenizer.CLIPTokenizer`.

    ``{"name": "clip-default", ...settings}`` for the shipped OpenAI vocabulary, else
    ``{"name": "custom", "vocab_json": ..., "merges_txt": ..., ...}`` with the vocabulary
    files' contents as strings, so the checkpoint alone rebuilds the tokenizer.
    """
    from noisecraft.models.tokenizer import CLIPTokenizer

    if not isinstance(tokenizer, CLIPTokenizer):
        raise ConfigError(
            f"cannot save a tokenizer of type {type(tokenizer).__name__}; "
            "LatentDiffusion.save needs a noisecraft CLIPTokenizer"
        )
    decoder = {i: t for t, i in tokenizer.vocab.items()}
    spec: dict[str, Any] = {
        "pad_token_id": tokenizer.pad_token_id,
        "context_length": tokenizer.context_length,
        "cleanup": tokenizer.cleanup,
        "bos_token": decoder[tokenizer.bos_token_id],
        "eos_token": decoder[tokenizer.eos_token_id],
    }
    default = CLIPTokenizer.default()
    if tokenizer.merges == default.merges and dict(tokenizer.vocab) == dict(default.vocab):
        return {"name": DEFAULT_TOKENIZER, **spec}
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    vocab = json.dumps(dict(tokenizer.vocab), ensure_ascii=False)
    return {"name": "custom", "vocab_json": vocab, "merges_txt": merges, **spec}


def tokenizer_from_spec(spec: dict[str, Any]) -> Any:
    """Inverse of :func:`tokenizer_spec`."""
    from noisecraft.models.tokenizer import CLIPTokenizer

    kwargs = {
        "pad_token_id": spec.get("pad_token_id"),
        "context_length": int(spec.get("context_length", 77)),
        "cleanup": spec.get("cleanup", "clip"),
    }
    name = spec.get("name")
    if name == DEFAULT_TOKENIZER:
        return CLIPTokenizer.default(**kwargs)
    if name == "custom":
        try:
            vocab = json.loads(spec["vocab_json"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"corrupt tokenizer vocabulary in the checkpoint ({e})") from None
        merges = []
        for line in spec.get("merges_txt", "").split("\n"):
            if not line.strip() or line.startswith("#version"):
                continue
            a, b = line.split()
            merges.append((a, b))
        return CLIPTokenizer(
            vocab,
            merges,
            bos_token=spec.get("bos_token", "<|startoftext|>"),
            eos_token=spec.get("eos_token", "<|endoftext|>"),
            **kwargs,
        )
    raise CheckpointError(f"unknown tokenizer '{name}' in the checkpoint; upgrade noisecraft")


__all__ = ["KIND", "LatentDiffusion", "tokenizer_from_spec", "tokenizer_spec"]
