"""Original Stable Diffusion 1.x / 2.x single files (CompVis / AUTOMATIC1111 layout): the
public names of the format, in one place.

One ``.safetensors`` or ``.ckpt`` holds the whole ``ldm.models.diffusion.ddpm.LatentDiffusion``
state dict (CompVis ``stablediffusion`` repository, ``configs/stable-diffusion/v*-inference
.yaml``):

* ``model.diffusion_model.*``: the U-Net, in our names;
* ``first_stage_model.*``: the KL autoencoder, in our names;
* ``cond_stage_model.transformer.[text_model.]*``: SD 1.x's CLIP ViT-L/14 text tower in
  transformers' names, or ``cond_stage_model.model.*``: SD 2.x's OpenCLIP ViT-H/14 text
  tower (q, k, v stacked in ``in_proj``);
* ``model_ema.*``: LDM's ``LitEma`` copy of the U-Net in training checkpoints; sampling uses
  it when present, as CompVis' scripts do (``ema=False`` takes the raw weights);
* anything else (the schedule buffers ``betas``, ``alphas_cumprod``, ...): kept verbatim and
  written back, so a file -> model -> file round trip is bit-exact.

Where the code is:

* :mod:`.ldm_layout`: the prefixes and each part's key table (:mod:`.keys`), the split of a
  file into parts and the join back, EMA names;
* :mod:`.detect`: other kinds of files refused in one line (SDXL, SD3, Flux, LoRA,
  ControlNet, embeddings, a VAE or text encoder alone), the family and every config
  (sizes from shapes, :mod:`.infer_config`, with SD's conventions for what shapes cannot
  tell);
* :mod:`.prediction`: ``eps`` or ``v`` from the file's hints, or a one-call U-Net probe;
* :mod:`.single_file_read` (:func:`load_single_file`), :mod:`.vae_file`
  (:func:`load_vae_file`), :mod:`.single_file_write` (:func:`save_single_file`);
* :mod:`.single_file_meta`: what noisecraft adds to a file (exact configs in the metadata
  key ``noisecraft_single_file``) and what a model read from one remembers
  (:class:`SingleFileInfo`).
"""

from collections.abc import Mapping

from torch import Tensor

from noisecraft.io.formats.detect import Detected, detect_architecture
from noisecraft.io.formats.infer_config import (
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
)
from noisecraft.io.formats.keys.openclip import to_openclip
from noisecraft.io.formats.ldm_layout import LDMParts, ema_key, split_ldm_state_dict
from noisecraft.io.formats.prediction import probe_prediction
from noisecraft.io.formats.single_file_meta import SingleFileInfo, single_file_metadata
from noisecraft.io.formats.single_file_read import load_single_file
from noisecraft.io.formats.single_file_write import (
    ldm_state_dict,
    openclip_layout_fits,
    save_single_file,
)
from noisecraft.io.formats.vae_file import load_vae_file


def _native_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our text encoder's tensors under OpenCLIP names (the name earlier versions had)."""
    return to_openclip(sd)


__all__ = [
    "Detected",
    "LDMParts",
    "SingleFileInfo",
    "detect_architecture",
    "ema_key",
    "infer_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "ldm_state_dict",
    "load_single_file",
    "load_vae_file",
    "openclip_layout_fits",
    "probe_prediction",
    "save_single_file",
    "single_file_metadata",
    "split_ldm_state_dict",
]
