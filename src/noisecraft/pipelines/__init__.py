"""Pipelines: one generate() core that every user surface calls, for pixel and latent models."""

from __future__ import annotations

import os

import torch

from noisecraft.pipelines.generate import (
    DiffusionModel,
    GenerateRequest,
    count_steps,
    generate,
)
from noisecraft.pipelines.latent import LatentDiffusion
from noisecraft.pipelines.pixel import PixelDiffusion


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    vae: str | os.PathLike | None = None,
    prediction: str | None = None,
    arch: str | None = None,
) -> PixelDiffusion | LatentDiffusion:
    """Load a model of any format: native ("unet" or "latent_diffusion"), an SD single file
    (``.safetensors`` / ``.ckpt``) or a diffusers folder (:mod:`noisecraft.io.formats.auto`)."""
    from noisecraft.io.formats.auto import load_any

    return load_any(path, device=device, vae=vae, prediction=prediction, arch=arch)


__all__ = [
    "DiffusionModel",
    "GenerateRequest",
    "LatentDiffusion",
    "PixelDiffusion",
    "count_steps",
    "generate",
    "load_model",
]
