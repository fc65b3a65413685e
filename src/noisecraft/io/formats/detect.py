"""What a single file holds: an SD 1.x / 2.x model (its family and every part's config), or
another kind of file, refused in one line that says what it is and what to do.

Other kinds are data (:data:`OTHER_MODELS`, :data:`PARTS_ALONE`): each a few key prefixes,
substrings or a test, and its message; a new kind is a new entry. Sizes come from the tensor
shapes (:mod:`.infer_config`). Family: SD 2.x when the text encoder is OpenCLIP or the U-Net
uses linear projections, else SD 1.x; the family sets what shapes cannot show (attention
heads, the text encoder's activation and layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from noisecraft.errors import CheckpointError, ConfigError, unknown_name
from noisecraft.io.formats.infer_config import (
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
)
from noisecraft.io.formats.keys.vae import is_vae_state_dict
from noisecraft.io.formats.ldm_layout import UNET_PREFIX, split_ldm_state_dict
from noisecraft.io.formats.single_file_meta import configs_from_meta, parse_meta
from noisecraft.models.text_encoder import TextEncoderConfig
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vae import VAEConfig

__all__ = [
    "FAMILIES",
    "OTHER_MODELS",
    "PARTS_ALONE",
    "Detected",
    "OtherKind",
    "detect_architecture",
    "key_examples",
    "refuse_other_kinds",
]

#: Architecture families a single file can hold (``detect_architecture``).
FAMILIES = ("sd1", "sd2")


def key_examples(sd: Mapping[str, Any], n: int = 3) -> str:
    """The first ``n`` keys (sorted), for messages."""
    keys = sorted(sd)[:n]
    return ", ".join(keys) + (", ..." if len(sd) > n else "")


# ---------------------------------------------------------------------------- other kinds


@dataclass(frozen=True)
class OtherKind:
    """A kind of file that is not an SD 1.x / 2.x model: it matches when a key starts with
    one of ``prefixes``, contains one of ``contains``, is one of ``keys``, or ``test`` says
    so; ``message`` (``{source}``: the file) says what it is and what to do, naming the
    ``settings`` it points to as ``@name``."""

    message: str
    settings: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    test: Callable[[Mapping[str, Tensor]], bool] | None = None

    def matches(self, sd: Mapping[str, Tensor]) -> bool:
        return (
            any(k in sd for k in self.keys)
            or (bool(self.prefixes) and any(k.startswith(self.prefixes) for k in sd))
            or any(n in k for k in sd for n in self.contains)
            or (self.test is not None and self.test(sd))
        )


def _sdxl_label_emb(sd: Mapping[str, Tensor]) -> bool:
    """SDXL's U-Net embeds its 2816-wide (refiner: 2560) micro-conditioning in ``label_emb``."""
    label = sd.get(UNET_PREFIX + "label_emb.0.0.weight")
    return label is not None and label.ndim == 2 and label.shape[1] in (2816, 2560)


_SD = "(use an SD 1.x or 2.x model)"

#: Files refused even when they hold U-Net-like keys, in the order they are tested.
OTHER_MODELS: tuple[OtherKind, ...] = (
    OtherKind(
        "{source} is a LoRA, not a model; pass it as @lora",
        settings=("lora",),
        prefixes=("lora_unet_", "lora_te", "lora_"),
        contains=(".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1"),
    ),
    OtherKind(
        "{source} is a textual-inversion embedding, not a model; pass it as an embedding",
        keys=("emb_params",),
        prefixes=("string_to_param.",),
    ),
    OtherKind(
        "{source} looks like an SDXL checkpoint; SDXL is not supported yet " + _SD,
        prefixes=("conditioner.embedders.",),
        test=_sdxl_label_emb,
    ),
    OtherKind(
        "{source} looks like a Stable Diffusion 3 checkpoint (joint_blocks); SD3 is not "
        "supported " + _SD,
        contains=("joint_blocks.",),
    ),
    OtherKind(
        "{source} looks like a Flux checkpoint (double_blocks); Flux is not supported " + _SD,
        contains=("double_blocks.", "single_blocks."),
    ),
    OtherKind(
        "{source} is a ControlNet, not a model; load it as a ControlNet",
        prefixes=("control_model.",),
        contains=("input_hint_block.", "controlnet_cond_embedding."),
    ),
)

#: One part of a model alone (tested when the file has no ``model.diffusion_model.*``).
PARTS_ALONE: tuple[OtherKind, ...] = (
    OtherKind(
        "{source} is a VAE, not a whole model; pass it as @vae",
        settings=("vae",),
        test=is_vae_state_dict,
    ),
    OtherKind(
        "{source} is a text encoder only, not a whole model; expected the U-Net "
        "(model.diffusion_model.*), VAE (first_stage_model.*) and text encoder in one file",
        prefixes=("cond_stage_model.", "text_model.", "encoder.layers.", "transformer.resblocks."),
    ),
    OtherKind(
        "{source} is a diffusers U-Net file (diffusion_pytorch_model), not a single file; "
        "load the whole diffusers folder instead",
        test=lambda sd: "conv_in.weight" in sd and any(k.startswith("down_blocks.") for k in sd),
    ),
)


def refuse_other_kinds(sd: Mapping[str, Tensor], source: str) -> None:
    """Raise the :class:`CheckpointError` of the first kind in :data:`OTHER_MODELS` (then,
    without a U-Net, :data:`PARTS_ALONE`) that ``sd`` matches; an unknown layout without a
    U-Net is refused too."""
    for kind in OTHER_MODELS:
        if kind.matches(sd):
            raise CheckpointError(kind.message.format(source=source), settings=kind.settings)
    if any(k.startswith(UNET_PREFIX) for k in sd):
        return
    for kind in PARTS_ALONE:
        if kind.matches(sd):
            raise CheckpointError(kind.message.format(source=source), settings=kind.settings)
    raise CheckpointError(
        f"{source} does not look like a Stable Diffusion checkpoint: found keys like "
        f"{key_examples(sd)}; expected model.diffusion_model.*, first_stage_model.* and "
        "cond_stage_model.*"
    )


# ---------------------------------------------------------------------------- SD 1.x / 2.x


@dataclass(frozen=True)
class Detected:
    """What :func:`detect_architecture` found: the family and every part's config.

    ``family`` "sd1" or "sd2"; ``vae`` None when the file has no VAE; ``text_layout`` one of
    :data:`.ldm_layout.TEXT_LAYOUTS`; ``ema`` whether the file holds a full EMA copy of the U-Net.
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
    refuse_other_kinds(sd, source)
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
    meta = parse_meta(metadata or {}, source)
    try:
        if meta is not None:
            configs = configs_from_meta(meta, source)
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
