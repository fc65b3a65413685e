"""Pipelines: one generate() core that every user surface calls."""

from noisecraft.pipelines.generate import GenerateRequest, generate
from noisecraft.pipelines.pixel import PixelDiffusion

__all__ = ["GenerateRequest", "PixelDiffusion", "generate"]
