"""Stable Diffusion U-Net weights and configs: ours (LDM) <-> diffusers ``UNet2DConditionModel``.

Our :class:`~noisecraft.models.unet.UNet` uses the names of CompVis ldm's ``openaimodel``
(``model.diffusion_model.*`` in single files, without the prefix). diffusers' U-Net holds the
same tensors under other names. The correspondence is the one of diffusers' own converter
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``), written here as a
key-rule table built from the config (:func:`diffusers_table`), read in both directions:

* ``time_embed.{0,2}`` <-> ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` <-> ``conv_in``;
  ``out.{0,2}`` <-> ``conv_norm_out`` / ``conv_out``.
* With ``R`` = ``num_res_blocks``, input block ``n = 1, 2, ...`` is, level by level, ``R``
  blocks ``[resnet, attention?]`` (``input_blocks.n.0`` <-> ``down_blocks.i.resnets.j``,
  ``input_blocks.n.1`` <-> ``down_blocks.i.attentions.j``) and, except at the last level, one
  downsampler (``input_blocks.n.0.op`` <-> ``down_blocks.i.downsamplers.0.conv``).
* ``middle_block.{0,1,2}`` <-> ``mid_block.{resnets.0, attentions.0, resnets.1}``.
* Output block ``n`` is up block ``b = n // (R + 1)``, layer ``j = n % (R + 1)`` (levels in
  reverse): ``output_blocks.n.0`` <-> ``up_blocks.b.resnets.j``, ``output_blocks.n.1`` <->
  ``up_blocks.b.attentions.j`` where the level has attention, and the last layer of every
  block but the final one ends with ``output_blocks.n.{1|2}.conv`` <->
  ``up_blocks.b.upsamplers.0.conv``.
* Inside a resnet: ``in_layers.0`` / ``in_layers.2`` / ``emb_layers.1`` / ``out_layers.0`` /
  ``out_layers.3`` / ``skip_connection`` <-> ``norm1`` / ``conv1`` / ``time_emb_proj`` /
  ``norm2`` / ``conv2`` / ``conv_shortcut``. Attention blocks (SpatialTransformer /
  ``Transformer2DModel``) use the same names inside on both sides.

Renaming never touches a tensor, so ours -> diffusers -> ours is bit-exact. In single files the
U-Net has our names under ``model.diffusion_model.`` (:data:`LDM`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cache

from torch import Tensor

from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.key_rules import Rule, Table, rule, to_ours, to_theirs, under
from noisecraft.models.unet import UNetConfig

__all__ = [
    "LDM",
    "RESNET_LEAVES",
    "block_pairs",
    "check_mappable",
    "diffusers_table",
    "pair_rules",
    "unet_from_diffusers",
    "unet_to_diffusers",
]

#: Single files (and our own files): our names.
LDM = Table(rule("{rest}", "{rest}"))

#: ResBlock leaves: (ours, diffusers ``ResnetBlock2D``).
RESNET_LEAVES: tuple[tuple[str, str], ...] = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)

_PARAM = "[^.]+"  # the parameter of a ResBlock leaf: weight, bias


def block_pairs(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """``(ours, diffusers, is_resnet)`` module-path pairs of a U-Net of this config.

    Computed by walking the levels as :class:`~noisecraft.models.unet.UNet` builds them
    (see the module docstring); ``is_resnet`` marks blocks whose leaves are renamed too.
    """
    check_mappable(config)
    r = config.num_res_blocks
    levels = len(config.channel_mult)
    attn = set(config.attention_levels)
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
    ]
    n = 1
    for level in range(levels):
        for j in range(r):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", True))
            if level in attn:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", False))
            n += 1
        if level != levels - 1:
            pairs.append(
                (f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False)
            )
            n += 1
    n = 0
    for b, level in enumerate(reversed(range(levels))):
        for j in range(r + 1):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{b}.resnets.{j}", True))
            k = 1
            if level in attn:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{b}.attentions.{j}", False))
                k = 2
            if level and j == r:
                pairs.append(
                    (f"output_blocks.{n}.{k}.conv", f"up_blocks.{b}.upsamplers.0.conv", False)
                )
            n += 1
    return pairs


def check_mappable(config: UNetConfig) -> None:
    """Raise :class:`ConfigError` for U-Nets that have no ``UNet2DConditionModel`` layout."""
    problems = {
        "context_dim": config.context_dim is None,
        "resblock_updown": config.resblock_updown,
        "num_classes": config.num_classes is not None,
        "learn_sigma": config.learn_sigma,
    }
    bad = [name for name, is_bad in problems.items() if is_bad]
    if bad:
        raise ConfigError(
            f"a U-Net with {bad[0]}={getattr(config, bad[0])!r} has no diffusers "
            "UNet2DConditionModel equivalent (it needs cross-attention, conv resampling, no "
            "class labels and no learned variance)"
        )


@cache
def diffusers_table(config: UNetConfig) -> Table:
    """Ours <-> diffusers' names for a U-Net of this config: each pair of
    :func:`block_pairs` as a prefix, with the ResBlock leaves renamed (:data:`RESNET_LEAVES`;
    any other name inside a ResBlock is unmapped) and every other block's inside unchanged
    (names in attention blocks are the same on both sides; an unknown one is left to the
    strict load to refuse)."""
    return Table(pair_rules(block_pairs(config)))


def pair_rules(pairs: Iterable[tuple[str, str, bool]]) -> list[Rule]:
    """The rules of :func:`block_pairs`' pairs: each pair a prefix, ResBlock leaves renamed
    (:data:`RESNET_LEAVES`), every other block's inside unchanged."""
    rules: list[Rule] = []
    for ours, theirs, is_resnet in pairs:
        if is_resnet:
            leaves = (rule(f"{o}.{{param:{_PARAM}}}", f"{t}.{{param}}") for o, t in RESNET_LEAVES)
            rules.extend(under(f"{ours}.", f"{theirs}.", leaves))
        else:
            rules.append(rule(f"{ours}.{{rest}}", f"{theirs}.{{rest}}"))
    return rules


def unet_to_diffusers(state_dict: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our U-Net weights -> diffusers ``UNet2DConditionModel`` names (tensors not copied)."""
    mapped = to_theirs(diffusers_table(config), state_dict)
    if mapped.unmapped:
        raise CheckpointError(f"'{mapped.unmapped[0]}' is not a key of a U-Net with this config")
    return mapped.tensors


def unet_from_diffusers(
    state_dict: Mapping[str, Tensor],
    config: UNetConfig,
    *,
    source: str | os.PathLike = "the diffusers U-Net",
) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` weights -> our names; inverse of
    :func:`unet_to_diffusers`. An unknown key raises :class:`CheckpointError` naming ``source``."""
    mapped = to_ours(diffusers_table(config), state_dict)
    if mapped.unmapped:
        raise CheckpointError(
            f"{source}: unexpected U-Net weight '{mapped.unmapped[0]}' for the config in "
            "unet/config.json"
        )
    return mapped.tensors
