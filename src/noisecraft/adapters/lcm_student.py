"""A distilled latent consistency student U-Net, applied to the model it was distilled from.

The ``lcm_distill`` training task (:mod:`noisecraft.training.tasks.lcm_distill`) writes the
student's U-Net alone, in float16, with metadata ``kind = "lcm_unet"``; its config is the
teacher's. :func:`apply_lcm_student` returns the teacher with that U-Net -- a new
:class:`~noisecraft.models.latent_diffusion.LatentDiffusion` sharing the VAE, text encoder and
tokenizer; the teacher itself is not changed. Sample it with ``sampler="lcm"`` and CFG 1.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from noisecraft.errors import CheckpointError
from noisecraft.io.safe_read import read_safetensors
from noisecraft.models.latent_diffusion import LatentDiffusion

LCM_UNET_KIND = "lcm_unet"


def apply_lcm_student(model: LatentDiffusion, path: str | os.PathLike) -> LatentDiffusion:
    """``model`` with the U-Net weights of the LCM student file ``path`` (cast to the
    U-Net's dtype)."""
    tensors, meta = read_safetensors(path)
    if meta.get("kind") != LCM_UNET_KIND:
        raise CheckpointError(
            f"{path} is not an LCM student U-Net (metadata kind {meta.get('kind')!r}); give the "
            "unet_fp16.safetensors that the lcm_distill task wrote"
        )
    unet = copy.deepcopy(model.unet)
    own = unet.state_dict()
    missing, extra = own.keys() - tensors.keys(), tensors.keys() - own.keys()
    wrong = [k for k in own.keys() & tensors.keys() if own[k].shape != tensors[k].shape]
    if missing or extra or wrong:
        raise CheckpointError(
            f"{path} does not fit this model's U-Net ({len(missing)} missing, {len(extra)} "
            f"unexpected, {len(wrong)} mis-shaped tensors); use it with the model it was "
            f"distilled from ({meta.get('teacher', 'unknown')})"
        )
    dtype = next(unet.parameters()).dtype
    unet.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
    return dataclasses.replace(model, unet=unet)


__all__ = ["LCM_UNET_KIND", "apply_lcm_student"]
