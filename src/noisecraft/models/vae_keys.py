"""AutoencoderKL weight names: ours (LDM's) <-> diffusers' ``AutoencoderKL``, as a key-rule table.

Our :class:`~noisecraft.models.vae.AutoencoderKL` uses the names of LDM's
``ldm.models.autoencoder.AutoencoderKL`` (SD single files store them under
``first_stage_model.``). diffusers holds the same tensors under other names; the table below
(applied by :mod:`noisecraft.key_rules`) is the correspondence of diffusers' own converter
(``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint``):

* ``{encoder,decoder}.{conv_in,conv_out}``, ``quant_conv``, ``post_quant_conv``: the same;
  ``norm_out`` <-> ``conv_norm_out``.
* ``encoder.down.{i}.block.{j}`` <-> ``encoder.down_blocks.{i}.resnets.{j}``,
  ``encoder.down.{i}.downsample`` <-> ``encoder.down_blocks.{i}.downsamplers.0``.
* ``decoder.up.{i}`` <-> ``decoder.up_blocks.{n-1-i}`` (LDM indexes the decoder's levels by
  resolution, diffusers in the order they run): ``block.{j}`` <-> ``resnets.{j}``,
  ``upsample`` <-> ``upsamplers.0``. The table is built for the level count ``n``.
* ``mid.block_{1,2}`` <-> ``mid_block.resnets.{0,1}``; ``mid.attn_1`` <->
  ``mid_block.attentions.0`` with ``norm`` / ``q`` / ``k`` / ``v`` / ``proj_out`` <->
  ``group_norm`` / ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``; the four projections are
  1x1 convolutions here and Linear layers there (:class:`~noisecraft.key_rules.Conv1x1`).
  Older diffusers files name them ``query`` / ``key`` / ``value`` / ``proj_attn`` (read only).
* In a ResnetBlock, ``nin_shortcut`` <-> ``conv_shortcut``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache

from torch import Tensor

from noisecraft.errors import CheckpointError
from noisecraft.key_rules import Conv1x1, Rule, Table, read_only, rule, to_ours, to_theirs, under

__all__ = ["diffusers_table", "from_diffusers_state_dict", "to_diffusers_state_dict"]

_LINEAR = Conv1x1(linear=True)

#: Inside a ResnetBlock.
_RESNET = (rule("nin_shortcut.{rest}", "conv_shortcut.{rest}"), rule("{rest}", "{rest}"))


def _attention() -> Iterable[Rule]:
    """Inside the middle attention block."""
    yield rule("norm.{rest}", "group_norm.{rest}")
    for ours, theirs, legacy in (
        ("q", "to_q", "query"),
        ("k", "to_k", "key"),
        ("v", "to_v", "value"),
        ("proj_out", "to_out.0", "proj_attn"),
    ):
        yield rule(f"{ours}.weight", f"{theirs}.weight", _LINEAR)
        yield rule(f"{ours}.bias", f"{theirs}.bias")
        yield read_only(f"{ours}.weight", f"{legacy}.weight", _LINEAR)
        yield read_only(f"{ours}.bias", f"{legacy}.bias")
    yield rule("{rest}", "{rest}")


def _rules(levels: int) -> Iterable[Rule]:
    yield rule("quant_conv.{rest}", "quant_conv.{rest}")
    yield rule("post_quant_conv.{rest}", "post_quant_conv.{rest}")
    for e in ("encoder", "decoder"):
        yield rule(f"{e}.conv_in.{{rest}}", f"{e}.conv_in.{{rest}}")
        yield rule(f"{e}.conv_out.{{rest}}", f"{e}.conv_out.{{rest}}")
        yield rule(f"{e}.norm_out.{{rest}}", f"{e}.conv_norm_out.{{rest}}")
        yield from under(f"{e}.mid.block_1.", f"{e}.mid_block.resnets.0.", _RESNET)
        yield from under(f"{e}.mid.block_2.", f"{e}.mid_block.resnets.1.", _RESNET)
        yield from under(f"{e}.mid.attn_1.", f"{e}.mid_block.attentions.0.", _attention())
    yield from under("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}.", _RESNET)
    yield rule(
        "encoder.down.{i}.downsample.{rest}", "encoder.down_blocks.{i}.downsamplers.0.{rest}"
    )
    for i in range(levels):
        theirs = f"decoder.up_blocks.{levels - 1 - i}."
        yield from under(f"decoder.up.{i}.block.{{j}}.", theirs + "resnets.{j}.", _RESNET)
        yield rule(f"decoder.up.{i}.upsample.{{rest}}", theirs + "upsamplers.0.{rest}")


@cache
def diffusers_table(levels: int) -> Table:
    """The table of a VAE with ``levels`` resolution levels (``len(channel_mult)``)."""
    return Table(_rules(levels))


def _levels(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m[1]) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def to_diffusers_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM-named VAE weights (ours, ``first_stage_model.`` stripped) -> diffusers' names.

    See the module docstring for the rules; 1x1 attention convolutions become Linear weights
    (views). Tensors are shared with the input, not copied. A key that is not one of an LDM
    AutoencoderKL raises :class:`CheckpointError` naming it.
    """
    mapped = to_theirs(diffusers_table(_levels(state_dict, r"decoder\.up\.(\d+)\.")), state_dict)
    if mapped.unmapped:
        raise CheckpointError(
            f"'{mapped.unmapped[0]}' is not a key of an LDM AutoencoderKL state dict"
        )
    return mapped.tensors


def from_diffusers_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``AutoencoderKL`` weights -> LDM names (ours); inverse of the above.

    Also reads the older diffusers attention names (``query``, ``key``, ``value``,
    ``proj_attn``). Linear attention weights become 1x1 conv weights. Tensors are shared
    with the input, not copied.
    """
    levels = _levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    mapped = to_ours(diffusers_table(levels), state_dict)
    if mapped.unmapped:
        raise CheckpointError(
            f"'{mapped.unmapped[0]}' is not a key of a diffusers AutoencoderKL state dict"
        )
    return mapped.tensors
