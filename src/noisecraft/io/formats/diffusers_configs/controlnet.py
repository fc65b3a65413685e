"""A diffusers ``ControlNetModel`` ``config.json`` <-> our :class:`ControlNetConfig`.

A ``ControlNetModel`` config is its U-Net encoder's (``UNet2DConditionModel``'s keys, read by
:func:`.unet.unet_config_from_diffusers`) plus the hint encoder
(``conditioning_channels``, ``conditioning_embedding_out_channels``) and two options our
ControlNet does not implement, refused in one line: ``global_pool_conditions`` (the shuffle
ControlNet) and ``controlnet_conditioning_channel_order: bgr``. SDXL ControlNets
(``addition_embed_type: text_time``) are refused as the U-Net's reader refuses SDXL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from noisecraft.errors import CheckpointError, NoisecraftError
from noisecraft.io.formats.diffusers_configs.unet import (
    DOWN_ATTN,
    UP_ATTN,
    UP_PLAIN,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from noisecraft.models.controlnet import HINT_CHANNELS, ControlNetConfig

__all__ = ["CLASS_NAME", "controlnet_config_from_diffusers", "controlnet_config_to_diffusers"]

CLASS_NAME = "ControlNetModel"

#: Keys of a ControlNetModel config that are not the U-Net's.
_OWN = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "controlnet_conditioning_channel_order",
    "global_pool_conditions",
    "addition_embed_type_num_heads",
)
#: The U-Net keys ``ControlNetModel.__init__`` takes (diffusers 0.42).
_UNET_KEYS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
)


def controlnet_config_from_diffusers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "config.json"
) -> ControlNetConfig:
    """Our :class:`ControlNetConfig` of a diffusers ``ControlNetModel`` config dict (keys it
    omits take diffusers' defaults). Raises a one-line :class:`CheckpointError` naming
    ``source`` for what our ControlNet cannot express."""
    name = d.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise CheckpointError(
            f"{source}: a {name}, not a ControlNetModel; give the folder of an SD 1.x / 2.x "
            "ControlNet"
        )
    if d.get("addition_embed_type") == "text_time":
        raise CheckpointError(
            f"{source} is an SDXL ControlNet; SDXL is not supported (use a ControlNet made "
            "for SD 1.x or 2.x)"
        )
    if d.get("global_pool_conditions", False):
        raise CheckpointError(
            f"{source}: global_pool_conditions (the shuffle ControlNet) is not supported"
        )
    order = d.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise CheckpointError(
            f"{source}: controlnet_conditioning_channel_order={order!r} is not supported "
            "(noisecraft's ControlNet reads RGB)"
        )
    unet_dict = {k: v for k, v in d.items() if k not in _OWN}
    down = list(d.get("down_block_types", [DOWN_ATTN] * 3 + ["DownBlock2D"]))
    unet_dict["up_block_types"] = [UP_ATTN if t == DOWN_ATTN else UP_PLAIN for t in reversed(down)]
    unet_dict["out_channels"] = d.get("in_channels", 4)
    unet = unet_config_from_diffusers(unet_dict, source=source)
    try:
        return ControlNetConfig(
            unet=unet,
            hint_channels=tuple(d.get("conditioning_embedding_out_channels") or HINT_CHANNELS),
            hint_in_channels=d.get("conditioning_channels", 3),
        )
    except NoisecraftError as e:
        raise CheckpointError(f"{source}: {e}") from None


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict[str, Any]:
    """The diffusers ``ControlNetModel`` config of our :class:`ControlNetConfig` (inverse of
    :func:`controlnet_config_from_diffusers`)."""
    unet = unet_config_to_diffusers(config.unet)
    return {
        "_class_name": CLASS_NAME,
        **{k: unet[k] for k in _UNET_KEYS if k in unet},
        "conditioning_channels": config.hint_in_channels,
        "conditioning_embedding_out_channels": list(config.hint_channels),
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }
