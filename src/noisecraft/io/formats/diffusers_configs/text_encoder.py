"""A transformers ``text_encoder/config.json`` (``CLIPTextConfig``) <-> our
:class:`TextEncoderConfig`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from noisecraft.errors import CheckpointError, NoisecraftError
from noisecraft.models.text_encoder import TextEncoderConfig
from noisecraft.models.tokenizer import CLIPTokenizer

__all__ = ["text_encoder_config_from_transformers", "text_encoder_config_to_transformers"]


def text_encoder_config_from_transformers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "text_encoder/config.json"
) -> TextEncoderConfig:
    """Our :class:`TextEncoderConfig` of a transformers ``CLIPTextConfig`` dict
    (:meth:`TextEncoderConfig.from_transformers`), refusing other text models.

    An ``eos_token_id`` outside the vocabulary (transformers' default 49407 in a small test
    vocabulary; transformers itself only warns) is read as the legacy 2, pooling at the
    argmax id: only the pooled output depends on it, and SD pipelines do not use it.
    """
    model_type = d.get("model_type", "clip_text_model")
    if model_type not in ("clip_text_model", "clip"):
        raise CheckpointError(
            f"{source}: text encoder model_type {model_type!r} is not supported "
            "(noisecraft reads CLIP text encoders, model_type 'clip_text_model')"
        )
    if model_type == "clip":  # a whole CLIP model's config: the text part is nested
        d = d.get("text_config", {})
    eos, vocab = d.get("eos_token_id"), d.get("vocab_size", 49408)
    if isinstance(eos, int) and isinstance(vocab, int) and not 0 <= eos < vocab:
        d = {**d, "eos_token_id": 2}
    try:
        return TextEncoderConfig.from_transformers(d)
    except NoisecraftError as e:
        raise CheckpointError(f"{source}: {e}") from None


def text_encoder_config_to_transformers(
    config: TextEncoderConfig, tokenizer: CLIPTokenizer | None = None
) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` dict of our config. ``eos_token_id`` None (pool at the
    argmax id) is written as 2, the legacy value for which transformers does the same."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "max_position_embeddings": config.max_positions,
        "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "projection_dim": config.width,
        "bos_token_id": tokenizer.bos_token_id if tokenizer is not None else 0,
        "eos_token_id": 2 if config.eos_token_id is None else config.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer is not None else 1,
        "dtype": "float32",
    }
