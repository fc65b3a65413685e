"""Read an SD 1.x / 2.x single file (``.safetensors`` or ``.ckpt``) into a
:class:`~noisecraft.models.latent_diffusion.LatentDiffusion`.

The steps, each in its own module: refuse other kinds and infer every config
(:mod:`.detect`), split the tensors into parts by the layout's key tables
(:mod:`.ldm_layout`), pick the EMA or raw U-Net, build the parts on the meta device
(:mod:`noisecraft.io.build`), then the tokenizer, the schedule (SD's ``scaled_linear``
0.00085 to 0.012 over 1000 steps unless the file's ``betas`` say otherwise) and the
prediction (:mod:`.prediction`). Tokenizer: OpenAI CLIP's vocabulary, padded with the end
token (SD 1.x) or with id 0 (SD 2.x: diffusers' SD 2 ``tokenizer/special_tokens_map.json``
has ``pad_token: "!"``). Our own metadata (:mod:`.single_file_meta`), when present, wins
over every convention.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.build import build_module
from noisecraft.io.formats.detect import detect_architecture
from noisecraft.io.formats.ldm_layout import ema_key, split_ldm_state_dict
from noisecraft.io.formats.prediction import prediction_hint, probe_prediction
from noisecraft.io.formats.single_file_meta import (
    META_KEY,
    SingleFileInfo,
    parse_meta,
    stored_dtype,
)
from noisecraft.io.formats.vae_file import load_vae_file
from noisecraft.io.native import LATENT_KIND
from noisecraft.io.safe_read import read_checkpoint
from noisecraft.io.tokenizer_spec import tokenizer_from_spec, tokenizer_spec
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder
from noisecraft.models.unet import UNet
from noisecraft.models.vae import AutoencoderKL, VAEConfig

__all__ = ["load_single_file"]


def _schedule_from_betas(extras: Mapping[str, Tensor]) -> NoiseSchedule:
    """SD's scaled_linear schedule, unless the file's ``betas`` buffer differs from it."""
    sd_schedule = NoiseSchedule.scaled_linear()
    betas = extras.get("betas")
    if betas is None or betas.ndim != 1:
        return sd_schedule
    b = betas.to(torch.float64)
    if b.numel() == sd_schedule.num_steps and torch.allclose(
        b, sd_schedule.betas, rtol=1e-5, atol=0
    ):
        return sd_schedule
    return NoiseSchedule(b)


def load_single_file(
    path: str | os.PathLike,
    *,
    prediction: str | None = None,
    ema: bool | None = None,
    vae: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    family: str | None = None,
    unet_dtype: torch.dtype | None = None,
) -> LatentDiffusion:
    """Read an SD 1.x / 2.x single file (``.safetensors`` or ``.ckpt``) as a LatentDiffusion.

    * ``prediction``: "eps" or "v" overrides; else the file's own note (our metadata, a
      ``modelspec.prediction_type`` or ``v_pred`` key), else eps for SD 1.x and
      :func:`probe_prediction` for SD 2.x.
    * ``ema``: None uses the U-Net's EMA copy when the file has one (CompVis sampling),
      True requires it, False takes the raw weights.
    * ``vae``: the path of a VAE file replacing the checkpoint's (LDM or diffusers names).
    * ``dtype``: weights are widened to float32 by default (fp16 files compute in fp32 on
      CPU); None keeps the stored dtype. ``unet_dtype`` (None: ``dtype``) is the U-Net's
      alone: bfloat16 on the CPU casts its weights straight from the file's fp16 / fp32, with
      no float32 copy in between.
    * ``family``: "sd1" / "sd2" overrides the detected architecture family
      (:func:`detect_architecture`).

    What was loaded and why is in ``model.info.description`` (a :class:`SingleFileInfo`).
    """
    path = Path(path)
    source = str(path)
    if prediction is not None and prediction not in ("eps", "v"):
        raise ConfigError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    tensors, metadata = read_checkpoint(path)
    detected = detect_architecture(tensors, source, metadata, family)
    parts = split_ldm_state_dict(tensors)
    meta = parse_meta(metadata, source)

    # --- EMA
    unet_sd = parts.unet
    used_ema = False
    has_any_ema = bool(parts.ema) or bool(parts.ema_unmatched)
    if ema is True and not has_any_ema:
        raise CheckpointError(
            f"{source} has no EMA weights (model_ema.*); load it without ema=True"
        )
    if ema is not False and has_any_ema:
        missing = [k for k in parts.unet if k not in parts.ema]
        if missing or parts.ema_unmatched:
            what = (
                f"no EMA copy of {missing[0]} ({ema_key(missing[0])})"
                if missing
                else f"an EMA tensor {parts.ema_unmatched[0]} that matches no U-Net tensor"
            )
            raise CheckpointError(
                f"{source} has incomplete EMA weights: {what}; load it with ema=False to use "
                "the raw weights"
            )
        unet_sd, used_ema = parts.ema, True

    # --- modules
    def build(factory: Any, sd: Mapping[str, Tensor], what: str, as_dtype: Any = dtype) -> Any:
        try:
            return build_module(
                factory, sd, what=what, source=source, dtype=as_dtype, device=device
            )
        except ConfigError as e:
            raise CheckpointError(f"{source}: cannot build the {what} ({e})") from None

    unet = build(lambda: UNet(detected.unet), unet_sd, "U-Net", unet_dtype or dtype)
    text_encoder = build(
        lambda: CLIPTextEncoder(detected.text_encoder), parts.text_encoder, "text encoder"
    )
    if vae is not None:
        own = detected.vae or VAEConfig.sd()  # the model's latent scale, not the VAE file's
        vae_module = load_vae_file(
            vae,
            device=device,
            dtype=dtype,
            scaling_factor=own.scaling_factor,
            shift_factor=own.shift_factor,
        )
    elif detected.vae is not None:
        vae_module = build(lambda: AutoencoderKL(detected.vae), parts.vae, "VAE")
    else:
        raise CheckpointError(
            f"{source} has no VAE (first_stage_model.*); pass a VAE file as @vae",
            settings=["vae"],
        )

    # --- tokenizer, schedule, prediction
    if meta is not None and "tokenizer" in meta:
        tokenizer = tokenizer_from_spec(meta["tokenizer"])
    else:
        from noisecraft.models.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer.default(pad_token_id=0 if detected.family == "sd2" else None)
    if tokenizer.vocab_size != text_encoder.config.vocab_size:
        raise CheckpointError(
            f"{source}: the text encoder has {text_encoder.config.vocab_size} tokens but the "
            f"CLIP tokenizer {tokenizer.vocab_size}; not an SD text encoder"
        )
    diff = (meta or {}).get("diffusion", {})
    schedule = (
        NoiseSchedule.from_config(diff["schedule"])
        if "schedule" in diff
        else _schedule_from_betas(parts.extras)
    )
    try:
        model = LatentDiffusion(
            unet=unet,
            vae=vae_module,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            schedule=schedule,
            prediction=prediction or diff.get("prediction", "eps"),
            image_size=int(diff.get("image_size", 512)),
            clip_skip=diff.get("clip_skip"),
            sample_posterior=bool(diff.get("sample_posterior", True)),
            prompt_weighting=bool(diff.get("prompt_weighting", True)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: the parts do not fit together ({e})") from None

    hint = prediction_hint(metadata, tensors)
    if prediction is not None:
        why = "given"
    elif "prediction" in diff:
        why = f"{META_KEY} metadata"
    elif hint is not None:
        model = model.replace(prediction=hint[0])
        why = hint[1]
    elif detected.family == "sd1":
        why = "SD 1.x default"
    else:
        context = model.encode_prompt([""])
        found, slope = probe_prediction(unet, context, num_steps=schedule.num_steps)
        model = model.replace(prediction=found)
        why = f"U-Net probe at t={schedule.num_steps - 1}: slope {slope:.2f}"
    if "image_size" not in diff and detected.family == "sd2" and model.prediction == "v":
        model = model.replace(image_size=768)

    description = (
        f"{path.name}: {detected.description}; prediction {model.prediction} ({why})"
        + ("; EMA U-Net weights" if used_ema else "")
        + (f"; VAE from {Path(vae).name}" if vae is not None else "")
    )
    extras = dict(parts.extras)
    info = SingleFileInfo(
        kind=LATENT_KIND,
        config={
            "unet": unet.config.to_dict(),
            "vae": vae_module.config.to_dict(),
            "text_encoder": text_encoder.config.to_dict(),
            "tokenizer": tokenizer_spec(tokenizer),
        },
        diffusion={"schedule": schedule.to_config(), "prediction": model.prediction},
        produced_by=f"single file {path.name}",
        source=source,
        description=description,
        text_layout=parts.text_layout or "clip",
        dtypes={
            "unet": stored_dtype(unet_sd),
            "vae": stored_dtype(parts.vae) if vae is None else "float32",
            "text_encoder": stored_dtype(parts.text_encoder),
        },
        extras=extras,
    )
    return model.replace(info=info)
