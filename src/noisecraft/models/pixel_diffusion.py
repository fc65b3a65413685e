"""A pixel-space diffusion model as saved by the trainer: U-Net + schedule + parametrisation.

Saved as one native ``.safetensors`` file of kind ``unet`` (:mod:`noisecraft.io.native`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from noisecraft.diffusion import DiscreteDenoiser, NoiseSchedule
from noisecraft.models.unet import UNet


@dataclass(eq=False)
class PixelDiffusion:
    """What sampling needs: the network, its noise schedule and what it predicts."""

    unet: UNet
    schedule: NoiseSchedule
    prediction: str = "eps"
    learned_variance: bool = False
    image_size: int = 28  # the (square) size it was trained at
    # predicted x0 is clipped to the data range while sampling (DDPM's clip_denoised);
    # None turns it off
    x0_range: tuple[float, float] | None = (-1.0, 1.0)
    info: Any = None  # the file's noisecraft.io.checkpoint.CheckpointInfo, if loaded

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it makes."""
        return (self.unet.config.in_channels, self.image_size, self.image_size)

    def denoiser(self) -> DiscreteDenoiser:
        return DiscreteDenoiser(
            self.unet, self.schedule, self.prediction, learned_variance=self.learned_variance
        )

    def replace(self, **changes) -> PixelDiffusion:
        return dataclasses.replace(self, **changes)
