"""U-Net weights and configs, ours <-> diffusers ``UNet2DConditionModel``: the import path of
earlier versions, kept. The key rules are :mod:`.keys.unet`, the configs
:mod:`.diffusers_configs.unet`."""

from noisecraft.io.formats.diffusers_configs.unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from noisecraft.io.formats.keys.unet import (
    RESNET_LEAVES,
    block_pairs,
    unet_from_diffusers,
    unet_to_diffusers,
)

__all__ = [
    "RESNET_LEAVES",
    "block_pairs",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_from_diffusers",
    "unet_to_diffusers",
]
