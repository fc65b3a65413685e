"""noisecraft's own model files: one ``.safetensors`` per model, its config in the metadata.

Three kinds (DESIGN.md contract 7, :mod:`noisecraft.io.checkpoint`):

* ``unet``: a pixel-space model (:class:`~noisecraft.models.pixel_diffusion.PixelDiffusion`):
  the U-Net's (EMA) state dict; metadata: its config, the schedule, the parametrisation.
* ``latent_diffusion``: a text-to-image model
  (:class:`~noisecraft.models.latent_diffusion.LatentDiffusion`): tensors prefixed ``unet.``,
  ``vae.``, ``text_encoder.``; metadata: each config, the tokenizer
  (:mod:`noisecraft.io.tokenizer_spec`), the schedule, prediction, default size, clip skip.
* ``tiny_decoder``: a TAESD-like :class:`~noisecraft.models.tiny_decoder.TinyDecoder`
  (:func:`load_tiny_decoder` also reads TAESD's own files, :mod:`noisecraft.io.formats.taesd`).

Loading builds each module on the file's memory-mapped tensors (one copy of the weights,
:func:`~noisecraft.io.build.build_module`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.build import build_module
from noisecraft.io.checkpoint import (
    METADATA_KEY,
    CheckpointInfo,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from noisecraft.io.formats.taesd import read_taesd_decoder
from noisecraft.io.safe_read import read_safetensors_metadata, sniff_format
from noisecraft.io.tokenizer_spec import tokenizer_from_spec, tokenizer_spec
from noisecraft.models.latent_diffusion import LatentDiffusion, vae_dtype_for
from noisecraft.models.pixel_diffusion import PixelDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig

PIXEL_KIND = "unet"
LATENT_KIND = "latent_diffusion"
TINY_DECODER_KIND = "tiny_decoder"


# ---------------------------------------------------------------------------- pixel


def save_pixel_diffusion(
    model: PixelDiffusion,
    path: str | os.PathLike,
    *,
    training: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a pixel model as a native ``unet`` checkpoint."""
    info = CheckpointInfo(
        kind=PIXEL_KIND,
        config=model.unet.config.to_dict(),
        diffusion={
            "schedule": model.schedule.to_config(),
            "prediction": model.prediction,
            "learned_variance": model.learned_variance,
            "image_size": model.image_size,
        },
        training=training or (model.info.training if model.info else {}),
    )
    return save_checkpoint(path, model.unet.state_dict(), info, overwrite=overwrite)


def load_pixel_diffusion(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> PixelDiffusion:
    """Rebuild a pixel model from a native ``unet`` checkpoint (its EMA weights)."""
    tensors, info = load_checkpoint(path, expect_kind=PIXEL_KIND)
    unet = UNet(UNetConfig.from_dict(info.config))
    unet.load_state_dict(tensors)
    unet.to(device).eval().requires_grad_(False)
    diff = info.diffusion
    return PixelDiffusion(
        unet=unet,
        schedule=NoiseSchedule.from_config(diff["schedule"]),
        prediction=diff.get("prediction", "eps"),
        learned_variance=bool(diff.get("learned_variance", False)),
        image_size=int(diff.get("image_size", 28)),
        info=info,
    )


# ---------------------------------------------------------------------------- latent


def save_latent_diffusion(
    model: LatentDiffusion,
    path: str | os.PathLike,
    *,
    training: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the whole latent model to one native ``latent_diffusion`` file."""
    info = CheckpointInfo(
        kind=LATENT_KIND,
        config={
            "unet": model.unet.config.to_dict(),
            "vae": model.vae.config.to_dict(),
            "text_encoder": model.text_encoder.config.to_dict(),
            "tokenizer": tokenizer_spec(model.tokenizer),
        },
        diffusion={
            "schedule": model.schedule.to_config(),
            "prediction": model.prediction,
            "image_size": model.image_size,
            "clip_skip": model.clip_skip,
            "vae_scaling_factor": model.vae.config.scaling_factor,
            "sample_posterior": model.sample_posterior,
            "prompt_weighting": model.prompt_weighting,
        },
        training=training or (model.info.training if model.info else {}),
    )
    tensors: dict[str, Tensor] = {}
    for prefix, module in (
        ("unet.", model.unet),
        ("vae.", model.vae),
        ("text_encoder.", model.text_encoder),
    ):
        tensors.update({prefix + k: v for k, v in module.state_dict().items()})
    return save_checkpoint(path, tensors, info, overwrite=overwrite)


def load_latent_diffusion(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    unet_dtype: torch.dtype | None = None,
) -> LatentDiffusion:
    """Rebuild a latent model from a native ``latent_diffusion`` checkpoint.

    The weights are the file's memory-mapped tensors (one copy; see
    :func:`~noisecraft.io.build.build_module`), cast to ``dtype`` and moved to ``device``
    tensor by tensor. On CUDA ``dtype=torch.float16`` or ``torch.bfloat16`` halves the
    weights' memory. ``vae_dtype`` (None = ``dtype``, except float32 when ``dtype`` is
    float16) is the VAE's: SD 1.x / SDXL VAE decoders have activations beyond float16's
    range (65504) at large sizes and then decode to NaN / black images, which is why
    diffusers upcasts the VAE (``force_upcast``); bfloat16 has float32's range. The VAE
    is 8 % of SD 1.5's weights, so keeping it in float32 costs little. ``unet_dtype``
    (None = ``dtype``) is the U-Net's alone (bfloat16 on a CPU: cast straight from the file).
    """
    if vae_dtype is None:
        vae_dtype = vae_dtype_for(dtype)
    tensors, info = load_checkpoint(path, expect_kind=LATENT_KIND)
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
            raise CheckpointError(f"{path}: unexpected tensor {key}; not a latent_diffusion file")
        parts[prefix][rest] = value
    classes = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder}
    dtypes = {"unet": unet_dtype or dtype, "vae": vae_dtype, "text_encoder": dtype}
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
    return LatentDiffusion(
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


# ---------------------------------------------------------------------------- tiny decoder


def save_tiny_decoder(
    decoder: TinyDecoder,
    path: str | os.PathLike,
    *,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``decoder`` as one native checkpoint of kind "tiny_decoder" (``dtype``: store
    the floating-point weights in that dtype, e.g. float16 to halve the file)."""
    info = CheckpointInfo(
        kind=TINY_DECODER_KIND, config=decoder.config.to_dict(), training=training or {}
    )
    sd = decoder.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return save_checkpoint(path, sd, info, overwrite=overwrite)


def load_tiny_decoder(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TinyDecoder:
    """Rebuild a :class:`TinyDecoder` (eval, frozen) from a native "tiny_decoder" checkpoint,
    or from a TAESD decoder: ``taesd_decoder.safetensors`` / ``.pth`` or a diffusers
    ``AutoencoderTiny`` folder / its weights file (:mod:`noisecraft.io.formats.taesd`); the
    format is told by the file's metadata and keys, not its name."""
    if _is_native(path):
        tensors, info = load_checkpoint(path, expect_kind=TINY_DECODER_KIND)
        config = TinyDecoderConfig.from_dict(info.config)
        what = "tiny decoder"
    else:
        tensors, config = read_taesd_decoder(path)
        what = "TAESD decoder"
    return build_module(
        lambda: TinyDecoder(config),
        tensors,
        what=what,
        source=path,
        device=device,
        dtype=dtype,
    )


def _is_native(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.safetensors`` file with noisecraft metadata."""
    path = Path(path)
    if not path.is_file() or sniff_format(path) != "safetensors":
        return False
    return METADATA_KEY in read_safetensors_metadata(path)


# ---------------------------------------------------------------------------- any kind


def save_model(
    model: PixelDiffusion | LatentDiffusion,
    path: str | os.PathLike,
    *,
    training: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a pixel or latent model as a native file (atomically; refuses to overwrite
    unless ``overwrite``)."""
    if isinstance(model, LatentDiffusion):
        return save_latent_diffusion(model, path, training=training, overwrite=overwrite)
    if isinstance(model, PixelDiffusion):
        return save_pixel_diffusion(model, path, training=training, overwrite=overwrite)
    raise ConfigError(f"cannot save a {type(model).__name__}; give a noisecraft model")


def load_native(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    unet_dtype: torch.dtype = torch.float32,
) -> PixelDiffusion | LatentDiffusion:
    """A native pixel or latent model file, whichever kind it holds (``unet_dtype``: a latent
    model's U-Net weights; a pixel model is float32)."""
    kind = read_info(path).kind
    if kind == PIXEL_KIND:
        return load_pixel_diffusion(path, device=device)
    if kind == LATENT_KIND:
        return load_latent_diffusion(path, device=device, unet_dtype=unet_dtype)
    raise CheckpointError(
        f"{path} holds a '{kind}' model; give a '{PIXEL_KIND}' or '{LATENT_KIND}' checkpoint"
    )


__all__ = [
    "LATENT_KIND",
    "PIXEL_KIND",
    "TINY_DECODER_KIND",
    "load_latent_diffusion",
    "load_native",
    "load_pixel_diffusion",
    "load_tiny_decoder",
    "save_latent_diffusion",
    "save_model",
    "save_pixel_diffusion",
    "save_tiny_decoder",
]
