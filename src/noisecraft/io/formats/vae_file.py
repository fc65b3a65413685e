"""A VAE from its own file (AUTOMATIC1111's ``--vae`` files, diffusers' ``vae/`` weights,
noisecraft's native ``vae`` and ``latent_diffusion`` files), replacing a model's VAE."""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import Tensor

from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError
from noisecraft.io.build import build_module
from noisecraft.io.checkpoint import METADATA_KEY
from noisecraft.io.formats.detect import key_examples
from noisecraft.io.formats.infer_config import infer_vae_config
from noisecraft.io.formats.keys.vae import (
    DIFFUSERS_MARKERS,
    VAE_FILE,
    from_diffusers_state_dict,
    is_vae_state_dict,
    strip_vae_prefix,
)
from noisecraft.io.formats.ldm_layout import VAE_PREFIX
from noisecraft.io.native import LATENT_KIND
from noisecraft.io.safe_read import read_checkpoint
from noisecraft.key_rules import to_ours
from noisecraft.models.vae import AutoencoderKL, VAEConfig

__all__ = ["load_vae_file"]


def load_vae_file(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
) -> AutoencoderKL:
    """A VAE from its own file, ``.safetensors`` or ``.ckpt``.

    Accepts LDM names (bare, as AUTOMATIC1111's VAE files, or under ``first_stage_model.`` /
    ``vae.``; a whole SD single file gives its VAE), diffusers ``AutoencoderKL`` names (also
    the old ``query`` / ``key`` / ``value`` / ``proj_attn``), and noisecraft's native ``vae``
    and ``latent_diffusion`` files (whose config is used as stored). LDM ``loss.*`` and
    ``model_ema.*`` entries are ignored (:data:`.keys.vae.VAE_FILE`). The config of foreign
    files is inferred from the shapes with SD's conventions; ``scaling_factor`` /
    ``shift_factor`` set the latent scale (pass the model's own when the VAE replaces another;
    default SD's 0.18215, no shift).
    """
    tensors, metadata = read_checkpoint(path)
    native = None
    if METADATA_KEY in metadata:
        try:
            native = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            native = None
    config: VAEConfig | None = None
    if isinstance(native, dict) and native.get("kind") in ("vae", LATENT_KIND):
        try:
            if native["kind"] == "vae":
                config = VAEConfig.from_dict(native["config"])
            else:
                config = VAEConfig.from_dict(native["config"]["vae"])
                tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}
        except (KeyError, TypeError, NoisecraftError) as e:
            raise CheckpointError(f"{path}: corrupt noisecraft metadata ({e})") from None
    elif any(k.startswith(VAE_PREFIX) for k in tensors):
        tensors = {k[len(VAE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    named: dict[str, Tensor] = {strip_vae_prefix(k): v for k, v in tensors.items()}
    if len(named) < len(tensors):
        raise CheckpointError(
            f"{path} holds VAE weights twice, with and without a prefix (first_stage_model. / "
            "vae.); keep one copy"
        )
    sd = to_ours(VAE_FILE, named).tensors
    if not is_vae_state_dict(sd):
        raise CheckpointError(
            f"{path} is not a VAE: found keys like {key_examples(sd)}; expected encoder.*, "
            "decoder.*, quant_conv.*, post_quant_conv.*"
        )
    if any(k.startswith(DIFFUSERS_MARKERS) for k in sd):
        try:
            sd = from_diffusers_state_dict(sd)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if config is None:
        config = infer_vae_config(sd, str(path))
    if scaling_factor is not None:
        config = dataclasses.replace(config, scaling_factor=scaling_factor)
    if shift_factor is not None:
        config = dataclasses.replace(config, shift_factor=shift_factor)
    final = config
    try:
        return build_module(
            lambda: AutoencoderKL(final), sd, what="VAE", source=path, dtype=dtype, device=device
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot build the VAE ({e})") from None
