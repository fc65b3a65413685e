"""Original Stable Diffusion 1.x / 2.x single files (CompVis / AUTOMATIC1111 layout).

One ``.safetensors`` or ``.ckpt`` holds the whole ``ldm.models.diffusion.ddpm.LatentDiffusion``
state dict (CompVis ``stablediffusion`` repository, ``configs/stable-diffusion/v*-inference
.yaml``):

* ``model.diffusion_model.*``: the U-Net. Our :class:`~noisecraft.models.unet.UNet` uses
  these names without the prefix.
* ``first_stage_model.*``: the KL autoencoder; our :class:`~noisecraft.models.vae.AutoencoderKL`
  uses these names without the prefix.
* ``cond_stage_model.transformer.[text_model.]*``: SD 1.x's CLIP ViT-L/14 text tower in
  transformers' names (ours without ``text_model.``), or
  ``cond_stage_model.model.*``: SD 2.x's OpenCLIP ViT-H/14 text tower (``token_embedding``,
  ``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn.in_proj_{weight,bias}
  (q, k, v stacked), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``,
  ``text_projection``, ``logit_scale``), renamed and split by :func:`split_ldm_state_dict`
  (the names diffusers' ``convert_open_clip_checkpoint`` produces).
* ``model_ema.<U-Net name without dots>`` (+ ``model_ema.decay`` / ``num_updates``): LDM's
  ``LitEma`` copy of the U-Net in training checkpoints; sampling uses it when present, as
  CompVis' scripts do (``ema=False`` takes the raw weights).
* anything else (the schedule buffers ``betas``, ``alphas_cumprod``, ...; ``position_ids``;
  OpenCLIP's unused ``text_projection`` / ``logit_scale``): kept verbatim and written back,
  so a file -> :class:`LatentDiffusion` -> file round trip is bit-exact.

Sizes are inferred from the tensor shapes (:func:`detect_architecture`), so a tiny test file
loads with the same code as a real one. What shapes cannot tell follows SD's conventions:

* U-Net heads: SD 1.x 8 heads per attention layer; SD 2.x 64 channels per head.
* Text encoder heads: ``width // 64`` (CLIP-L 12, ViT-H 16). SD 1.x: quick GELU, last layer.
  SD 2.x: GELU, and the context is the *penultimate* layer of ViT-H (CompVis'
  ``FrozenOpenCLIPEmbedder(layer="penultimate")``). We keep all 24 layers and set
  ``clip_skip=2`` (the last layer is loaded but unused), so the file round-trips bit-exactly;
  this equals diffusers, which drops layer 23 and takes the last of 23 (both apply
  ``ln_final`` afterwards). An OpenCLIP tower of exactly 23 layers and width 1024 is
  diffusers' truncated ViT-H (``convert_diffusers_to_original_stable_diffusion.py``): its last
  layer is ViT-H's penultimate one, so it gets ``clip_skip=1``.
* GroupNorm: 32 groups. VAE latent scale 0.18215. Schedule: ``scaled_linear`` 0.00085 to
  0.012 over 1000 steps (unless the file's ``betas`` say otherwise).
* Family: SD 2.x when the text encoder is OpenCLIP or the U-Net uses linear projections.
  Tokenizer: OpenAI CLIP's vocabulary, padded with the end token (SD 1.x) or with id 0
  (SD 2.x: diffusers' SD 2 ``tokenizer/special_tokens_map.json`` has ``pad_token: "!"``).
* Prediction: ``eps`` for SD 1.x. For SD 2.x (768-v is ``v``, 512-base ``eps``, with no flag
  in the file) the U-Net is probed once (:func:`probe_prediction`), as AUTOMATIC1111's
  ``is_using_v_parameterization_for_sd2`` does, with its own rule (see there).

Files written by :func:`save_single_file` also carry the exact configs, schedule, prediction
and tokenizer in the safetensors metadata key ``noisecraft_single_file``, so a model that
does not follow these conventions (a mini SD trained here) comes back unchanged; other tools
ignore that key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError, unknown_name
from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.build import build_module
from noisecraft.io.checkpoint import CheckpointInfo
from noisecraft.io.native import LATENT_KIND
from noisecraft.io.safe_read import read_checkpoint
from noisecraft.io.tokenizer_spec import tokenizer_from_spec, tokenizer_spec
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig, from_diffusers_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
META_KEY = "noisecraft_single_file"
META_FORMAT = 1

#: Text encoder layouts: ``clip`` = ``cond_stage_model.transformer.text_model.*``,
#: ``clip_flat`` = ``cond_stage_model.transformer.*`` (transformers < 4.x), ``open_clip`` =
#: ``cond_stage_model.model.*``.
TEXT_LAYOUTS = ("clip", "clip_flat", "open_clip")

SD_GROUPS = 32
SD_SCALING = 0.18215
SD1_UNET_HEADS = 8
SD2_HEAD_CHANNELS = 64
CLIP_HEAD_CHANNELS = 64
PROBE_THRESHOLD = 0.5

#: Architecture families a single file can hold (``detect_architecture``).
FAMILIES = ("sd1", "sd2")


# ============================================================================ splitting


@dataclass(frozen=True)
class LDMParts:
    """A single file's tensors split into our parts (see :func:`split_ldm_state_dict`).

    ``unet`` / ``vae`` / ``text_encoder``: native names (empty when the file has none).
    ``ema``: EMA copies of U-Net tensors, by U-Net name; ``ema_unmatched``: ``model_ema.*``
    weights that match no U-Net tensor. ``extras``: every other tensor, by its file key.
    ``text_layout``: one of :data:`TEXT_LAYOUTS`, or None without a text encoder.
    """

    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text_encoder: dict[str, Tensor]
    ema: dict[str, Tensor]
    ema_unmatched: tuple[str, ...]
    extras: dict[str, Tensor]
    text_layout: str | None


_VAE_ATTN = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def ema_key(unet_key: str) -> str:
    """LDM ``LitEma`` name of a U-Net tensor: ``model_ema.`` + ``diffusion_model.<name>``
    with the dots removed (``LitEma`` registers ``name.replace('.', '')`` as buffers)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


_OPENCLIP_LEAVES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
#: OpenCLIP tensors SD does not use: kept as extras.
_OPENCLIP_UNUSED = ("text_projection", "logit_scale")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def _openclip_to_native(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """OpenCLIP text tower (prefix stripped) -> our names; returns (native, unused)."""
    out: dict[str, Tensor] = {}
    unused: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _OPENCLIP_UNUSED:
            unused[key] = value
        elif key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif m := _IN_PROJ.fullmatch(key):
            layer, kind = m.groups()
            # nn.MultiheadAttention stacks q, k, v along dim 0: rows [0:w], [w:2w], [2w:3w].
            # Row slices of a contiguous tensor: views, no copy, no overlap.
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
        elif (m := _RESBLOCK.fullmatch(key)) and m.group(2) in _OPENCLIP_LEAVES:
            layer, leaf, kind = m.groups()
            out[f"encoder.layers.{layer}.{_OPENCLIP_LEAVES[leaf]}.{kind}"] = value
        else:
            out["?openclip." + key] = value  # reported as an unexpected key when building
    return out, unused


def _native_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`_openclip_to_native` (q, k, v stacked back into ``in_proj``)."""
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    leaves = {v: k for k, v in _OPENCLIP_LEAVES.items()}
    out: dict[str, Tensor] = {}
    layer_re = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = layer_re.fullmatch(key)
        if m is None:
            raise ConfigError(f"text encoder tensor {key} has no OpenCLIP name")
        layer, leaf, kind = m.groups()
        if leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if leaf.endswith("q_proj"):
                parts = [sd[f"encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
                out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        out[f"transformer.resblocks.{layer}.{leaves[leaf]}.{kind}"] = value
    return out


def split_ldm_state_dict(sd: Mapping[str, Tensor]) -> LDMParts:
    """Split a CompVis / A1111 state dict into native per-part state dicts (no copies).

    * ``model.diffusion_model.*`` -> ``unet`` (names unchanged);
      ``model_ema.<flattened name>`` -> ``ema`` under the U-Net name it copies.
    * ``first_stage_model.*`` -> ``vae`` (LDM names are ours); ``first_stage_model.loss.*``
      (LDM training losses) -> extras.
    * ``cond_stage_model.transformer.[text_model.]*`` -> ``text_encoder`` (transformers
      names = ours); ``position_ids`` -> extras.
    * ``cond_stage_model.model.*`` (OpenCLIP) -> ``text_encoder``: ``in_proj_{weight,bias}``
      split into ``q/k/v_proj`` (diffusers' ``convert_open_clip_checkpoint``),
      ``text_projection`` / ``logit_scale`` -> extras.
    * everything else -> extras.
    """
    unet: dict[str, Tensor] = {}
    vae: dict[str, Tensor] = {}
    clip: dict[str, Tensor] = {}
    openclip: dict[str, Tensor] = {}
    ema_raw: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    flat = False
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX) and not key.startswith(VAE_PREFIX + "loss."):
            name = key[len(VAE_PREFIX) :]
            if _VAE_ATTN.search(name) and value.ndim == 2:  # Linear-shaped (some converters)
                value = value[:, :, None, None]
            vae[name] = value
        elif key.startswith(CLIP_PREFIX) and not key.endswith("position_ids"):
            rest = key[len(CLIP_PREFIX) :]
            if rest.startswith("text_model."):
                rest = rest[len("text_model.") :]
            else:
                flat = True
            clip[rest] = value
        elif key.startswith(OPENCLIP_PREFIX):
            openclip[key[len(OPENCLIP_PREFIX) :]] = value
        elif key.startswith(EMA_PREFIX) and key not in EMA_COUNTERS:
            ema_raw[key] = value
        else:
            extras[key] = value

    if clip and openclip:
        raise CheckpointError(
            "the checkpoint holds two text encoders (cond_stage_model.transformer.* and "
            "cond_stage_model.model.*); it is not an SD 1.x / 2.x file"
        )
    layout: str | None = None
    text = clip
    if clip:
        layout = "clip_flat" if flat else "clip"
    elif openclip:
        layout = "open_clip"
        text, unused = _openclip_to_native(openclip)
        extras.update({OPENCLIP_PREFIX + k: v for k, v in unused.items()})

    ema: dict[str, Tensor] = {}
    for name in unet:
        k = ema_key(name)
        if k in ema_raw:
            ema[name] = ema_raw.pop(k)
    return LDMParts(
        unet=unet,
        vae=vae,
        text_encoder=text,
        ema=ema,
        ema_unmatched=tuple(sorted(ema_raw)),
        extras=extras,
        text_layout=layout,
    )


# ============================================================================ detection


@dataclass(frozen=True)
class Detected:
    """What :func:`detect_architecture` found: the family and every part's config.

    ``family`` "sd1" or "sd2"; ``vae`` None when the file has no VAE; ``text_layout`` one of
    :data:`TEXT_LAYOUTS`; ``ema`` whether the file holds a full EMA copy of the U-Net.
    """

    family: str
    unet: UNetConfig
    vae: VAEConfig | None
    text_encoder: TextEncoderConfig
    text_layout: str
    ema: bool = False

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting U-Net (latents, mask, masked-image latents)."""
        z = self.vae.z_channels if self.vae else self.unet.out_channels
        return self.unet.in_channels == 2 * z + 1

    @property
    def description(self) -> str:
        """One readable line, e.g. ``SD 2.x (OpenCLIP text encoder ..., U-Net ...)``."""
        u, t = self.unet, self.text_encoder
        name = {"sd1": "SD 1.x", "sd2": "SD 2.x"}[self.family]
        kind = " inpainting" if self.inpainting else ""
        heads = (
            f"{u.head_channels}-channel heads" if u.head_channels != -1 else f"{u.num_heads} heads"
        )
        enc = "OpenCLIP" if self.text_layout == "open_clip" else "CLIP"
        layer = "last layer" if t.clip_skip == 1 else "penultimate layer"
        vae = (
            f"VAE {self.vae.base_channels} x {list(self.vae.channel_mult)}, "
            f"{self.vae.z_channels} latent channels"
            if self.vae
            else "no VAE"
        )
        return (
            f"{name}{kind}: U-Net {u.model_channels} x {list(u.channel_mult)}, "
            f"{u.num_res_blocks} res blocks, attention at levels {list(u.attention_levels)}, "
            f"{heads}, depth {u.transformer_depth}, context {u.context_dim}"
            f"{', linear projections' if u.use_linear_projection else ''}; "
            f"{enc} text encoder {t.width} wide, {t.layers} layers, {layer}; {vae}"
            f"{'; EMA weights present' if self.ema else ''}"
        )


def _has(sd: Mapping[str, Any], *needles: str) -> bool:
    return any(n in k for k in sd for n in needles)


def _starts(sd: Mapping[str, Any], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in sd)


def _examples(sd: Mapping[str, Any], n: int = 3) -> str:
    keys = sorted(sd)[:n]
    return ", ".join(keys) + (", ..." if len(sd) > n else "")


def _refuse_other_kinds(sd: Mapping[str, Tensor], source: str) -> None:
    """One-line errors for files that are not SD 1.x / 2.x models."""
    if _starts(sd, "lora_unet_", "lora_te", "lora_") or _has(
        sd, ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1"
    ):
        raise CheckpointError(f"{source} is a LoRA, not a model; pass it with --lora")
    if "emb_params" in sd or _starts(sd, "string_to_param."):
        raise CheckpointError(
            f"{source} is a textual-inversion embedding, not a model; pass it as an embedding"
        )
    label = sd.get(UNET_PREFIX + "label_emb.0.0.weight")
    if _starts(sd, "conditioner.embedders.") or (
        label is not None and label.ndim == 2 and label.shape[1] in (2816, 2560)
    ):
        raise CheckpointError(
            f"{source} looks like an SDXL checkpoint; SDXL is not supported yet "
            "(use an SD 1.x or 2.x model)"
        )
    if _has(sd, "joint_blocks."):
        raise CheckpointError(
            f"{source} looks like a Stable Diffusion 3 checkpoint (joint_blocks); SD3 is not "
            "supported (use an SD 1.x or 2.x model)"
        )
    if _has(sd, "double_blocks.", "single_blocks."):
        raise CheckpointError(
            f"{source} looks like a Flux checkpoint (double_blocks); Flux is not supported "
            "(use an SD 1.x or 2.x model)"
        )
    if _starts(sd, "control_model.") or _has(sd, "input_hint_block.", "controlnet_cond_embedding."):
        raise CheckpointError(f"{source} is a ControlNet, not a model; load it as a ControlNet")
    if _starts(sd, UNET_PREFIX):
        return
    if _is_vae(sd):
        raise CheckpointError(f"{source} is a VAE, not a whole model; pass it with --vae")
    if _starts(sd, "cond_stage_model.", "text_model.", "encoder.layers.", "transformer.resblocks."):
        raise CheckpointError(
            f"{source} is a text encoder only, not a whole model; expected the U-Net "
            "(model.diffusion_model.*), VAE (first_stage_model.*) and text encoder in one file"
        )
    if "conv_in.weight" in sd and _starts(sd, "down_blocks."):
        raise CheckpointError(
            f"{source} is a diffusers U-Net file (diffusion_pytorch_model), not a single file; "
            "load the whole diffusers folder instead"
        )
    raise CheckpointError(
        f"{source} does not look like a Stable Diffusion checkpoint: found keys like "
        f"{_examples(sd)}; expected model.diffusion_model.*, first_stage_model.* and "
        "cond_stage_model.*"
    )


def _is_vae(sd: Mapping[str, Any]) -> bool:
    keys = [k for k in sd if not k.startswith(("loss.", "model_ema."))]
    stripped = {_strip_vae_prefix(k) for k in keys}
    return (
        bool(stripped)
        and all(
            k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
            for k in stripped
        )
        and any(k.startswith("decoder.") for k in stripped)
    )


def _strip_vae_prefix(key: str) -> str:
    for prefix in (VAE_PREFIX, "vae."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


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
    sd: Mapping[str, Tensor], family: str, source: str = "checkpoint"
) -> UNetConfig:
    """The U-Net's config from the shapes of its (prefix-stripped) LDM tensors.

    Levels are delimited by the ``input_blocks.N.0.op`` downsampling convs; each level's
    channels come from its ResBlocks' output convs, attention levels from the
    SpatialTransformers found there (``input_blocks.N.1``), the depth from their
    ``transformer_blocks``, the context width from ``attn2.to_k``. Heads follow the family's
    convention (module docstring).
    """

    def shape(key: str) -> torch.Size:
        return _shape(sd, key, "U-Net", source)

    conv_in = shape("input_blocks.0.0.weight")
    model_channels, in_channels = int(conv_in[0]), int(conv_in[1])
    out_channels = int(shape("out.2.weight")[0])
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
    if "label_emb.weight" in sd or _starts(sd, "label_emb."):
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


def detect_architecture(
    sd: Mapping[str, Tensor],
    source: str = "checkpoint",
    metadata: Mapping[str, str] | None = None,
    family: str | None = None,
) -> Detected:
    """Recognise an SD 1.x / 2.x single file (or inpainting variant) and infer every config.

    Other kinds raise a one-line :class:`CheckpointError` that says what the file is and
    what to do: SDXL (``conditioner.embedders.*``, a 2816-wide ``label_emb``), SD3
    (``joint_blocks``), Flux (``double_blocks``), LoRA (``lora_unet_*``, ``*.lora_down.*``),
    ControlNet, a VAE alone, a text encoder alone, and unknown layouts. ``source`` names the
    file in messages. With the file's ``metadata`` holding our ``noisecraft_single_file``
    key, the configs written there are used instead of the inferred ones. ``family``
    ("sd1" / "sd2") overrides the detected family, i.e. the conventions shapes cannot show:
    attention heads (8 per layer vs 64 channels each) and the text encoder's activation.
    """
    if family not in (None, *FAMILIES):
        raise unknown_name("architecture", str(family), FAMILIES)
    _refuse_other_kinds(sd, source)
    parts = split_ldm_state_dict(sd)
    if parts.text_layout is None:
        raise CheckpointError(
            f"{source} has a U-Net but no text encoder (cond_stage_model.*); a text-to-image "
            "single file needs all three parts"
        )
    proj = parts.unet.get("middle_block.1.proj_in.weight")
    linear = proj is not None and proj.ndim == 2
    if family is None:
        family = "sd2" if parts.text_layout == "open_clip" or linear else "sd1"
    meta = _parse_meta(metadata or {}, source)
    try:
        if meta is not None:
            configs = _configs_from_meta(meta, source)
            unet, text = configs["unet"], configs["text_encoder"]
            vae = configs["vae"] if parts.vae else None
        else:
            unet = infer_unet_config(parts.unet, family, source)
            vae = infer_vae_config(parts.vae, source) if parts.vae else None
            text = infer_text_config(parts.text_encoder, family, parts.text_layout, source)
    except ConfigError as e:
        raise CheckpointError(f"{source}: inferred an invalid config ({e})") from None
    z = vae.z_channels if vae else unet.out_channels
    if unet.in_channels not in (z, 2 * z + 1) or unet.out_channels != z:
        raise CheckpointError(
            f"{source}: a U-Net with {unet.in_channels} input channels is not supported "
            f"(text-to-image has {z}, inpainting {2 * z + 1}; e.g. instruct-pix2pix has "
            f"{2 * z})"
        )
    if unet.context_dim != text.width:
        raise CheckpointError(
            f"{source}: the U-Net's context width {unet.context_dim} differs from the text "
            f"encoder's width {text.width}; the file mixes parts of different models"
        )
    ema = bool(parts.ema) and len(parts.ema) == len(parts.unet)
    return Detected(family, unet, vae, text, parts.text_layout, ema)


# ============================================================================ prediction


@torch.no_grad()
def probe_prediction(unet: UNet, context: Tensor, *, num_steps: int = 1000) -> tuple[str, float]:
    """Tell an ``eps`` from a ``v`` U-Net by one call at the last timestep; (prediction, slope).

    At ``t = T - 1`` the signal is a tiny part of ``x_t = a x0 + b eps`` (SD: ``a^2 =
    abar = 0.0047``). The best eps-prediction is then ~``x_t`` itself, while the best
    v-prediction ``a eps - b x0`` is nearly uncorrelated with ``x_t``: for any data, the
    least-squares slope of ``E[v | x_t]`` on ``x_t`` equals that of ``v``,
    ``a b (1 - s^2) / (a^2 s^2 + b^2)`` (``s^2`` the data variance), about ``0.07 (1 - s^2)``,
    against ``b / (a^2 s^2 + b^2)`` ~ 1 for eps. So the slope ``<out, x> / <x, x>`` on a
    fixed N(0, I) input is compared with 0.5. (AUTOMATIC1111 runs SD 2.x's U-Net on a
    constant 0.5 input and calls it v when ``mean(out - x) < -1``, a threshold found
    empirically on the released models; this rule is derived, so it also holds for small
    models trained here.) Inpainting U-Nets get a full mask and empty masked-image latents.
    """
    c = unet.config
    size = max(8, 2 ** len(c.channel_mult))  # the deepest level 2x2 (SD: 16x16 latents)
    param = next(unet.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, c.out_channels, size, size), generator=g)
    inputs = x
    if c.in_channels == 2 * c.out_channels + 1:
        mask = torch.ones((1, 1, size, size))
        inputs = torch.cat([x, mask, torch.zeros_like(x)], dim=1)
    t = torch.tensor([float(num_steps - 1)], device=param.device)
    out = unet(inputs.to(param), t, context=context[:1].to(param)).float().cpu()
    slope = float((out * x).sum() / (x * x).sum())
    return ("eps" if slope > PROBE_THRESHOLD else "v"), slope


# ============================================================================ loading


@dataclass(frozen=True)
class SingleFileInfo(CheckpointInfo):
    """:class:`CheckpointInfo` of a model read from a single file, with what saving needs.

    ``extras``: the file's tensors that are no part of the model (written back verbatim);
    ``text_layout``: how the text encoder was stored; ``dtypes``: each part's stored float
    dtype (``save_single_file(dtype=None)`` writes them back in it); ``description``: what
    was loaded and why (family, prediction and its source, EMA).
    """

    source: str = ""
    description: str = ""
    text_layout: str = "clip"
    dtypes: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)


_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def _stored_dtype(tensors: Mapping[str, Tensor]) -> str:
    counts = Counter(
        str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()
    )
    return counts.most_common(1)[0][0] if counts else "float32"


def _parse_meta(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    raw = metadata.get(META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: corrupt {META_KEY} metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise CheckpointError(
            f"{source}: {META_KEY} metadata of an unknown format; upgrade noisecraft"
        )
    return meta


def _hinted_prediction(
    metadata: Mapping[str, str], sd: Mapping[str, Tensor]
) -> tuple[str, str] | None:
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("epsilon", "eps"):
        return "eps", "modelspec.prediction_type metadata"
    if spec in ("v", "v_prediction"):
        return "v", "modelspec.prediction_type metadata"
    if "v_pred" in sd:
        return "v", "the file's v_pred marker"
    return None


def _schedule_from_betas(extras: Mapping[str, Tensor]) -> NoiseSchedule:
    """SD's scaled_linear schedule, unless the file's ``betas`` buffer differs from it."""
    sd_schedule = NoiseSchedule.scaled_linear()
    betas = extras.get("betas")
    if betas is None or betas.ndim != 1:
        return sd_schedule
    b = betas.to(torch.float64)
    if b.numel() == sd_schedule.num_steps and torch.allclose(
        b, sd_schedule.betas, rtol=1e-5, atol=0
    ):
        return sd_schedule
    return NoiseSchedule(b)


def load_vae_file(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
) -> AutoencoderKL:
    """A VAE from its own file (``--vae``), ``.safetensors`` or ``.ckpt``.

    Accepts LDM names (bare, as AUTOMATIC1111's VAE files, or under ``first_stage_model.`` /
    ``vae.``; a whole SD single file gives its VAE), diffusers ``AutoencoderKL`` names (also
    the old ``query`` / ``key`` / ``value`` / ``proj_attn``), and noisecraft's native ``vae``
    and ``latent_diffusion`` files (whose config is used as stored). LDM ``loss.*`` and
    ``model_ema.*`` entries are ignored. The config of foreign files is inferred from the
    shapes with SD's conventions; ``scaling_factor`` / ``shift_factor`` set the latent scale
    (pass the model's own when the VAE replaces another; default SD's 0.18215, no shift).
    """
    from noisecraft.io.checkpoint import METADATA_KEY

    tensors, metadata = read_checkpoint(path)
    native = None
    if METADATA_KEY in metadata:
        try:
            native = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            native = None
    config: VAEConfig | None = None
    if isinstance(native, dict) and native.get("kind") in ("vae", LATENT_KIND):
        try:
            if native["kind"] == "vae":
                config = VAEConfig.from_dict(native["config"])
            else:
                config = VAEConfig.from_dict(native["config"]["vae"])
                tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}
        except (KeyError, TypeError, NoisecraftError) as e:
            raise CheckpointError(f"{path}: corrupt noisecraft metadata ({e})") from None
    elif _starts(tensors, VAE_PREFIX):
        tensors = {k[len(VAE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    sd: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name = _strip_vae_prefix(key)
        if name.startswith("loss.") or key.startswith(EMA_PREFIX):
            continue
        if _VAE_ATTN.search("." + name) and value.ndim == 2:
            value = value[:, :, None, None]
        sd[name] = value
    if not _is_vae(sd):
        raise CheckpointError(
            f"{path} is not a VAE: found keys like {_examples(sd)}; expected encoder.*, "
            "decoder.*, quant_conv.*, post_quant_conv.*"
        )
    if _starts(sd, "encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block."):
        try:
            sd = from_diffusers_state_dict(sd)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if config is None:
        config = infer_vae_config(sd, str(path))
    if scaling_factor is not None:
        config = dataclasses.replace(config, scaling_factor=scaling_factor)
    if shift_factor is not None:
        config = dataclasses.replace(config, shift_factor=shift_factor)
    final = config
    try:
        return build_module(
            lambda: AutoencoderKL(final), sd, what="VAE", source=path, dtype=dtype, device=device
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot build the VAE ({e})") from None


def _configs_from_meta(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    try:
        return {
            "unet": UNetConfig.from_dict(meta["unet"]),
            "vae": VAEConfig.from_dict(meta["vae"]) if meta.get("vae") else None,
            "text_encoder": TextEncoderConfig.from_dict(meta["text_encoder"]),
        }
    except (KeyError, TypeError, NoisecraftError) as e:
        raise CheckpointError(f"{source}: corrupt {META_KEY} metadata ({e})") from None


def load_single_file(
    path: str | os.PathLike,
    *,
    prediction: str | None = None,
    ema: bool | None = None,
    vae: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    family: str | None = None,
) -> LatentDiffusion:
    """Read an SD 1.x / 2.x single file (``.safetensors`` or ``.ckpt``) as a LatentDiffusion.

    * ``prediction``: "eps" or "v" overrides; else the file's own note (our metadata, a
      ``modelspec.prediction_type`` or ``v_pred`` key), else eps for SD 1.x and
      :func:`probe_prediction` for SD 2.x.
    * ``ema``: None uses the U-Net's EMA copy when the file has one (CompVis sampling),
      True requires it, False takes the raw weights.
    * ``vae``: the path of a VAE file replacing the checkpoint's (LDM or diffusers names).
    * ``dtype``: weights are widened to float32 by default (fp16 files compute in fp32 on
      CPU); None keeps the stored dtype.
    * ``family``: "sd1" / "sd2" overrides the detected architecture family
      (:func:`detect_architecture`).

    What was loaded and why is in ``model.info.description`` (a :class:`SingleFileInfo`).
    """
    path = Path(path)
    source = str(path)
    if prediction is not None and prediction not in ("eps", "v"):
        raise ConfigError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    tensors, metadata = read_checkpoint(path)
    detected = detect_architecture(tensors, source, metadata, family)
    parts = split_ldm_state_dict(tensors)
    meta = _parse_meta(metadata, source)

    # --- EMA
    unet_sd = parts.unet
    used_ema = False
    has_any_ema = bool(parts.ema) or bool(parts.ema_unmatched)
    if ema is True and not has_any_ema:
        raise CheckpointError(
            f"{source} has no EMA weights (model_ema.*); load it without ema=True"
        )
    if ema is not False and has_any_ema:
        missing = [k for k in parts.unet if k not in parts.ema]
        if missing or parts.ema_unmatched:
            what = (
                f"no EMA copy of {missing[0]} ({ema_key(missing[0])})"
                if missing
                else f"an EMA tensor {parts.ema_unmatched[0]} that matches no U-Net tensor"
            )
            raise CheckpointError(
                f"{source} has incomplete EMA weights: {what}; load it with ema=False to use "
                "the raw weights"
            )
        unet_sd, used_ema = parts.ema, True

    # --- modules
    def build(factory: Any, sd: Mapping[str, Tensor], what: str) -> Any:
        try:
            return build_module(factory, sd, what=what, source=source, dtype=dtype, device=device)
        except ConfigError as e:
            raise CheckpointError(f"{source}: cannot build the {what} ({e})") from None

    unet = build(lambda: UNet(detected.unet), unet_sd, "U-Net")
    text_encoder = build(
        lambda: CLIPTextEncoder(detected.text_encoder), parts.text_encoder, "text encoder"
    )
    if vae is not None:
        own = detected.vae or VAEConfig.sd()  # the model's latent scale, not the VAE file's
        vae_module = load_vae_file(
            vae,
            device=device,
            dtype=dtype,
            scaling_factor=own.scaling_factor,
            shift_factor=own.shift_factor,
        )
    elif detected.vae is not None:
        vae_module = build(lambda: AutoencoderKL(detected.vae), parts.vae, "VAE")
    else:
        raise CheckpointError(
            f"{source} has no VAE (first_stage_model.*); pass a VAE file with --vae"
        )

    # --- tokenizer, schedule, prediction
    if meta is not None and "tokenizer" in meta:
        tokenizer = tokenizer_from_spec(meta["tokenizer"])
    else:
        from noisecraft.models.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer.default(pad_token_id=0 if detected.family == "sd2" else None)
    if tokenizer.vocab_size != text_encoder.config.vocab_size:
        raise CheckpointError(
            f"{source}: the text encoder has {text_encoder.config.vocab_size} tokens but the "
            f"CLIP tokenizer {tokenizer.vocab_size}; not an SD text encoder"
        )
    diff = (meta or {}).get("diffusion", {})
    schedule = (
        NoiseSchedule.from_config(diff["schedule"])
        if "schedule" in diff
        else _schedule_from_betas(parts.extras)
    )
    try:
        model = LatentDiffusion(
            unet=unet,
            vae=vae_module,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            schedule=schedule,
            prediction=prediction or diff.get("prediction", "eps"),
            image_size=int(diff.get("image_size", 512)),
            clip_skip=diff.get("clip_skip"),
            sample_posterior=bool(diff.get("sample_posterior", True)),
            prompt_weighting=bool(diff.get("prompt_weighting", True)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: the parts do not fit together ({e})") from None

    hint = _hinted_prediction(metadata, tensors)
    if prediction is not None:
        why = "given"
    elif "prediction" in diff:
        why = f"{META_KEY} metadata"
    elif hint is not None:
        model = model.replace(prediction=hint[0])
        why = hint[1]
    elif detected.family == "sd1":
        why = "SD 1.x default"
    else:
        context = model.encode_prompt([""])
        found, slope = probe_prediction(unet, context, num_steps=schedule.num_steps)
        model = model.replace(prediction=found)
        why = f"U-Net probe at t={schedule.num_steps - 1}: slope {slope:.2f}"
    if "image_size" not in diff and detected.family == "sd2" and model.prediction == "v":
        model = model.replace(image_size=768)

    description = (
        f"{path.name}: {detected.description}; prediction {model.prediction} ({why})"
        + ("; EMA U-Net weights" if used_ema else "")
        + (f"; VAE from {Path(vae).name}" if vae is not None else "")
    )
    extras = dict(parts.extras)
    info = SingleFileInfo(
        kind=LATENT_KIND,
        config={
            "unet": unet.config.to_dict(),
            "vae": vae_module.config.to_dict(),
            "text_encoder": text_encoder.config.to_dict(),
            "tokenizer": tokenizer_spec(tokenizer),
        },
        diffusion={"schedule": schedule.to_config(), "prediction": model.prediction},
        produced_by=f"single file {path.name}",
        source=source,
        description=description,
        text_layout=parts.text_layout or "clip",
        dtypes={
            "unet": _stored_dtype(unet_sd),
            "vae": _stored_dtype(parts.vae) if vae is None else "float32",
            "text_encoder": _stored_dtype(parts.text_encoder),
        },
        extras=extras,
    )
    return model.replace(info=info)


# ============================================================================ saving


def openclip_layout_fits(config: TextEncoderConfig) -> bool:
    """Whether reading this text encoder back from the OpenCLIP layout gives ``config``:
    GELU, and the layer :func:`infer_text_config` would pick (penultimate, or the last of
    diffusers' 23-layer ViT-H) is the one ``config`` uses."""
    if config.activation != "gelu":
        return False
    truncated_vit_h = config.width == 1024 and config.layers == 23
    return config.clip_skip == (1 if truncated_vit_h or config.layers == 1 else 2)


def ldm_state_dict(
    model: LatentDiffusion, *, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The model's tensors under CompVis / A1111 single-file names (inverse of the split).

    The text encoder goes back to the OpenCLIP layout (``cond_stage_model.model.*``) when the
    model was read from one, or when it is an SD 2.x-style encoder that the OpenCLIP reader
    would rebuild unchanged (:func:`openclip_layout_fits`); otherwise to
    ``cond_stage_model.transformer.text_model.*``. A model read by :func:`load_single_file`
    gets the file's other tensors back (:class:`SingleFileInfo` ``extras``). ``dtype``
    casts floating tensors of the model (None: each part's stored dtype for a model read
    from a single file, else as held); extras keep theirs.
    """
    info = model.info if isinstance(model.info, SingleFileInfo) else None
    te_config = model.text_encoder.config
    if info is not None and info.text_layout in TEXT_LAYOUTS:
        layout = info.text_layout
        if layout == "open_clip" and not openclip_layout_fits(te_config):
            layout = "clip"
    else:
        layout = "open_clip" if openclip_layout_fits(te_config) else "clip"

    def cast(sd: Mapping[str, Tensor], part: str) -> dict[str, Tensor]:
        target = dtype
        if target is None and info is not None and part in info.dtypes:
            target = _DTYPES.get(info.dtypes[part])
        return {
            k: (v.to(target) if target is not None and v.is_floating_point() else v).detach().cpu()
            for k, v in sd.items()
        }

    out: dict[str, Tensor] = {}
    out.update({UNET_PREFIX + k: v for k, v in cast(model.unet.state_dict(), "unet").items()})
    out.update({VAE_PREFIX + k: v for k, v in cast(model.vae.state_dict(), "vae").items()})
    te = cast(model.text_encoder.state_dict(), "text_encoder")
    if layout == "open_clip":
        out.update({OPENCLIP_PREFIX + k: v for k, v in _native_to_openclip(te).items()})
    else:
        inner = CLIP_PREFIX + ("" if layout == "clip_flat" else "text_model.")
        out.update({inner + k: v for k, v in te.items()})
    if info is not None:
        same_text = info.text_layout == layout
        for key, value in info.extras.items():
            if key in out or (key.startswith("cond_stage_model.") and not same_text):
                continue
            out[key] = value.detach().cpu()
    return {k: v.contiguous() for k, v in out.items()}


def single_file_metadata(model: LatentDiffusion) -> dict[str, str]:
    """The ``noisecraft_single_file`` metadata: exact configs, schedule, prediction, tokenizer."""
    meta = {
        "format": META_FORMAT,
        "unet": model.unet.config.to_dict(),
        "vae": model.vae.config.to_dict(),
        "text_encoder": model.text_encoder.config.to_dict(),
        "tokenizer": tokenizer_spec(model.tokenizer),
        "diffusion": {
            "schedule": model.schedule.to_config(),
            "prediction": model.prediction,
            "image_size": model.image_size,
            "clip_skip": model.clip_skip,
            "sample_posterior": model.sample_posterior,
            "prompt_weighting": model.prompt_weighting,
        },
    }
    return {META_KEY: json.dumps(meta, sort_keys=True)}


def save_single_file(
    model: LatentDiffusion,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as one CompVis / A1111-layout ``.safetensors`` file, atomically.

    Tensors: :func:`ldm_state_dict`; metadata: :func:`single_file_metadata`. A model read
    with :func:`load_single_file` and written back gives the same keys and bit-identical
    tensors (a file with EMA weights comes back as the weights that were used, as
    AUTOMATIC1111's "pruned ema-only" files). An existing file is replaced only with
    ``overwrite=True``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(
            f"{path}: single files are written as .safetensors (pickled .ckpt files can run "
            "code when loaded); use a .safetensors name"
        )
    check_writable(path, overwrite=overwrite)
    tensors = ldm_state_dict(model, dtype=dtype)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=single_file_metadata(model))
    return path


__all__ = [
    "Detected",
    "LDMParts",
    "SingleFileInfo",
    "detect_architecture",
    "ema_key",
    "infer_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "ldm_state_dict",
    "load_vae_file",
    "load_single_file",
    "openclip_layout_fits",
    "probe_prediction",
    "save_single_file",
    "single_file_metadata",
    "split_ldm_state_dict",
]
