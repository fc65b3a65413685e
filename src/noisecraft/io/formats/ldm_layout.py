"""Where a CompVis / A1111 single file keeps each part, and under which names.

One state dict holds the whole ``ldm.models.diffusion.ddpm.LatentDiffusion``; each part sits
under its prefix, named by a key-rule table (:mod:`.keys`):

=============================================  ==============  =============================
prefix                                         part            table
=============================================  ==============  =============================
``model.diffusion_model.``                     U-Net           :data:`.keys.unet.LDM`
``first_stage_model.``                         VAE             :data:`.keys.vae.LDM`
``cond_stage_model.transformer.``              CLIP text enc.  :mod:`.keys.clip` (``clip``,
                                                               ``clip_flat``)
``cond_stage_model.model.``                    OpenCLIP        :data:`.keys.openclip.OPENCLIP`
``model_ema.``                                 EMA U-Net       :func:`ema_table`
=============================================  ==============  =============================

``model_ema.<U-Net name without dots>`` (+ ``model_ema.decay`` / ``num_updates``) is LDM's
``LitEma`` copy of the U-Net in training checkpoints. Every other tensor (the schedule
buffers ``betas``, ``alphas_cumprod``, ...; what a table ignores: ``position_ids``, LDM's
``loss.*``, OpenCLIP's ``text_projection``) is an *extra*: kept verbatim by the reader and
written back, so a file -> model -> file round trip is bit-exact. :func:`split_ldm_state_dict`
reads a file's tensors into parts, :func:`join_ldm_parts` writes parts back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.formats.keys import clip, openclip, unet, vae
from noisecraft.key_rules import Table, ignore, rule, to_ours, to_theirs

__all__ = [
    "LDMParts",
    "TEXT_LAYOUTS",
    "TEXT_TABLES",
    "ema_key",
    "ema_table",
    "join_ldm_parts",
    "split_ldm_state_dict",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")

#: Text encoder layouts: ``clip`` = ``cond_stage_model.transformer.text_model.*``,
#: ``clip_flat`` = ``cond_stage_model.transformer.*`` (transformers < 4.x), ``open_clip`` =
#: ``cond_stage_model.model.*``.
TEXT_LAYOUTS = ("clip", "clip_flat", "open_clip")
#: Each text layout's prefix and key table.
TEXT_TABLES: dict[str, tuple[str, Table]] = {
    "clip": (CLIP_PREFIX, clip.TRANSFORMERS),
    "clip_flat": (CLIP_PREFIX, clip.TRANSFORMERS_FLAT),
    "open_clip": (OPENCLIP_PREFIX, openclip.OPENCLIP),
}
_TEXT_NAMES = {"clip": "CLIP", "clip_flat": "CLIP", "open_clip": "OpenCLIP"}
#: Prefix -> part, in the order a key is tried.
_PARTS = (
    (UNET_PREFIX, "unet"),
    (VAE_PREFIX, "vae"),
    (CLIP_PREFIX, "clip"),
    (OPENCLIP_PREFIX, "open_clip"),
    (EMA_PREFIX, "ema"),
)


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


def ema_key(unet_key: str) -> str:
    """LDM ``LitEma`` name of a U-Net tensor: ``model_ema.`` + ``diffusion_model.<name>``
    with the dots removed (``LitEma`` registers ``name.replace('.', '')`` as buffers)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def ema_table(unet_keys: Iterable[str]) -> Table:
    """U-Net names <-> their ``LitEma`` names (``model_ema.`` stripped), for these keys; the
    counters ``decay`` / ``num_updates`` are ignored."""
    n = len(EMA_PREFIX)
    return Table(
        (ignore(c[n:]) for c in EMA_COUNTERS), (rule(k, ema_key(k)[n:]) for k in unet_keys)
    )


def _read(
    table: Table, tensors: Mapping[str, Tensor], prefix: str, extras: dict[str, Tensor]
) -> dict[str, Tensor]:
    """One part under our names; ignored tensors go to ``extras`` (file keys); unmapped ones
    stay in the part under their file keys, for the strict load to refuse by name."""
    mapped = to_ours(table, tensors)
    extras.update({prefix + k: tensors[k] for k in mapped.ignored})
    return mapped.tensors | {prefix + k: tensors[k] for k in mapped.unmapped}


def split_ldm_state_dict(sd: Mapping[str, Tensor]) -> LDMParts:
    """Split a CompVis / A1111 state dict into native per-part state dicts (no copies).

    Each part is read with its table (module docstring): ``model.diffusion_model.*`` ->
    ``unet``, ``first_stage_model.*`` -> ``vae``, ``cond_stage_model.transformer.*`` or
    ``cond_stage_model.model.*`` (OpenCLIP: ``in_proj`` split into ``q/k/v_proj``) ->
    ``text_encoder``, ``model_ema.*`` -> ``ema``; what the tables ignore, and every key
    outside these prefixes, -> ``extras``.
    """
    groups: dict[str, dict[str, Tensor]] = {part: {} for _, part in _PARTS}
    extras: dict[str, Tensor] = {}
    for key, value in sd.items():
        for prefix, part in _PARTS:
            if key.startswith(prefix):
                groups[part][key[len(prefix) :]] = value
                break
        else:
            extras[key] = value

    unet_sd = _read(unet.LDM, groups["unet"], UNET_PREFIX, extras)
    vae_sd = _read(vae.LDM, groups["vae"], VAE_PREFIX, extras)
    texts = {
        layout: _read(TEXT_TABLES[layout][1], groups[part], TEXT_TABLES[layout][0], extras)
        for part, layout in (("clip", clip.layout_of(groups["clip"])), ("open_clip", "open_clip"))
    }
    found = [layout for layout, tensors in texts.items() if tensors]
    if len(found) > 1:
        raise CheckpointError(
            "the checkpoint holds two text encoders (cond_stage_model.transformer.* and "
            "cond_stage_model.model.*); it is not an SD 1.x / 2.x file"
        )
    layout = found[0] if found else None

    ema = to_ours(ema_table(unet_sd), groups["ema"])
    extras.update({EMA_PREFIX + k: groups["ema"][k] for k in ema.ignored})
    order = {key: i for i, key in enumerate(sd)}
    return LDMParts(
        unet=unet_sd,
        vae=vae_sd,
        text_encoder=texts[layout] if layout else {},
        ema=ema.tensors,
        ema_unmatched=tuple(sorted(EMA_PREFIX + k for k in ema.unmapped)),
        extras=dict(sorted(extras.items(), key=lambda item: order[item[0]])),
        text_layout=layout,
    )


def join_ldm_parts(
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_encoder: Mapping[str, Tensor],
    text_layout: str,
) -> dict[str, Tensor]:
    """Our parts' tensors under single-file names (the inverse of the split, extras aside).
    A tensor that has no name in a part's table raises :class:`ConfigError` naming it."""
    text_prefix, text_table = TEXT_TABLES[text_layout]
    out: dict[str, Tensor] = {}
    for prefix, table, tensors, what, layout in (
        (UNET_PREFIX, unet.LDM, unet_sd, "U-Net", "LDM"),
        (VAE_PREFIX, vae.LDM, vae_sd, "VAE", "LDM"),
        (text_prefix, text_table, text_encoder, "text encoder", _TEXT_NAMES[text_layout]),
    ):
        mapped = to_theirs(table, tensors)
        if mapped.unmapped:
            raise ConfigError(f"{what} tensor {mapped.unmapped[0]} has no {layout} name")
        out.update({prefix + k: v for k, v in mapped.tensors.items()})
    return out
