"""diffusers Stable Diffusion 1.x / 2.x pipeline folders <-> :class:`LatentDiffusion`.

A diffusers folder (the layout ``StableDiffusionPipeline.save_pretrained`` writes)::

    model_index.json                  pipeline class and its components
    unet/config.json                  UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors      (or .bin, .fp16.safetensors, sharded)
    vae/config.json, vae/diffusion_pytorch_model.safetensors       AutoencoderKL
    text_encoder/config.json, text_encoder/model.safetensors      transformers CLIPTextModel
    tokenizer/vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    scheduler/scheduler_config.json   the noise schedule and the default sampler

:func:`load_diffusers_folder` (:mod:`.diffusers_read`) reads one into a
:class:`LatentDiffusion`; weights are renamed by each part's key table (:mod:`.keys`: the
U-Net's built from its config, the VAE's with the old attention names too, the text
encoder's transformers names with or without ``text_model.``, which transformers 5 no longer
writes); ``.bin`` files are read with ``torch.load(weights_only=True)`` only
(:mod:`.diffusers_files`). :func:`save_diffusers_folder` (:mod:`.diffusers_write`) writes a
folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads and that gives the
same images. Configs: :mod:`.diffusers_configs`; tokenizer files: :mod:`.diffusers_tokenizer`.
This module gathers the format's public names.

The reference for every file is what diffusers 0.42 / transformers 5 write and read
(``ConfigMixin`` configs, ``ModelMixin`` weight names, ``DiffusionPipeline`` model index);
the schedule follows diffusers' schedulers (``beta_schedule`` linear / scaled_linear /
squaredcos_cap_v2 / sigmoid, ``trained_betas``, ``rescale_betas_zero_snr``).

The scheduler's class and its sampling options are kept in
``model.info.diffusion["scheduler"]``: ``{"class_name", "timestep_spacing", "steps_offset",
"use_karras_sigmas"`` (None where the file leaves them to the class default), ``"config"``
(the whole ``scheduler_config.json`` as read)``}``, so a caller can pick diffusers' default
sampler (e.g. ``GenerateRequest(scheduler_config=...)``); they do not change how noisecraft
samples. Saving writes that scheduler back (with the model's own
schedule), or else an ``EulerDiscreteScheduler`` with ``timestep_spacing: linspace``: the
diffusers scheduler that noisecraft's ``euler`` sampler reproduces step for step (so the
folder's default sampler has a noisecraft twin), and one that reads every schedule option
written here (trained betas, zero terminal SNR, v / x0 prediction).
"""

from noisecraft.io.formats.diffusers_configs.scheduler import (
    DEFAULT_SCHEDULER,
    schedule_from_diffusers,
    schedule_to_diffusers,
)
from noisecraft.io.formats.diffusers_configs.text_encoder import (
    text_encoder_config_from_transformers,
    text_encoder_config_to_transformers,
)
from noisecraft.io.formats.diffusers_configs.vae import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from noisecraft.io.formats.diffusers_files import DIFFUSERS_VERSION
from noisecraft.io.formats.diffusers_read import SUPPORTED_PIPELINES, load_diffusers_folder
from noisecraft.io.formats.diffusers_write import save_diffusers_folder

__all__ = [
    "DEFAULT_SCHEDULER",
    "DIFFUSERS_VERSION",
    "SUPPORTED_PIPELINES",
    "load_diffusers_folder",
    "save_diffusers_folder",
    "schedule_from_diffusers",
    "schedule_to_diffusers",
    "text_encoder_config_from_transformers",
    "text_encoder_config_to_transformers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
]
