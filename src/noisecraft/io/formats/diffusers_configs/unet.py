"""A diffusers ``unet/config.json`` (``UNet2DConditionModel``) <-> our :class:`UNetConfig`.

:func:`unet_config_from_diffusers` reads a ``unet/config.json`` (note that in SD 1.x
configs ``attention_head_dim`` is the NUMBER of heads, a historical misnomer diffusers keeps;
SD 2.x lists per-level head counts of 64-channel heads) and refuses, in one line naming the
file and the field, what our U-Net cannot express (SDXL's ``addition_embed_type: text_time``,
class embeddings, dual cross-attention, per-level transformer depths, ...).
:func:`unet_config_to_diffusers` is its inverse.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError
from noisecraft.io.formats.keys.unet import check_mappable
from noisecraft.models.unet import UNet, UNetConfig

__all__ = ["unet_config_from_diffusers", "unet_config_to_diffusers"]

DOWN_ATTN, DOWN_PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
UP_ATTN, UP_PLAIN = "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"

#: diffusers ``UNet2DConditionModel`` options and the only value (or values) our U-Net
#: implements; the first is diffusers' default, used when a config omits the key.
_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": (MID_BLOCK,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
_HINTS = {
    "addition_embed_type": " (SDXL's 'text_time' micro-conditioning)",
    "class_embed_type": " (class / noise-level embeddings)",
    "num_class_embeds": " (class embeddings)",
    "time_cond_proj_dim": " (guidance-embedding / LCM U-Nets)",
}


def _unsupported(source: Any, field: str, value: Any, expected: str) -> CheckpointError:
    hint = _HINTS.get(field, "")
    return CheckpointError(
        f"{source}: U-Net {field}={value!r}{hint} is not supported "
        f"(noisecraft's U-Net needs {expected})"
    )


def _equal(value: Any, expected: Any) -> bool:
    """``value == expected`` without Python's ``False == 0`` / ``True == 1``."""
    return value == expected and isinstance(value, bool) == isinstance(expected, bool)


def _per_level(d: Mapping[str, Any], field: str, default: Any, n: int, source: Any) -> list[Any]:
    value = d.get(field, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise _unsupported(source, field, value, f"one value per level ({n})")
        return list(value)
    return [value] * n


def _same(values: list[Any], field: str, raw: Any, source: Any) -> Any:
    if len(set(values)) > 1:
        raise _unsupported(source, field, raw, "the same value at every level with attention")
    return values[0]


def _int(d: Mapping[str, Any], field: str, default: Any, source: Any) -> int:
    value = d.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _unsupported(source, field, value, "a positive integer")
    return value


def unet_config_from_diffusers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "unet/config.json"
) -> UNetConfig:
    """Our :class:`UNetConfig` of a diffusers ``UNet2DConditionModel`` config dict.

    Keys a config omits take diffusers' defaults. ``block_out_channels`` gives
    ``model_channels`` (the first) and ``channel_mult``; ``CrossAttnDownBlock2D`` levels are
    the ``attention_levels``. Heads: an int ``attention_head_dim`` is a head count
    (``num_heads``, SD 1.x); a per-level list gives ``head_channels`` when every attention
    level has the same channels per head (SD 2.x: 64), else ``num_heads`` when the counts
    agree. Raises :class:`CheckpointError` naming ``source`` and the field otherwise.
    """
    for field, allowed in _FIXED.items():
        value = d.get(field, allowed[0])
        if field == "only_cross_attention" and isinstance(value, (list, tuple)):
            value = any(value)
        if not any(_equal(value, a) for a in allowed):
            expected = " or ".join(f"{field}={a!r}" for a in allowed)
            raise _unsupported(source, field, value, expected)

    blocks = d.get("block_out_channels", (320, 640, 1280, 1280))
    if (
        not isinstance(blocks, (list, tuple))
        or not blocks
        or not all(isinstance(c, int) and c > 0 for c in blocks)
    ):
        raise _unsupported(source, "block_out_channels", blocks, "a list of positive integers")
    base = blocks[0]
    if any(c % base for c in blocks):
        raise _unsupported(
            source, "block_out_channels", blocks, "multiples of the first level's channels"
        )
    n = len(blocks)
    down = list(d.get("down_block_types", (DOWN_ATTN,) * 3 + (DOWN_PLAIN,)))
    up = list(d.get("up_block_types", (UP_PLAIN,) + (UP_ATTN,) * 3))
    if len(down) != n or any(t not in (DOWN_ATTN, DOWN_PLAIN) for t in down):
        raise _unsupported(source, "down_block_types", down, f"{n} of {DOWN_ATTN} / {DOWN_PLAIN}")
    attention_levels = tuple(i for i, t in enumerate(down) if t == DOWN_ATTN)
    mirrored = [UP_ATTN if i in attention_levels else UP_PLAIN for i in reversed(range(n))]
    if up != mirrored:
        raise _unsupported(
            source, "up_block_types", up, f"the mirror of down_block_types {mirrored}"
        )
    # levels whose sizes matter: those with attention, and the last (the middle block)
    used = sorted({*attention_levels, n - 1})

    layers = _per_level(d, "layers_per_block", 2, n, source)
    num_res_blocks = _same(layers, "layers_per_block", d.get("layers_per_block"), source)
    cross = _per_level(d, "cross_attention_dim", 1280, n, source)
    context_dim = _same([cross[i] for i in used], "cross_attention_dim", cross, source)
    depth_raw = d.get("transformer_layers_per_block", 1)
    depths = _per_level(d, "transformer_layers_per_block", 1, n, source)
    if any(isinstance(v, (list, tuple)) for v in depths):
        raise _unsupported(source, "transformer_layers_per_block", depth_raw, "one depth per level")
    depth = _same([depths[i] for i in used], "transformer_layers_per_block", depth_raw, source)

    heads_raw = d.get("attention_head_dim", 8)
    heads = _per_level(d, "attention_head_dim", 8, n, source)
    used_heads = [heads[i] for i in used]
    if not all(
        isinstance(h, int) and h > 0 and blocks[i] % h == 0
        for i, h in zip(used, used_heads, strict=True)
    ):
        raise _unsupported(
            source, "attention_head_dim", heads_raw, "head counts that divide each level's channels"
        )
    per_head = {blocks[i] // heads[i] for i in used}
    num_heads, head_channels = -1, -1
    if isinstance(heads_raw, (list, tuple)) and len(per_head) == 1:
        head_channels = per_head.pop()
    elif len(set(used_heads)) == 1:
        num_heads = used_heads[0]
    elif len(per_head) == 1:
        head_channels = per_head.pop()
    else:
        raise _unsupported(
            source,
            "attention_head_dim",
            heads_raw,
            "the same number of heads, or the same channels per head, at every attention level",
        )
    groups = d.get("norm_num_groups", 32)
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in blocks):
        raise _unsupported(
            source, "norm_num_groups", groups, "a group count that divides every level's channels"
        )
    dropout = d.get("dropout", 0.0)
    try:
        return UNetConfig(
            in_channels=_int(d, "in_channels", 4, source),
            out_channels=_int(d, "out_channels", 4, source),
            model_channels=base,
            channel_mult=tuple(c // base for c in blocks),
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            num_heads=num_heads,
            head_channels=head_channels,
            dropout=float(dropout) if isinstance(dropout, (int, float)) else dropout,
            norm_groups=groups,
            context_dim=context_dim,
            transformer_depth=depth,
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            use_scale_shift_norm=d.get("resnet_time_scale_shift", "default") == "scale_shift",
        )
    except NoisecraftError as e:
        raise CheckpointError(f"{source}: {e}") from None


def unet_config_to_diffusers(
    config: UNetConfig, *, sample_size: int | None = None
) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of our :class:`UNetConfig`.

    ``head_channels`` is written as SD 2.x does (a per-level list of head counts),
    ``num_heads`` as SD 1.x does (one int). Raises :class:`ConfigError` for a U-Net that
    diffusers cannot express (see :func:`block_pairs`), or whose ``norm_groups`` does not
    divide every normalised layer (ours then falls back to fewer groups; diffusers cannot).
    """
    check_mappable(config)
    with torch.device("meta"):
        model = UNet(config)
    odd = [
        m
        for m in model.modules()
        if isinstance(m, nn.GroupNorm) and m.num_groups != config.norm_groups
    ]
    if odd:
        raise ConfigError(
            f"norm_groups={config.norm_groups} does not divide a layer of {odd[0].num_channels} "
            "channels; diffusers' U-Net needs norm_groups that divides every layer"
        )
    channels = [config.model_channels * m for m in config.channel_mult]
    levels = range(len(channels))
    attn = set(config.attention_levels)
    heads: int | list[int]
    if config.head_channels != -1:
        heads = [max(c // config.head_channels, 1) for c in channels]
    else:
        heads = config.num_heads
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": [DOWN_ATTN if i in attn else DOWN_PLAIN for i in levels],
        "mid_block_type": MID_BLOCK,
        "up_block_types": [UP_ATTN if i in attn else UP_PLAIN for i in reversed(levels)],
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": config.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": config.dropout,
        "act_fn": "silu",
        "norm_num_groups": config.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": config.transformer_depth,
        "attention_head_dim": heads,
        "use_linear_projection": config.use_linear_projection,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "upcast_attention": False,
        "dual_cross_attention": False,
        "class_embed_type": None,
        "addition_embed_type": None,
        "num_class_embeds": None,
    }
