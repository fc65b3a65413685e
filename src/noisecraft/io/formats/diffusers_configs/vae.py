"""A diffusers ``vae/config.json`` (``AutoencoderKL``) <-> our :class:`VAEConfig`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError
from noisecraft.io.formats.diffusers_files import DIFFUSERS_VERSION
from noisecraft.models.vae import VAEConfig

__all__ = ["vae_config_from_diffusers", "vae_config_to_diffusers"]


def vae_config_from_diffusers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "vae/config.json"
) -> VAEConfig:
    """Our :class:`VAEConfig` of a diffusers ``AutoencoderKL`` config dict.

    ``block_out_channels`` -> ``base_channels`` (the first) and ``channel_mult``;
    ``scaling_factor`` defaults to SD's 0.18215. Configs our VAE cannot express (other block
    types, no quant convs, a ``shift_factor``, which SD pipelines ignore) raise
    :class:`CheckpointError` naming ``source`` and the field.
    """

    def bad(field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{source}: VAE {field}={value!r} is not supported (noisecraft's VAE needs {expected})"
        )

    blocks = d.get("block_out_channels", (64,))
    if (
        not isinstance(blocks, (list, tuple))
        or not blocks
        or not all(isinstance(c, int) and c > 0 for c in blocks)
        or any(c % blocks[0] for c in blocks)
    ):
        raise bad("block_out_channels", blocks, "multiples of the first level's channels")
    n = len(blocks)
    for field, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(d.get(field, (block,)))
        if types != [block] * n:
            raise bad(field, types, f"{n} x {block}")
    for field, allowed in (
        ("act_fn", "silu"),
        ("use_quant_conv", True),
        ("use_post_quant_conv", True),
        ("shift_factor", None),
    ):
        if d.get(field, allowed) != allowed:
            raise bad(field, d.get(field), f"{field}={allowed!r}")
    scaling = d.get("scaling_factor", 0.18215)
    try:
        return VAEConfig(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            base_channels=blocks[0],
            channel_mult=tuple(c // blocks[0] for c in blocks),
            num_res_blocks=d.get("layers_per_block", 1),
            z_channels=d.get("latent_channels", 4),
            double_z=True,
            norm_groups=d.get("norm_num_groups", 32),
            mid_attention=d.get("mid_block_add_attention", True),
            scaling_factor=0.18215 if scaling is None else scaling,
            shift_factor=None,
        )
    except NoisecraftError as e:
        raise CheckpointError(f"{source}: {e}") from None


def vae_config_to_diffusers(config: VAEConfig, *, sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of our :class:`VAEConfig` (inverse of the above)."""
    if config.channel_mult[0] != 1 or not config.double_z or config.shift_factor is not None:
        raise ConfigError(
            "this VAE has no diffusers AutoencoderKL equivalent: it needs channel_mult[0] = 1, "
            f"double_z and no shift_factor (got {list(config.channel_mult)}, "
            f"{config.double_z}, {config.shift_factor})"
        )
    channels = [config.base_channels * m for m in config.channel_mult]
    odd = [c for c in channels if c % config.norm_groups]
    if odd:
        raise ConfigError(
            f"VAE norm_groups={config.norm_groups} does not divide {odd[0]} channels; diffusers' "
            "AutoencoderKL needs norm_groups that divides every level"
        )
    n = len(channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": config.mid_attention,
    }
