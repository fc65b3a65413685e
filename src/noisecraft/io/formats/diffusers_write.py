"""Write a :class:`~noisecraft.models.latent_diffusion.LatentDiffusion` as a diffusers
``StableDiffusionPipeline`` folder (layout: :mod:`.diffusers_folder`) that
``diffusers.StableDiffusionPipeline.from_pretrained`` loads and that gives the same images.

Each part: its config (:mod:`.diffusers_configs`) and its weights under the names of its key
table (:mod:`.keys`), float32 ``.safetensors``; then the tokenizer files, the scheduler config
and ``model_index.json``, in a temporary folder renamed onto the target.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from noisecraft.errors import ConfigError, OutputExistsError
from noisecraft.io.atomic import atomic_folder
from noisecraft.io.formats.diffusers_configs.scheduler import (
    DEFAULT_SCHEDULER,
    schedule_to_diffusers,
)
from noisecraft.io.formats.diffusers_configs.text_encoder import (
    text_encoder_config_to_transformers,
)
from noisecraft.io.formats.diffusers_configs.unet import unet_config_to_diffusers
from noisecraft.io.formats.diffusers_configs.vae import vae_config_to_diffusers
from noisecraft.io.formats.diffusers_files import DIFFUSERS_VERSION, write_json
from noisecraft.io.formats.diffusers_tokenizer import write_tokenizer
from noisecraft.io.formats.keys import clip as clip_keys
from noisecraft.io.formats.keys import unet as unet_keys
from noisecraft.io.formats.keys import vae as vae_keys
from noisecraft.io.write_errors import writing
from noisecraft.key_rules import Table, to_theirs
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import TextEncoderConfig
from noisecraft.models.tokenizer import CLIPTokenizer

__all__ = ["save_diffusers_folder"]


def save_diffusers_folder(
    model: LatentDiffusion, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write ``model`` as a diffusers ``StableDiffusionPipeline`` folder at ``path``.

    Weights are float32 ``.safetensors`` under diffusers / transformers names; configs,
    tokenizer files (``vocab.json``, ``merges.txt``, ``special_tokens_map.json``,
    ``tokenizer_config.json``), ``scheduler/scheduler_config.json`` (see the module docstring
    for the scheduler class) and ``model_index.json`` (``StableDiffusionInpaintPipeline`` for
    a 9-channel U-Net). diffusers conditions on the text encoder's last layer, so a model with
    ``clip_skip`` k > 1 is written with its first ``layers - k + 1`` layers (as SD 2.x
    folders keep 23 of OpenCLIP's 24): the folder gives the same images.

    Written into a temporary folder beside ``path``, then renamed onto it; an existing
    ``path`` is refused unless ``overwrite`` (then it is replaced only once the new folder is
    complete).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file; choose a folder path for the diffusers model")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} exists; pass @overwrite to replace it or choose another folder",
            settings=["overwrite"],
        )
    if not isinstance(model.tokenizer, CLIPTokenizer):
        raise ConfigError(
            "save_diffusers_folder needs a noisecraft CLIPTokenizer to write tokenizer/, got "
            f"{type(model.tokenizer).__name__}"
        )
    parts = _diffusers_parts(model)  # every config error before anything is written
    with writing(path), atomic_folder(path) as tmp:
        for name, (config, tensors, weights_name) in parts.items():
            (tmp / name).mkdir()
            write_json(tmp / name / "config.json", config)
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                str(tmp / name / weights_name),
                metadata={"format": "pt"},
            )
        write_tokenizer(model.tokenizer, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", _scheduler_config(model))
        inpaint = model.unet.config.in_channels == 2 * model.latent_channels + 1
        write_json(
            tmp / "model_index.json",
            {
                "_class_name": (
                    "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
                ),
                "_diffusers_version": DIFFUSERS_VERSION,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", _scheduler_config(model)["_class_name"]],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
        )
    return path


def _diffusers_parts(model: LatentDiffusion) -> dict[str, tuple[dict, dict[str, Tensor], str]]:
    """(config, tensors, weights file name) of unet/, vae/ and text_encoder/."""
    f = model.vae.config.downsample_factor
    unet_config = unet_config_to_diffusers(
        model.unet.config, sample_size=max(model.image_size // f, 1)
    )
    unet_config["_diffusers_version"] = DIFFUSERS_VERSION
    unet_tensors = _named(
        unet_keys.diffusers_table(model.unet.config), model.unet.state_dict(), "U-Net"
    )
    vae_config = vae_config_to_diffusers(model.vae.config, sample_size=model.image_size)
    vae_table = vae_keys.diffusers_table(len(model.vae.config.channel_mult))
    vae_tensors = _named(vae_table, model.vae.state_dict(), "VAE")

    te = model.text_encoder.config
    clip_skip = model.clip_skip if model.clip_skip is not None else te.clip_skip
    keep = te.layers - clip_skip + 1
    te_state = {
        k: v
        for k, v in model.text_encoder.state_dict().items()
        if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < keep
    }
    te_config = text_encoder_config_to_transformers(
        TextEncoderConfig.from_dict({**te.to_dict(), "layers": keep, "clip_skip": 1}),
        model.tokenizer,
    )
    te_tensors = _named(clip_keys.DIFFUSERS, te_state, "text encoder")
    return {
        "unet": (unet_config, unet_tensors, "diffusion_pytorch_model.safetensors"),
        "vae": (vae_config, vae_tensors, "diffusion_pytorch_model.safetensors"),
        "text_encoder": (te_config, te_tensors, "model.safetensors"),
    }


def _named(table: Table, state: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """``state`` under diffusers' names; a tensor the table does not name is refused."""
    mapped = to_theirs(table, state)
    if mapped.unmapped:
        raise ConfigError(f"the {what} tensor {mapped.unmapped[0]} has no diffusers name")
    return mapped.tensors


def _scheduler_config(model: LatentDiffusion) -> dict[str, Any]:
    """The scheduler the model came with (``info.diffusion["scheduler"]``), else Euler; the
    schedule keys always describe the model's own schedule and prediction."""
    saved = (model.info.diffusion.get("scheduler") if model.info else None) or {}
    if saved.get("class_name"):
        kept = saved.get("config") or {}
        config = {k: v for k, v in kept.items() if not k.startswith("_")}
        config["_class_name"] = saved["class_name"]
    else:
        config = dict(DEFAULT_SCHEDULER)
    config["_diffusers_version"] = DIFFUSERS_VERSION
    config.update(schedule_to_diffusers(model.schedule, model.prediction))
    return config
