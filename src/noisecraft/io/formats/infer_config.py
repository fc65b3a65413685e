"""The configs of an LDM-named U-Net, VAE and text encoder, from the shapes of their tensors.

Sizes are read off the tensors, so a tiny test file loads with the same code as a real one.
What shapes cannot tell follows SD's conventions:

* U-Net heads: SD 1.x 8 heads per attention layer; SD 2.x 64 channels per head.
* Text encoder heads: ``width // 64`` (CLIP-L 12, ViT-H 16). SD 1.x: quick GELU, last layer.
  SD 2.x: GELU, and the context is the *penultimate* layer of ViT-H (CompVis'
  ``FrozenOpenCLIPEmbedder(layer="penultimate")``). We keep all 24 layers and set
  ``clip_skip=2`` (the last layer is loaded but unused), so the file round-trips bit-exactly;
  this equals diffusers, which drops layer 23 and takes the last of 23 (both apply
  ``ln_final`` afterwards). An OpenCLIP tower of exactly 23 layers and width 1024 is
  diffusers' truncated ViT-H (``convert_diffusers_to_original_stable_diffusion.py``): its last
  layer is ViT-H's penultimate one, so it gets ``clip_skip=1``.
* GroupNorm: 32 groups. VAE latent scale 0.18215.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from noisecraft.errors import CheckpointError
from noisecraft.models.text_encoder import TextEncoderConfig
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vae import VAEConfig

__all__ = ["infer_text_config", "infer_unet_config", "infer_vae_config"]

SD_GROUPS = 32
SD_SCALING = 0.18215
SD1_UNET_HEADS = 8
SD2_HEAD_CHANNELS = 64
CLIP_HEAD_CHANNELS = 64


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (a regex with one group)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _shape(sd: Mapping[str, Tensor], key: str, what: str, source: str) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{source}: unrecognised {what} layout (no tensor {key})")
    return sd[key].shape


def infer_unet_config(
    sd: Mapping[str, Tensor],
    family: str,
    source: str = "checkpoint",
    *,
    encoder_only: bool = False,
) -> UNetConfig:
    """The U-Net's config from the shapes of its (prefix-stripped) LDM tensors.

    Levels are delimited by the ``input_blocks.N.0.op`` downsampling convs; each level's
    channels come from its ResBlocks' output convs, attention levels from the
    SpatialTransformers found there (``input_blocks.N.1``), the depth from their
    ``transformer_blocks``, the context width from ``attn2.to_k``. Heads follow the family's
    convention (module docstring). ``encoder_only``: the tensors are a U-Net's encoder alone
    (a ControlNet's), so ``out_channels`` is taken equal to ``in_channels``.
    """

    def shape(key: str) -> torch.Size:
        return _shape(sd, key, "U-Net", source)

    conv_in = shape("input_blocks.0.0.weight")
    model_channels, in_channels = int(conv_in[0]), int(conv_in[1])
    out_channels = in_channels if encoder_only else int(shape("out.2.weight")[0])
    n_in = _count(sd, r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]
    attention: list[set[int]] = [set()]
    depths: set[int] = set()
    for i in range(1, n_in):
        p = f"input_blocks.{i}."
        if p + "0.op.weight" in sd:
            levels.append([])
            attention.append(set())
            continue
        levels[-1].append(int(shape(p + "0.out_layers.3.weight")[0]))
        if p + "1.proj_in.weight" in sd:
            attention[-1].add(i)
            depths.add(_count(sd, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
    depths.add(_count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    blocks = {len(lv) for lv in levels}
    if len(blocks) != 1 or 0 in blocks:
        raise CheckpointError(
            f"{source}: the U-Net has a different number of blocks per level "
            f"({[len(lv) for lv in levels]}); only the SD 1.x / 2.x layout is supported"
        )
    mult = []
    for lv in levels:
        if len(set(lv)) != 1 or lv[0] % model_channels:
            raise CheckpointError(
                f"{source}: U-Net level channels {lv} are not a multiple of {model_channels}"
            )
        mult.append(lv[0] // model_channels)
    if len(depths) != 1 or 0 in depths:
        raise CheckpointError(
            f"{source}: the U-Net's transformers have different depths {sorted(depths)} "
            "(an SDXL-style U-Net); only SD 1.x / 2.x are supported"
        )
    if any(k.startswith("label_emb.") for k in sd):
        raise CheckpointError(
            f"{source}: a class-conditioned U-Net (label_emb, e.g. the x4 upscaler) is not "
            "supported"
        )
    to_k = next((sd[k] for k in sorted(sd) if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise CheckpointError(
            f"{source}: the U-Net has no cross-attention; not a text-to-image model"
        )
    proj = sd.get("middle_block.1.proj_in.weight")
    emb = shape("input_blocks.1.0.emb_layers.1.weight")
    heads = (
        {"num_heads": -1, "head_channels": SD2_HEAD_CHANNELS}
        if family == "sd2"
        else {"num_heads": SD1_UNET_HEADS, "head_channels": -1}
    )
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=blocks.pop(),
        attention_levels=tuple(i for i, a in enumerate(attention) if a),
        dropout=0.0,
        norm_groups=SD_GROUPS,
        context_dim=int(to_k.shape[1]),
        transformer_depth=depths.pop(),
        use_linear_projection=proj is not None and proj.ndim == 2,
        use_scale_shift_norm=int(emb[0]) == 2 * levels[0][0],
        **heads,
    )


def infer_vae_config(sd: Mapping[str, Tensor], source: str = "checkpoint") -> VAEConfig:
    """The VAE's config from the shapes of its LDM tensors (``first_stage_model.`` stripped)."""

    def shape(key: str) -> torch.Size:
        return _shape(sd, key, "VAE", source)

    conv_in = shape("encoder.conv_in.weight")
    base = int(conv_in[0])
    n_levels = _count(sd, r"encoder\.down\.(\d+)\.")
    if n_levels == 0:
        raise CheckpointError(f"{source}: unrecognised VAE layout (no encoder.down.N blocks)")
    mult = []
    for i in range(n_levels):
        ch = int(shape(f"encoder.down.{i}.block.0.conv2.weight")[0])
        if ch % base:
            raise CheckpointError(
                f"{source}: VAE level {i} has {ch} channels, not a multiple of {base}"
            )
        mult.append(ch // base)
    z = int(shape("decoder.conv_in.weight")[1])
    return VAEConfig(
        in_channels=int(conv_in[1]),
        out_channels=int(shape("decoder.conv_out.weight")[0]),
        base_channels=base,
        channel_mult=tuple(mult),
        num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=z,
        double_z=int(shape("encoder.conv_out.weight")[0]) == 2 * z,
        norm_groups=SD_GROUPS,
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
        scaling_factor=SD_SCALING,
    )


def infer_text_config(
    sd: Mapping[str, Tensor], family: str, layout: str, source: str = "checkpoint"
) -> TextEncoderConfig:
    """The text encoder's config from the shapes of its (native-named) tensors.

    Heads ``width // 64``; SD 1.x quick GELU and the last layer; SD 2.x GELU and, for the
    OpenCLIP layout, the penultimate layer (``clip_skip=2``), except diffusers' truncated
    23-layer ViT-H (module docstring).
    """

    def shape(key: str) -> torch.Size:
        return _shape(sd, key, "text encoder", source)

    vocab, width = (int(s) for s in shape("embeddings.token_embedding.weight"))
    layers = _count(sd, r"encoder\.layers\.(\d+)\.")
    if width % CLIP_HEAD_CHANNELS or layers == 0:
        raise CheckpointError(
            f"{source}: cannot infer the text encoder's heads: its width {width} is not a "
            f"multiple of {CLIP_HEAD_CHANNELS} (CLIP's channels per head)"
        )
    clip_skip = 1
    if layout == "open_clip" and not (width == 1024 and layers == 23):
        clip_skip = 2 if layers > 1 else 1
    return TextEncoderConfig(
        vocab_size=vocab,
        max_positions=int(shape("embeddings.position_embedding.weight")[0]),
        width=width,
        layers=layers,
        heads=width // CLIP_HEAD_CHANNELS,
        intermediate_size=int(shape("encoder.layers.0.mlp.fc1.weight")[0]),
        activation="gelu" if family == "sd2" else "quick_gelu",
        clip_skip=clip_skip,
    )
