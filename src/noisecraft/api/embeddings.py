"""Textual-inversion embeddings in the API: attach a set to a model, record and replay them.

A1111 writes the embeddings a prompt (positive or negative) used into the image's
``parameters`` as ``TI hashes: "name: <first 12 hex of the file's SHA-256>, ..."``
(``modules/sd_hijack_clip.py``; ``:`` and ``,`` dropped from names), positive prompt's first.
Replaying such an image finds each by name again (:func:`check_embeddings`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from noisecraft.adapters.embedding_set import EmbeddingSet
from noisecraft.adapters.embeddings import Embedding
from noisecraft.errors import ConfigError
from noisecraft.models import LatentDiffusion

TI_HASHES = "TI hashes"


def embedding_set(model: Any, folder: str | os.PathLike | None = None) -> EmbeddingSet:
    """The model's :class:`EmbeddingSet`, attached (with ``folder``) if it has none yet."""
    if not isinstance(model, LatentDiffusion):
        raise ConfigError(
            "textual-inversion embeddings are for text-to-image models",
            settings=["embedding_dir"],
        )
    if model.textual_inversion is None:
        model.textual_inversion = EmbeddingSet.for_model(model, folder)
    elif folder is not None:
        raise ConfigError("the model already has an embedding folder", settings=["embedding_dir"])
    return model.textual_inversion


def _used(model: Any, prompts: list[str]) -> list[Embedding]:
    ti = getattr(model, "textual_inversion", None)
    if ti is None:
        return []
    with warnings.catch_warnings():  # the prompts were read (and warned about) once already
        warnings.simplefilter("ignore")
        return ti.used([model.tokenize_prompt(p)[0] for p in prompts])


def _clean(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def ti_hashes(model: Any, prompt: str, negative_prompt: str) -> dict[str, str]:
    """``{"TI hashes": "name: hash, ..."}`` for the embeddings the prompts use, else {}."""
    parts = []
    for e in _used(model, [prompt, negative_prompt]):
        h = e.short_hash()
        if h:
            parts.append(f"{_clean(e.name)}: {h}")
    return {TI_HASHES: ", ".join(parts)} if parts else {}


def recorded_embeddings(params: Mapping[str, Any]) -> dict[str, str]:
    """name -> short hash of an infotext's ``TI hashes``."""
    text = params.get("extra", {}).get(TI_HASHES, "")
    out = {}
    for item in str(text).split(","):
        name, _, digest = item.strip().rpartition(":")
        if name.strip():
            out[name.strip()] = digest.strip()
    return out


def check_embeddings(params: Mapping[str, Any], model: Any) -> None:
    """Refuse to replay an image whose embeddings this model cannot find by name."""
    wanted = recorded_embeddings(params)
    if not wanted:
        return
    ti = getattr(model, "textual_inversion", None)
    known = {} if ti is None else {_clean(n): n for n in ti.names}
    missing = [n for n in wanted if n not in known or ti.get(known[n]) is None]
    if missing:
        raise ConfigError(
            f"this image used the embedding(s) {', '.join(missing)}; give the @embedding_dir "
            "that holds them (a file per name) to make it again",
            settings=["embedding_dir"],
        )


__all__ = ["TI_HASHES", "check_embeddings", "embedding_set", "recorded_embeddings", "ti_hashes"]
