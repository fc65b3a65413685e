"""Write a :class:`~noisecraft.models.latent_diffusion.LatentDiffusion` as one CompVis /
AUTOMATIC1111-layout single file (what ``from_single_file`` of diffusers and the web UI read).

The parts are written by the layout's key tables (:func:`.ldm_layout.join_ldm_parts`), the
file's other tensors back from :class:`.single_file_meta.SingleFileInfo`, and our exact
configs into the metadata (:func:`.single_file_meta.single_file_metadata`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from noisecraft.errors import ConfigError
from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.formats.ldm_layout import TEXT_LAYOUTS, join_ldm_parts
from noisecraft.io.formats.single_file_meta import DTYPES, SingleFileInfo, single_file_metadata
from noisecraft.io.write_errors import writing
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import TextEncoderConfig

__all__ = ["ldm_state_dict", "openclip_layout_fits", "save_single_file"]


def openclip_layout_fits(config: TextEncoderConfig) -> bool:
    """Whether reading this text encoder back from the OpenCLIP layout gives ``config``:
    GELU, and the layer :func:`.infer_config.infer_text_config` would pick (penultimate, or
    the last of diffusers' 23-layer ViT-H) is the one ``config`` uses."""
    if config.activation != "gelu":
        return False
    truncated_vit_h = config.width == 1024 and config.layers == 23
    return config.clip_skip == (1 if truncated_vit_h or config.layers == 1 else 2)


def ldm_state_dict(
    model: LatentDiffusion, *, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The model's tensors under CompVis / A1111 single-file names (inverse of the split).

    The text encoder goes back to the OpenCLIP layout (``cond_stage_model.model.*``) when the
    model was read from one, or when it is an SD 2.x-style encoder that the OpenCLIP reader
    would rebuild unchanged (:func:`openclip_layout_fits`); otherwise to
    ``cond_stage_model.transformer.text_model.*``. A model read by
    :func:`.single_file_read.load_single_file` gets the file's other tensors back
    (:class:`.single_file_meta.SingleFileInfo` ``extras``). ``dtype`` casts floating tensors
    of the model (None: each part's stored dtype for a model read from a single file, else as
    held); extras keep theirs.
    """
    info = model.info if isinstance(model.info, SingleFileInfo) else None
    te_config = model.text_encoder.config
    if info is not None and info.text_layout in TEXT_LAYOUTS:
        layout = info.text_layout
        if layout == "open_clip" and not openclip_layout_fits(te_config):
            layout = "clip"
    else:
        layout = "open_clip" if openclip_layout_fits(te_config) else "clip"

    def cast(sd: Mapping[str, Tensor], part: str) -> dict[str, Tensor]:
        target = dtype
        if target is None and info is not None and part in info.dtypes:
            target = DTYPES.get(info.dtypes[part])
        return {
            k: (v.to(target) if target is not None and v.is_floating_point() else v).detach().cpu()
            for k, v in sd.items()
        }

    out = join_ldm_parts(
        cast(model.unet.state_dict(), "unet"),
        cast(model.vae.state_dict(), "vae"),
        cast(model.text_encoder.state_dict(), "text_encoder"),
        layout,
    )
    if info is not None:
        same_text = info.text_layout == layout
        for key, value in info.extras.items():
            if key in out or (key.startswith("cond_stage_model.") and not same_text):
                continue
            out[key] = value.detach().cpu()
    return {k: v.contiguous() for k, v in out.items()}


def save_single_file(
    model: LatentDiffusion,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as one CompVis / A1111-layout ``.safetensors`` file, atomically.

    Tensors: :func:`ldm_state_dict`; metadata: :func:`.single_file_meta.single_file_metadata`.
    A model read with :func:`.single_file_read.load_single_file` and written back gives the
    same keys and bit-identical tensors (a file with EMA weights comes back as the weights
    that were used, as AUTOMATIC1111's "pruned ema-only" files). An existing file is replaced
    only with ``overwrite=True``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(
            f"{path}: single files are written as .safetensors (pickled .ckpt files can run "
            "code when loaded); use a .safetensors name"
        )
    check_writable(path, overwrite=overwrite)
    tensors = ldm_state_dict(model, dtype=dtype)
    with writing(path), atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=single_file_metadata(model))
    return path
