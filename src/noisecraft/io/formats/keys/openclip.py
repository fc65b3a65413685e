"""SD 2.x's OpenCLIP ViT-H/14 text tower (``cond_stage_model.model.*``) <-> our CLIP names.

OpenCLIP keeps ``token_embedding``, ``positional_embedding``, ``ln_final`` and
``transformer.resblocks.N.{ln_1, attn.in_proj_{weight,bias}, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}``; ``nn.MultiheadAttention`` stacks q, k, v in ``in_proj`` (rows ``[0:w]``,
``[w:2w]``, ``[2w:3w]``), split here into ``self_attn.{q,k,v}_proj`` (views, no copy) and
joined back when writing: the names diffusers' ``convert_open_clip_checkpoint`` produces.
``text_projection`` and ``logit_scale`` (the image-text head) are no part of SD's text
encoder: ignored (a single file keeps them as extras).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from noisecraft.errors import ConfigError
from noisecraft.key_rules import Split, Table, ignore, rule, to_theirs, under

__all__ = ["OPENCLIP", "to_openclip"]

_P = "{p:weight|bias}"

OPENCLIP = Table(
    ignore("text_projection"),
    ignore("logit_scale"),
    rule("embeddings.token_embedding.weight", "token_embedding.weight"),
    rule("embeddings.position_embedding.weight", "positional_embedding"),
    rule(f"final_layer_norm.{_P}", "ln_final.{p}"),
    under(
        "encoder.layers.{i}.",
        "transformer.resblocks.{i}.",
        (
            rule(f"self_attn.{{qkv}}_proj.{_P}", "attn.in_proj_{p}", Split("qkv", ("q", "k", "v"))),
            rule(f"layer_norm1.{_P}", "ln_1.{p}"),
            rule(f"self_attn.out_proj.{_P}", "attn.out_proj.{p}"),
            rule(f"layer_norm2.{_P}", "ln_2.{p}"),
            rule(f"mlp.fc1.{_P}", "mlp.c_fc.{p}"),
            rule(f"mlp.fc2.{_P}", "mlp.c_proj.{p}"),
        ),
    ),
)


def to_openclip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our text encoder's tensors under OpenCLIP's names (q, k, v stacked into ``in_proj``);
    a tensor without an OpenCLIP name raises :class:`ConfigError` naming it."""
    mapped = to_theirs(OPENCLIP, state_dict)
    if mapped.unmapped:
        raise ConfigError(f"text encoder tensor {mapped.unmapped[0]} has no OpenCLIP name")
    return mapped.tensors
