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
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> PixelDiffusion | LatentDiffusion:
    """Load a native checkpoint of either kind ("unet" or "latent_diffusion")."""
    from noisecraft.errors import CheckpointError
    from noisecraft.io.checkpoint import read_info
    from noisecraft.pipelines import latent, pixel

    kind = read_info(path).kind
    if kind == pixel.KIND:
        return PixelDiffusion.load(path, device=device)
    if kind == latent.KIND:
        return LatentDiffusion.load(path, device=device)
    raise CheckpointError(
        f"{path} holds a '{kind}' model; generate needs a '{pixel.KIND}' or "
        f"'{latent.KIND}' checkpoint"
    )


__all__ = [
    "DiffusionModel",
    "GenerateRequest",
    "LatentDiffusion",
    "PixelDiffusion",
    "count_steps",
    "generate",
    "load_model",
]
