"""Which layers a LoRA patches, and the names LoRA files give them.

Our modules are keyed by their path with a component prefix: ``unet.`` + the U-Net's LDM
(``openaimodel``) path, ``text_encoder.`` + the CLIP text encoder's path
(``unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q``,
``text_encoder.encoder.layers.0.self_attn.q_proj``). Files name the same layers otherwise:

* kohya / AUTOMATIC1111: ``lora_unet_`` + the diffusers module path with ``_`` for ``.``
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); A1111 also
  reads the LDM path so spelled (``lora_unet_input_blocks_1_1_...``). The text encoder is
  ``lora_te_`` (SD 1.x / 2.x; ``lora_te1_`` in files made for SDXL's first encoder) +
  transformers' path (``text_model_encoder_layers_0_self_attn_q_proj``).
* diffusers / PEFT: ``unet.`` + the diffusers path, ``text_encoder.`` + transformers' path
  (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``).

The U-Net's LDM <-> diffusers names are the key-rule table of
:mod:`noisecraft.io.formats.keys.unet` (built from the U-Net's config), the text encoder's
the CLIP table of :mod:`noisecraft.io.formats.keys.clip`: applied here to module paths (a
``.weight`` put on and taken off), never written a second time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from noisecraft.errors import ConfigError
from noisecraft.io.formats.keys import clip as clip_keys
from noisecraft.io.formats.keys.unet import diffusers_table
from noisecraft.key_rules import to_theirs
from noisecraft.models.unet import UNetConfig

__all__ = [
    "COMPONENTS",
    "KOHYA_PREFIXES",
    "diffusers_names",
    "kohya_name",
    "lora_targets",
    "name_index",
]

#: Model components a LoRA may patch, in our key prefix order.
COMPONENTS = ("unet", "text_encoder")
#: kohya's name prefix of each component (the one written first).
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_")}
_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def lora_targets(model: Any) -> dict[str, nn.Module]:
    """Every Linear / Conv2d of ``model``'s U-Net and text encoder, keyed ``unet.<path>`` /
    ``text_encoder.<path>`` (module docstring): the layers a LoRA may patch."""
    out: dict[str, nn.Module] = {}
    for component in COMPONENTS:
        root = getattr(model, component, None)
        if root is None:
            continue
        for path, module in root.named_modules():
            if path and isinstance(module, _LAYER_TYPES):
                out[f"{component}.{path}"] = module
    return out


def _renamed(table: Any, paths: list[str]) -> dict[str, str]:
    """Module paths renamed by a key table (applied to ``path.weight``); unmapped ones left
    out."""
    dummy = torch.empty(0)
    mapped = to_theirs(table, {p + ".weight": dummy for p in paths})
    theirs = list(mapped.tensors)
    ours = [k for k in (p + ".weight" for p in paths) if k not in set(mapped.unmapped)]
    ours = [k for k in ours if k not in set(mapped.ignored)]
    return {o[: -len(".weight")]: t[: -len(".weight")] for o, t in zip(ours, theirs, strict=True)}


def diffusers_names(keys: list[str] | Any, unet_config: UNetConfig | None) -> dict[str, str]:
    """Our keys -> diffusers / PEFT module names (``unet.down_blocks...``,
    ``text_encoder.text_model...``). U-Net keys need the U-Net's config (its levels decide the
    block numbers); keys without a diffusers name are left out."""
    keys = list(keys)
    out: dict[str, str] = {}
    unet = [k[len("unet.") :] for k in keys if k.startswith("unet.")]
    text = [k[len("text_encoder.") :] for k in keys if k.startswith("text_encoder.")]
    if unet:
        if unet_config is None:
            raise ConfigError(
                "naming U-Net LoRA layers in diffusers' layout needs the U-Net's config; "
                "give the model"
            )
        for ours, theirs in _renamed(diffusers_table(unet_config), unet).items():
            out["unet." + ours] = "unet." + theirs
    for ours, theirs in _renamed(clip_keys.TRANSFORMERS, text).items():
        out["text_encoder." + ours] = "text_encoder." + theirs
    return out


def kohya_name(diffusers_name: str) -> str:
    """A diffusers module name (``unet.down_blocks.0...``) in kohya's spelling
    (``lora_unet_down_blocks_0...``)."""
    component, path = diffusers_name.split(".", 1)
    return KOHYA_PREFIXES[component][0] + path.replace(".", "_")


def name_index(model: Any) -> dict[str, str]:
    """Every module name a LoRA file may use for a layer of ``model`` -> our key: kohya's
    (diffusers and LDM paths; ``lora_te_`` / ``lora_te1_``, with or without ``text_model_``)
    and diffusers' / PEFT's (``unet.`` / ``text_encoder.`` + diffusers' path, with or
    without ``text_model.``)."""
    targets = list(lora_targets(model))
    config = getattr(getattr(model, "unet", None), "config", None)
    try:
        theirs = diffusers_names(targets, config)
    except ConfigError:  # a U-Net with no diffusers layout: its LDM names only
        theirs = diffusers_names([k for k in targets if not k.startswith("unet.")], None)
    index: dict[str, str] = {}
    for key in targets:
        component, path = key.split(".", 1)
        names = [key]  # ours: "unet.input_blocks..." (diffusers-style reads of LDM names)
        if key in theirs:
            names.append(theirs[key])
        for prefix in KOHYA_PREFIXES[component]:
            names.append(prefix + path.replace(".", "_"))  # LDM path / flat CLIP path
            if key in theirs:
                names.append(prefix + theirs[key].split(".", 1)[1].replace(".", "_"))
        for name in names:
            index.setdefault(name, key)
    return index
