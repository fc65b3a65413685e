"""What noisecraft adds to a single file, and what a model read from one remembers.

Files written by :func:`~noisecraft.io.formats.single_file_write.save_single_file` carry the
exact configs, schedule, prediction and tokenizer in the safetensors metadata key
``noisecraft_single_file`` (:func:`single_file_metadata`), so a model that does not follow
SD's conventions (a mini SD trained here) comes back unchanged; other tools ignore that key.
A model read from a single file keeps, in its :class:`SingleFileInfo`, the file's other
tensors, its text encoder layout and each part's stored dtype, so that writing it back gives
the same file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from noisecraft.errors import CheckpointError, NoisecraftError
from noisecraft.io.checkpoint import CheckpointInfo
from noisecraft.io.tokenizer_spec import tokenizer_spec
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import TextEncoderConfig
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vae import VAEConfig

__all__ = [
    "DTYPES",
    "META_FORMAT",
    "META_KEY",
    "SingleFileInfo",
    "configs_from_meta",
    "parse_meta",
    "single_file_metadata",
    "stored_dtype",
]

META_KEY = "noisecraft_single_file"
META_FORMAT = 1


@dataclass(frozen=True)
class SingleFileInfo(CheckpointInfo):
    """:class:`CheckpointInfo` of a model read from a single file, with what saving needs.

    ``extras``: the file's tensors that are no part of the model (written back verbatim);
    ``text_layout``: how the text encoder was stored; ``dtypes``: each part's stored float
    dtype (``save_single_file(dtype=None)`` writes them back in it); ``description``: what
    was loaded and why (family, prediction and its source, EMA).
    """

    source: str = ""
    description: str = ""
    text_layout: str = "clip"
    dtypes: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)


DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def stored_dtype(tensors: Mapping[str, Tensor]) -> str:
    counts = Counter(
        str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()
    )
    return counts.most_common(1)[0][0] if counts else "float32"


def parse_meta(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    raw = metadata.get(META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: corrupt {META_KEY} metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise CheckpointError(
            f"{source}: {META_KEY} metadata of an unknown format; upgrade noisecraft"
        )
    return meta


def configs_from_meta(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    try:
        return {
            "unet": UNetConfig.from_dict(meta["unet"]),
            "vae": VAEConfig.from_dict(meta["vae"]) if meta.get("vae") else None,
            "text_encoder": TextEncoderConfig.from_dict(meta["text_encoder"]),
        }
    except (KeyError, TypeError, NoisecraftError) as e:
        raise CheckpointError(f"{source}: corrupt {META_KEY} metadata ({e})") from None


def single_file_metadata(model: LatentDiffusion) -> dict[str, str]:
    """The ``noisecraft_single_file`` metadata: exact configs, schedule, prediction, tokenizer."""
    meta = {
        "format": META_FORMAT,
        "unet": model.unet.config.to_dict(),
        "vae": model.vae.config.to_dict(),
        "text_encoder": model.text_encoder.config.to_dict(),
        "tokenizer": tokenizer_spec(model.tokenizer),
        "diffusion": {
            "schedule": model.schedule.to_config(),
            "prediction": model.prediction,
            "image_size": model.image_size,
            "clip_skip": model.clip_skip,
            "sample_posterior": model.sample_posterior,
            "prompt_weighting": model.prompt_weighting,
        },
    }
    return {META_KEY: json.dumps(meta, sort_keys=True)}
