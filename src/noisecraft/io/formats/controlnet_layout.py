"""What an SD 1.x / 2.x ControlNet file holds: its tensors under our names, its config from
their shapes, and whether it fits a base U-Net (else a one-line refusal).

Original files come in two layouts, both read:

* ``full``: the ControlNet under ``control_model.`` (lllyasviel's ``ControlLDM`` state dict:
  the ControlNet-v1-1 ``control_v11*.pth`` files; the 1.0 ``control_sd15_*.pth`` files also
  hold the whole SD model beside it, which is ignored);
* ``pruned``: the same names without the prefix (webui/ControlNet-modules-safetensors'
  ``control_*_fp16.safetensors``, thibaud's SD 2.1 ControlNets).

A diffusers ``ControlNetModel`` state dict (``controlnet_cond_embedding.*``) is renamed by
:func:`.keys.controlnet.diffusers_table` once its ``config.json`` is read. Sizes come from
the shapes (the U-Net's encoder through :func:`.infer_config.infer_unet_config`; the hint
encoder's widths from its convs); what shapes cannot show (heads, GroupNorm groups) follows
the base U-Net's config when one is given (a ControlNet is a copy of its base's encoder),
else SD's conventions (32 groups; SD 1.x: 8 heads; SD 2.x, i.e. 1024-wide context or linear
projections: 64 channels per head). Our own files carry the exact config in the metadata
key :data:`META_KEY`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.formats.infer_config import infer_unet_config
from noisecraft.io.formats.keys.controlnet import LDM, PREFIX
from noisecraft.key_rules import to_ours
from noisecraft.models.controlnet import ControlNetConfig
from noisecraft.models.unet import UNetConfig

__all__ = [
    "META_KEY",
    "ControlNetTensors",
    "check_fits",
    "config_from_meta",
    "infer_controlnet_config",
    "is_controlnet_keys",
    "split_controlnet",
]

#: Metadata key of the exact config in the single files noisecraft writes.
META_KEY = "noisecraft_controlnet"
_FAMILY_BY_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x"}
_MARKERS = ("input_hint_block.", "zero_convs.", "middle_block_out.", "controlnet_cond_embedding.")


def is_controlnet_keys(keys: Mapping[str, object] | list[str]) -> bool:
    """Whether a state dict's keys are a ControlNet's (any layout, SDXL's included)."""
    return any(k.startswith(PREFIX) or any(m in k for m in _MARKERS) for k in keys)


@dataclass(frozen=True)
class ControlNetTensors:
    """A ControlNet file's tensors: ``tensors`` under our names, ``layout`` "full" or
    "pruned", ``ignored``: how many tensors outside ``control_model.`` a full file had."""

    tensors: dict[str, Tensor]
    layout: str
    ignored: int = 0


def _refuse_other_kinds(sd: Mapping[str, Tensor], source: str) -> None:
    keys = list(sd)
    if any("lora" in k for k in keys):
        raise CheckpointError(
            f"{source} is a LoRA or Control-LoRA, not a ControlNet; use a full ControlNet file"
        )
    label = sd.get("label_emb.0.0.weight", sd.get(PREFIX + "label_emb.0.0.weight"))
    sdxl = (label is not None and label.ndim == 2 and label.shape[1] in (2816, 2560)) or any(
        k.startswith("add_embedding.") for k in keys
    )
    if sdxl:
        raise CheckpointError(
            f"{source} is an SDXL ControlNet; SDXL is not supported (use a ControlNet made for "
            "SD 1.x or 2.x)"
        )
    if not is_controlnet_keys(keys):
        shown = ", ".join(sorted(keys)[:3])
        raise CheckpointError(
            f"{source} is not a ControlNet (keys like {shown}); expected control_model.*, "
            "input_hint_block.* or a diffusers ControlNetModel"
        )


def split_controlnet(sd: Mapping[str, Tensor], source: str) -> ControlNetTensors:
    """The ControlNet tensors of an original single file under our names (module docstring).
    Other kinds of files (a model, a LoRA, an SDXL ControlNet) raise a one-line
    :class:`CheckpointError`; so does a diffusers-named file (load its folder)."""
    _refuse_other_kinds(sd, source)
    if any(k.startswith("controlnet_cond_embedding.") for k in sd):
        raise CheckpointError(
            f"{source} holds a diffusers ControlNetModel's weights; load the folder with its "
            "config.json instead"
        )
    if any(k.startswith(PREFIX) for k in sd):
        inner = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
        layout, ignored = "full", len(sd) - len(inner)
    else:
        inner, layout, ignored = dict(sd), "pruned", 0
    mapped = to_ours(LDM, inner)
    return ControlNetTensors(mapped.tensors, layout, ignored)


def _hint_channels(sd: Mapping[str, Tensor], source: str) -> tuple[tuple[int, ...], int, int]:
    """(widths, input channels, output channels) of the hint encoder from its convs."""
    rx = re.compile(r"input_hint_block\.(\d+)\.weight$")
    found = sorted(int(m.group(1)) for k in sd if (m := rx.match(k)))
    n = len(found)
    if n < 2 or n % 2 or found != [2 * i for i in range(n)]:
        raise CheckpointError(
            f"{source}: unrecognised ControlNet hint encoder (convs at input_hint_block "
            f"{found}; expected 0, 2, 4, ...)"
        )
    w = [sd[f"input_hint_block.{i}.weight"] for i in found]
    widths = tuple(int(w[2 * j].shape[0]) for j in range(n // 2))
    return widths, int(w[0].shape[1]), int(w[-1].shape[0])


def infer_controlnet_config(
    sd: Mapping[str, Tensor], base: UNetConfig | None = None, source: str = "checkpoint"
) -> ControlNetConfig:
    """The config of a ControlNet from its (our-named) tensors' shapes; heads and GroupNorm
    groups from ``base`` (the U-Net it will drive) when given, else SD's conventions (module
    docstring)."""
    proj = sd.get("middle_block.1.proj_in.weight")
    to_k = next((sd[k] for k in sorted(sd) if k.endswith("attn2.to_k.weight")), None)
    linear = proj is not None and proj.ndim == 2
    family = "sd2" if linear or (to_k is not None and to_k.shape[1] == 1024) else "sd1"
    try:
        unet = infer_unet_config(sd, family, source, encoder_only=True)
        if base is not None:
            unet = dataclasses.replace(
                unet,
                num_heads=base.num_heads,
                head_channels=base.head_channels,
                norm_groups=base.norm_groups,
            )
        widths, hint_in, hint_out = _hint_channels(sd, source)
        if hint_out != unet.model_channels:
            raise CheckpointError(
                f"{source}: the hint encoder gives {hint_out} channels but the ControlNet's "
                f"first block has {unet.model_channels}"
            )
        return ControlNetConfig(unet, widths, hint_in)
    except ConfigError as e:
        raise CheckpointError(f"{source}: inferred an invalid ControlNet config ({e})") from None


def config_from_meta(metadata: Mapping[str, str], source: str) -> ControlNetConfig | None:
    """The exact config noisecraft wrote into a file's metadata, or None."""
    raw = metadata.get(META_KEY)
    if raw is None:
        return None
    try:
        return ControlNetConfig.from_dict(json.loads(raw)["config"])
    except (ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{source}: corrupt {META_KEY} metadata ({e})") from None


def _family(context_dim: int | None) -> str:
    return _FAMILY_BY_CONTEXT.get(context_dim or 0, f"a {context_dim}-wide context")


def check_fits(config: ControlNetConfig, base: UNetConfig, source: str) -> None:
    """Refuse, in one line, a ControlNet whose residuals cannot drive a U-Net of ``base``:
    another family (context width), other channels or levels, or another latent input."""
    c = config.unet
    if c.context_dim != base.context_dim:
        raise CheckpointError(
            f"{source} is a ControlNet for {_family(c.context_dim)} (context width "
            f"{c.context_dim}) but the model is {_family(base.context_dim)} (context width "
            f"{base.context_dim}); use a ControlNet made for the model's base"
        )
    mine = (c.model_channels, c.channel_mult, c.num_res_blocks)
    theirs = (base.model_channels, base.channel_mult, base.num_res_blocks)
    if mine != theirs:
        raise CheckpointError(
            f"{source}: the ControlNet's U-Net layout (channels {c.model_channels} x "
            f"{list(c.channel_mult)}, {c.num_res_blocks} res blocks) differs from the model's "
            f"({base.model_channels} x {list(base.channel_mult)}, {base.num_res_blocks}); use "
            "a ControlNet made for the model's base"
        )
    if c.in_channels not in (base.in_channels, base.out_channels):
        raise CheckpointError(
            f"{source}: the ControlNet takes {c.in_channels} latent channels but the model's "
            f"U-Net {base.in_channels}; use a ControlNet made for the model's base"
        )
