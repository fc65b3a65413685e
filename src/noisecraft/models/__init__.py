"""Networks built from frozen dataclass configs, and the model containers that hold them."""

from noisecraft.models.controlnet import ControlNet, ControlNetConfig
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.pixel_diffusion import PixelDiffusion
from noisecraft.models.unet import UNet, UNetConfig

__all__ = [
    "ControlNet",
    "ControlNetConfig",
    "LatentDiffusion",
    "PixelDiffusion",
    "UNet",
    "UNetConfig",
]
