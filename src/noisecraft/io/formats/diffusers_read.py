"""Read a diffusers Stable Diffusion 1.x / 2.x pipeline folder into a
:class:`~noisecraft.models.latent_diffusion.LatentDiffusion` (layout: :mod:`.diffusers_folder`).

Each part is its config (:mod:`.diffusers_configs`) and its weights under the names of its
key table (:mod:`.keys`): the U-Net's built from its config, the VAE's for its level count,
the text encoder's transformers names with or without ``text_model.``. Pipelines other than
SD 1.x / 2.x are refused by their ``model_index.json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError
from noisecraft.io.build import build_module
from noisecraft.io.checkpoint import CheckpointInfo
from noisecraft.io.formats.diffusers_configs.scheduler import (
    PREDICTIONS,
    SCHEDULER_OPTIONS,
    schedule_from_diffusers,
)
from noisecraft.io.formats.diffusers_configs.text_encoder import (
    text_encoder_config_from_transformers,
)
from noisecraft.io.formats.diffusers_configs.unet import unet_config_from_diffusers
from noisecraft.io.formats.diffusers_configs.vae import vae_config_from_diffusers
from noisecraft.io.formats.diffusers_files import PARTS_HINT, read_json, read_weights
from noisecraft.io.formats.diffusers_tokenizer import read_tokenizer
from noisecraft.io.formats.keys import clip as clip_keys
from noisecraft.io.formats.keys import unet as unet_keys
from noisecraft.io.formats.keys import vae as vae_keys
from noisecraft.io.native import LATENT_KIND
from noisecraft.key_rules import Table, to_ours
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder
from noisecraft.models.unet import UNet
from noisecraft.models.vae import AutoencoderKL

__all__ = ["SUPPORTED_PIPELINES", "load_diffusers_folder"]

M = TypeVar("M", bound=nn.Module)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

#: model_index ``_class_name`` values whose components are an SD 1.x / 2.x pipeline.
SUPPORTED_PIPELINES = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionInpaintPipelineLegacy",
    }
)
_KNOWN_UNSUPPORTED = {
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusionXLInpaintPipeline": "SDXL",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX",
}


def load_diffusers_folder(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    prediction: str | None = None,
    device: str | torch.device = "cpu",
    unet_dtype: torch.dtype = torch.float32,
) -> LatentDiffusion:
    """Read a diffusers SD 1.x / 2.x pipeline folder into a :class:`LatentDiffusion`.

    * ``variant``: read ``*.{variant}.safetensors`` weights (e.g. ``"fp16"``), as diffusers'
      ``from_pretrained(variant=...)``. Half-precision weights are widened to float32.
    * ``prediction``: "eps" / "v" / "x0" overrides the scheduler's ``prediction_type`` (some
      published folders carry a wrong one).
    * ``unet_dtype``: the U-Net's weights are cast straight to it (e.g. bfloat16 on the CPU),
      the text encoder and VAE stay float32.
    * ``image_size`` is the U-Net's ``sample_size`` times the VAE's downsampling factor, the
      default size of diffusers' pipeline.

    Every problem (a missing part or weights file, an unsupported pipeline or config) raises
    :class:`CheckpointError` with a one-line message naming the path.
    """
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise CheckpointError(f"diffusers folder {root} {what}; {PARTS_HINT}")
    _check_model_index(root)
    for part in PARTS:
        if not (root / part).is_dir():
            raise CheckpointError(f"{root / part} not found; {PARTS_HINT}")

    unet_cfg_path = root / "unet" / "config.json"
    unet_json = read_json(unet_cfg_path)
    unet_config = unet_config_from_diffusers(unet_json, source=unet_cfg_path)
    vae_cfg_path = root / "vae" / "config.json"
    vae_config = vae_config_from_diffusers(read_json(vae_cfg_path), source=vae_cfg_path)
    te_cfg_path = root / "text_encoder" / "config.json"
    te_config = text_encoder_config_from_transformers(read_json(te_cfg_path), source=te_cfg_path)
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched_json = read_json(sched_path)
    schedule, sched_prediction = schedule_from_diffusers(sched_json, source=sched_path)
    if prediction is None:
        prediction = sched_prediction
    elif prediction not in PREDICTIONS.values():
        raise ConfigError(f"prediction must be one of eps, v, x0, got {prediction!r}")
    tokenizer = read_tokenizer(root / "tokenizer", te_config.max_positions)

    unet = _read_part(
        root / "unet",
        variant,
        unet_keys.diffusers_table(unet_config),
        "U-Net",
        device,
        lambda: UNet(unet_config),
        unet_dtype,
    )
    vae = _read_part(
        root / "vae",
        variant,
        vae_keys.diffusers_table(len(vae_config.channel_mult)),
        "VAE",
        device,
        lambda: AutoencoderKL(vae_config),
    )
    text_encoder = _read_part(
        root / "text_encoder",
        variant,
        clip_keys.DIFFUSERS,
        "text encoder",
        device,
        lambda: CLIPTextEncoder(te_config),
    )

    sample_size = unet_json.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = sample_size[0]  # (height, width): our default size is square
    if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
        sample_size = 64
    image_size = sample_size * vae_config.downsample_factor
    scheduler_info = {
        "class_name": sched_json.get("_class_name"),
        **{k: sched_json.get(k) for k in SCHEDULER_OPTIONS},
        "config": dict(sched_json),  # as read, ``_class_name`` included
    }
    info = CheckpointInfo(
        kind=LATENT_KIND,
        config={
            "unet": unet_config.to_dict(),
            "vae": vae_config.to_dict(),
            "text_encoder": te_config.to_dict(),
        },
        diffusion={
            "schedule": schedule.to_config(),
            "prediction": prediction,
            "image_size": image_size,
            "vae_scaling_factor": vae_config.scaling_factor,
            "scheduler": scheduler_info,
            "source": {"format": "diffusers", "path": str(root)},
        },
    )
    try:
        return LatentDiffusion(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            schedule=schedule,
            prediction=prediction,
            image_size=image_size,
            info=info,
        )
    except NoisecraftError as e:
        raise CheckpointError(f"{root}: {e}") from None


def _read_part(
    folder: Path,
    variant: str | None,
    table: Table,
    what: str,
    device: str | torch.device,
    factory: Callable[[], M],
    dtype: torch.dtype = torch.float32,
) -> M:
    """One part's weights, renamed by its table and built; a weight the table does not name
    raises :class:`CheckpointError` naming the file."""
    files, state = read_weights(folder, variant)
    mapped = to_ours(table, state)
    if mapped.unmapped:
        raise CheckpointError(
            f"{files[0]}: unexpected {what} weight '{mapped.unmapped[0]}' for the config in "
            f"{folder.name}/config.json"
        )
    return build_module(
        factory, mapped.tensors, what=what, source=files[0], device=device, dtype=dtype
    )


def _check_model_index(root: Path) -> None:
    """Refuse pipelines other than SD 1.x / 2.x (``model_index.json`` may be absent)."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        return
    index = read_json(index_path)
    name = index.get("_class_name")
    if name in SUPPORTED_PIPELINES:
        return
    family = _KNOWN_UNSUPPORTED.get(str(name))
    what = f"{name} ({family})" if family else str(name)
    raise CheckpointError(
        f"{index_path}: pipeline {what} is not supported yet; noisecraft reads Stable "
        f"Diffusion 1.x / 2.x folders ({', '.join(sorted(SUPPORTED_PIPELINES))})"
    )
