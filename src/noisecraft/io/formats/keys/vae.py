"""VAE key tables: LDM's names (ours) as single files and VAE files hold them, and diffusers'.

* :data:`LDM`: our names (SD single files, under ``first_stage_model.``). LDM's training
  checkpoints also hold the loss's weights (``loss.*``: LPIPS, discriminator): no part of the
  autoencoder, ignored. Some converters store the middle attention's 1x1 convolutions as
  Linear weights: read as convolutions, written as convolutions.
* :data:`VAE_FILE`: a VAE on its own (AUTOMATIC1111's ``--vae`` files), prefixes stripped
  (:func:`strip_vae_prefix`): :data:`LDM`, and a ``model_ema.*`` EMA copy is ignored too.
* :func:`diffusers_table`: diffusers' ``AutoencoderKL`` names, built for the level count
  (:mod:`noisecraft.models.vae_keys`, where :class:`~noisecraft.models.vae.AutoencoderKL`'s
  own ``to_diffusers_state_dict`` finds it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from noisecraft.key_rules import Conv1x1, Rule, Table, ignore, rule
from noisecraft.models.vae_keys import (
    diffusers_table,
    from_diffusers_state_dict,
    to_diffusers_state_dict,
)

__all__ = [
    "DIFFUSERS_MARKERS",
    "LDM",
    "VAE_FILE",
    "diffusers_table",
    "from_diffusers_state_dict",
    "is_vae_state_dict",
    "strip_vae_prefix",
    "to_diffusers_state_dict",
]

#: Prefixes a VAE file's keys may carry: an SD single file's, and a diffusers-style ``vae.``.
VAE_PREFIXES = ("first_stage_model.", "vae.")
#: Key prefixes only diffusers' VAE names have.
DIFFUSERS_MARKERS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")


def _attention_accepts_linear() -> Iterable[Rule]:
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            key = f"{part}.mid.attn_1.{name}.weight"
            yield rule(key, key, Conv1x1(linear=False))


LDM = Table(ignore("loss.{rest}"), _attention_accepts_linear(), rule("{rest}", "{rest}"))
VAE_FILE = Table(ignore("model_ema.{rest}"), LDM)


def strip_vae_prefix(key: str) -> str:
    """``key`` without a leading ``first_stage_model.`` or ``vae.``."""
    for prefix in VAE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_vae_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether every key (``loss.*`` / ``model_ema.*`` aside, prefixes stripped) is an
    autoencoder's (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``),
    with a decoder: a VAE alone, in LDM's or diffusers' names."""
    keys = [k for k in sd if not k.startswith(("loss.", "model_ema."))]
    stripped = {strip_vae_prefix(k) for k in keys}
    return (
        bool(stripped)
        and all(
            k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
            for k in stripped
        )
        and any(k.startswith("decoder.") for k in stripped)
    )
