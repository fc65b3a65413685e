"""A tokenizer as JSON in a checkpoint's metadata, and back.

The shipped OpenAI CLIP vocabulary is stored by name (``"clip-default"``); any other
vocabulary is stored whole (``vocab.json`` and ``merges.txt`` contents as strings), so the
checkpoint alone rebuilds the tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.models.tokenizer import CLIPTokenizer

DEFAULT_TOKENIZER = "clip-default"


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """JSON description of a :class:`~noisecraft.models.tokenizer.CLIPTokenizer`.

    ``{"name": "clip-default", ...settings}`` for the shipped OpenAI vocabulary, else
    ``{"name": "custom", "vocab_json": ..., "merges_txt": ..., ...}`` with the vocabulary
    files' contents as strings, so the checkpoint alone rebuilds the tokenizer.
    """
    if not isinstance(tokenizer, CLIPTokenizer):
        raise ConfigError(
            f"cannot save a tokenizer of type {type(tokenizer).__name__}; "
            "LatentDiffusion.save needs a noisecraft CLIPTokenizer"
        )
    decoder = {i: t for t, i in tokenizer.vocab.items()}
    spec: dict[str, Any] = {
        "pad_token_id": tokenizer.pad_token_id,
        "context_length": tokenizer.context_length,
        "cleanup": tokenizer.cleanup,
        "bos_token": decoder[tokenizer.bos_token_id],
        "eos_token": decoder[tokenizer.eos_token_id],
    }
    default = CLIPTokenizer.default()
    if tokenizer.merges == default.merges and dict(tokenizer.vocab) == dict(default.vocab):
        return {"name": DEFAULT_TOKENIZER, **spec}
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    vocab = json.dumps(dict(tokenizer.vocab), ensure_ascii=False)
    return {"name": "custom", "vocab_json": vocab, "merges_txt": merges, **spec}


def tokenizer_from_spec(spec: dict[str, Any]) -> Any:
    """Inverse of :func:`tokenizer_spec`."""
    kwargs = {
        "pad_token_id": spec.get("pad_token_id"),
        "context_length": int(spec.get("context_length", 77)),
        "cleanup": spec.get("cleanup", "clip"),
    }
    name = spec.get("name")
    if name == DEFAULT_TOKENIZER:
        return CLIPTokenizer.default(**kwargs)
    if name == "custom":
        try:
            vocab = json.loads(spec["vocab_json"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"corrupt tokenizer vocabulary in the checkpoint ({e})") from None
        merges = []
        for line in spec.get("merges_txt", "").split("\n"):
            if not line.strip() or line.startswith("#version"):
                continue
            a, b = line.split()
            merges.append((a, b))
        return CLIPTokenizer(
            vocab,
            merges,
            bos_token=spec.get("bos_token", "<|startoftext|>"),
            eos_token=spec.get("eos_token", "<|endoftext|>"),
            **kwargs,
        )
    raise CheckpointError(f"unknown tokenizer '{name}' in the checkpoint; upgrade noisecraft")


__all__ = ["DEFAULT_TOKENIZER", "tokenizer_from_spec", "tokenizer_spec"]
