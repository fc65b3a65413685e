"""Pipelines: one generate() core that every user surface calls, for pixel and latent models."""

from __future__ import annotations

from noisecraft.pipelines.backends import DiffusionModel
from noisecraft.pipelines.generate import count_steps, generate
from noisecraft.pipelines.request import GenerateRequest

__all__ = ["DiffusionModel", "GenerateRequest", "count_steps", "generate"]
