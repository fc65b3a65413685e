"""What the trainer can train: one :class:`Task` per ``[task] name`` of a recipe.

* ``pixel`` -- :class:`PixelTask`: pixel-space (class-conditional) diffusion.
* ``vae`` -- :class:`VAETask`: the KL autoencoder of latent diffusion (first stage).
* ``text_latent`` -- :class:`TextLatentTask`: a text-conditioned U-Net trained with a small
  CLIP text encoder on the cached latents of a trained VAE (second stage).
* ``tiny_decoder`` -- :class:`TinyDecoderTask`: a TAESD-like decoder distilled from a trained
  VAE's decoder (fast previews and decodes).
* ``lora`` -- :class:`LoRATask`: a style LoRA over a frozen text-to-image model.
* ``textual_inversion`` -- :class:`TextualInversionTask`: new token vectors (an embedding) for
  a trained, frozen text-to-image model.
* ``lcm_distill`` -- :class:`LCMDistillTask`: a latent consistency student of a trained
  text-to-image model (few-step sampling).
* ``controlnet`` -- :class:`ControlNetTask`: a ControlNet for a frozen text-to-image model
  (canny-edge hints by default).

See :mod:`noisecraft.training.tasks.base` for the protocol.
"""

from __future__ import annotations

import torch

from noisecraft.errors import unknown_name
from noisecraft.training.config import TASK_SECTIONS, ExperimentConfig
from noisecraft.training.data import ImageDataset
from noisecraft.training.tasks.base import Task, TaskLoss
from noisecraft.training.tasks.controlnet import ControlNetTask
from noisecraft.training.tasks.lcm_distill import LCMDistillTask
from noisecraft.training.tasks.lora import LoRATask
from noisecraft.training.tasks.pixel import PixelTask
from noisecraft.training.tasks.text_latent import TextLatentTask
from noisecraft.training.tasks.textual_inversion import TextualInversionTask
from noisecraft.training.tasks.tiny_decoder import TinyDecoderTask
from noisecraft.training.tasks.vae import VAETask

TASKS: dict[str, type] = {
    "pixel": PixelTask,
    "vae": VAETask,
    "text_latent": TextLatentTask,
    "tiny_decoder": TinyDecoderTask,
    "lora": LoRATask,
    "textual_inversion": TextualInversionTask,
    "lcm_distill": LCMDistillTask,
    "controlnet": ControlNetTask,
}
assert set(TASKS) == set(TASK_SECTIONS), "every task needs its config sections"


def build_task(cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device) -> Task:
    """The task named by ``cfg.task.name``, its model(s) built from ``cfg`` (on the CPU)."""
    name = cfg.task.name
    if name not in TASKS:
        raise unknown_name("task", name, TASKS)
    return TASKS[name](cfg, dataset, device)


__all__ = [
    "TASKS",
    "ControlNetTask",
    "LoRATask",
    "LCMDistillTask",
    "PixelTask",
    "Task",
    "TaskLoss",
    "TextLatentTask",
    "TextualInversionTask",
    "TinyDecoderTask",
    "VAETask",
    "build_task",
]
