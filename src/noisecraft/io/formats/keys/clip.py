"""CLIP text encoder key tables: transformers' ``CLIPTextModel`` names.

Our :class:`~noisecraft.models.text_encoder.CLIPTextEncoder` uses transformers' names without
the ``text_model.`` prefix. Files hold them with it (transformers 4, published SD 1.x single
files under ``cond_stage_model.transformer.``, diffusers ``text_encoder/`` folders) or
without it (transformers 5, some old single files); both tables read both spellings and
differ in what they write. ``position_ids`` (a buffer transformers rebuilds) is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from noisecraft.key_rules import Table, ignore, read_only, rule

__all__ = ["DIFFUSERS", "LAYOUTS", "TRANSFORMERS", "TRANSFORMERS_FLAT", "layout_of"]

PREFIX = "text_model."
_POSITION_IDS = ignore("{path:.*}position_ids")

#: Written with ``text_model.`` (layout ``clip``).
TRANSFORMERS = Table(
    _POSITION_IDS, rule("{rest}", PREFIX + "{rest}"), read_only("{rest}", "{rest}")
)
#: Written without it (layout ``clip_flat``).
TRANSFORMERS_FLAT = Table(
    _POSITION_IDS, read_only("{rest}", PREFIX + "{rest}"), rule("{rest}", "{rest}")
)
#: A diffusers ``text_encoder/``: :data:`TRANSFORMERS`; the projection of a
#: ``CLIPTextModelWithProjection`` is no part of an SD text encoder.
DIFFUSERS = Table(ignore("text_projection.{rest}"), TRANSFORMERS)

LAYOUTS = {"clip": TRANSFORMERS, "clip_flat": TRANSFORMERS_FLAT}


def layout_of(keys: Iterable[str]) -> str:
    """``clip_flat`` when any key (``position_ids`` aside) lacks ``text_model.``, else ``clip``."""
    flat = any(not k.startswith(PREFIX) for k in keys if not k.endswith("position_ids"))
    return "clip_flat" if flat else "clip"
