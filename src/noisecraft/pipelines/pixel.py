"""A pixel-space diffusion model as saved by the trainer: U-Net + schedule + parametrisation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from noisecraft.diffusion import DiscreteDenoiser, NoiseSchedule
from noisecraft.io.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from noisecraft.models.unet import UNet, UNetConfig

KIND = "unet"


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
    info: CheckpointInfo | None = None

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

    def save(
        self, path: str | os.PathLike, *, training: dict | None = None, overwrite: bool = False
    ) -> None:
        info = CheckpointInfo(
            kind=KIND,
            config=self.unet.config.to_dict(),
            diffusion={
                "schedule": self.schedule.to_config(),
                "prediction": self.prediction,
                "learned_variance": self.learned_variance,
                "image_size": self.image_size,
            },
            training=training or (self.info.training if self.info else {}),
        )
        save_checkpoint(path, self.unet.state_dict(), info, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> PixelDiffusion:
        """Rebuild the model from a native checkpoint (its EMA weights)."""
        tensors, info = load_checkpoint(path, expect_kind=KIND)
        unet = UNet(UNetConfig.from_dict(info.config))
        unet.load_state_dict(tensors)
        unet.to(device).eval().requires_grad_(False)
        diff = info.diffusion
        return cls(
            unet=unet,
            schedule=NoiseSchedule.from_config(diff["schedule"]),
            prediction=diff.get("prediction", "eps"),
            learned_variance=bool(diff.get("learned_variance", False)),
            image_size=int(diff.get("image_size", 28)),
            info=info,
        )

    def replace(self, **changes) -> PixelDiffusion:
        return dataclasses.replace(self, **changes)
