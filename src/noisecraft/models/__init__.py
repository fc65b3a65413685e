"""Networks built from frozen dataclass configs."""

from noisecraft.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
