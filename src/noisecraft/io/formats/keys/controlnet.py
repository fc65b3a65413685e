"""ControlNet weights: ours (cldm) <-> diffusers ``ControlNetModel``.

Our :class:`~noisecraft.models.controlnet.ControlNet` uses the names of lllyasviel's
``cldm.cldm.ControlNet``, which original files hold under ``control_model.`` (or, in the
"pruned" files such as webui/ControlNet-modules-safetensors' ``control_*_fp16.safetensors``,
with no prefix). diffusers' ``ControlNetModel`` holds the same tensors under the names of its
U-Net's encoder plus its own (the correspondence of diffusers'
``single_file_utils.convert_controlnet_checkpoint``):

* the encoder (``time_embed``, ``input_blocks``, ``middle_block``): the U-Net's rules,
  :func:`.unet.block_pairs` without the decoder's;
* ``input_hint_block.0`` <-> ``controlnet_cond_embedding.conv_in``; the convs between,
  ``input_hint_block.{2, 4, ..., 2 * k}`` <-> ``controlnet_cond_embedding.blocks.{0, ..., k - 1}``;
  the last, ``input_hint_block.{2 * k + 2}`` (14 for the standard four levels) <->
  ``controlnet_cond_embedding.conv_out``;
* ``zero_convs.N.0`` <-> ``controlnet_down_blocks.N``; ``middle_block_out.0`` <->
  ``controlnet_mid_block``.

Renaming never touches a tensor, so ours -> diffusers -> ours is bit-exact.
"""

from __future__ import annotations

from functools import cache

from noisecraft.io.formats.keys.unet import block_pairs, pair_rules
from noisecraft.key_rules import Table, rule
from noisecraft.models.controlnet import ControlNetConfig

__all__ = ["LDM", "PREFIX", "diffusers_table", "hint_conv_indices"]

#: Single files: our names (under :data:`PREFIX` in full-layout files).
LDM = Table(rule("{rest}", "{rest}"))
#: The prefix of the ControlNet in original full-layout files (cldm's ``ControlLDM``).
PREFIX = "control_model."

_DECODER = ("output_blocks.", "out.")


def hint_conv_indices(config: ControlNetConfig) -> list[int]:
    """Indices in ``input_hint_block`` of its convs (SiLUs sit between them):
    ``[0, 2, ..., 14]`` for the standard four levels."""
    n_convs = 2 * len(config.hint_channels)  # conv_in, 2 per level after the first, conv_out
    return [2 * i for i in range(n_convs)]


@cache
def diffusers_table(config: ControlNetConfig) -> Table:
    """Ours <-> diffusers ``ControlNetModel`` names for a ControlNet of this config."""
    encoder = [p for p in block_pairs(config.unet) if not p[0].startswith(_DECODER)]
    rules = pair_rules(encoder)
    convs = hint_conv_indices(config)
    names = ["conv_in"] + [f"blocks.{i}" for i in range(len(convs) - 2)] + ["conv_out"]
    for index, name in zip(convs, names, strict=True):
        rules.append(
            rule(f"input_hint_block.{index}.{{p:[^.]+}}", f"controlnet_cond_embedding.{name}.{{p}}")
        )
    rules.append(rule("zero_convs.{n}.0.{p:[^.]+}", "controlnet_down_blocks.{n}.{p}"))
    rules.append(rule("middle_block_out.0.{p:[^.]+}", "controlnet_mid_block.{p}"))
    return Table(rules)
