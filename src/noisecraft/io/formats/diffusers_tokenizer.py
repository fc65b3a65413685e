"""A diffusers ``tokenizer/`` folder <-> our :class:`~noisecraft.models.tokenizer.CLIPTokenizer`.

Read: ``vocab.json`` + ``merges.txt`` (transformers 4, published SD folders) or the
``tokenizer.json`` of the `tokenizers` library (all transformers 5 writes), with the folder's
start / end / pad tokens and transformers' text clean-up (what diffusers' pipeline runs).
Written: the transformers 4 files, which both versions read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from noisecraft.errors import CheckpointError, NoisecraftError
from noisecraft.io.formats.diffusers_files import read_json, write_json
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.models.tokenizer_files import special_token

__all__ = ["read_tokenizer", "write_tokenizer"]


def read_tokenizer(folder: Path, max_positions: int) -> CLIPTokenizer:
    """CLIP BPE tokenizer of a ``tokenizer/`` folder, with transformers' text clean-up (what
    diffusers' pipeline runs) and the folder's start / end / pad tokens.

    Reads ``vocab.json`` + ``merges.txt`` (transformers 4, published SD folders) or, failing
    those, the ``tokenizer.json`` of the `tokenizers` library (all transformers 5 writes).
    """
    kwargs: dict[str, Any] = {"cleanup": "transformers", "context_length": max_positions}
    specials = {n: special_token(folder, n) for n in ("bos_token", "eos_token", "pad_token")}
    for name in ("bos_token", "eos_token"):
        if specials[name] is not None:
            kwargs[name] = specials[name]
    length = None
    with contextlib.suppress(CheckpointError):
        length = read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(length, int) and not isinstance(length, bool) and 3 <= length < max_positions:
        kwargs["context_length"] = length
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for file in (vocab_path, merges_path):
            if not file.is_file():
                raise CheckpointError(
                    f"{file} not found; a diffusers tokenizer/ folder needs vocab.json and "
                    "merges.txt (or tokenizer.json)"
                )
        try:
            tok = CLIPTokenizer.from_files(vocab_path, merges_path, **kwargs)
        except NoisecraftError as e:
            raise CheckpointError(f"{folder}: {e}") from None
    else:
        vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        try:
            tok = CLIPTokenizer(vocab, merges, **kwargs)
        except NoisecraftError as e:
            raise CheckpointError(f"{folder / 'tokenizer.json'}: {e}") from None
    pad = specials["pad_token"]
    if pad is not None and pad in tok.vocab and tok.vocab[pad] != tok.pad_token_id:
        tok = CLIPTokenizer(tok.vocab, tok.merges, pad_token_id=tok.vocab[pad], **kwargs)
    return tok


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a `tokenizers` ``tokenizer.json`` holding a BPE model."""
    model = read_json(path).get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path} does not hold a BPE tokenizer model; expected CLIP's")
    vocab, raw = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(raw, list):
        raise CheckpointError(f"{path}: the BPE model has no vocab / merges")
    merges: list[tuple[str, str]] = []
    for item in raw:  # ["a", "b"] (tokenizers >= 0.20) or "a b"
        pair = item.split(" ") if isinstance(item, str) else item
        if not isinstance(pair, list) or len(pair) != 2:
            raise CheckpointError(f"{path}: merge {item!r} is not a pair of symbols")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def write_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    decoder = {i: t for t, i in tokenizer.vocab.items()}
    bos, eos = decoder[tokenizer.bos_token_id], decoder[tokenizer.eos_token_id]
    pad = decoder[tokenizer.pad_token_id]
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": pad}
    folder.mkdir()
    write_json(folder / "vocab.json", dict(tokenizer.vocab))
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    write_json(folder / "special_tokens_map.json", specials)
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": tokenizer.context_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
            **specials,
        },
    )
