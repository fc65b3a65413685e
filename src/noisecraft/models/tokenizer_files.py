"""CLIP vocabulary files: transformers' ``vocab.json`` + ``merges.txt``, OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` and the copy of it shipped with noisecraft.

Readers return ``(vocab, merges)``: token string -> id, and merge pairs in rank order, what
:class:`~noisecraft.models.tokenizer.CLIPTokenizer` is built from. :func:`write_vocab_files`
writes a tokenizer back in the transformers layout.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from noisecraft.errors import CheckpointError, OutputExistsError
from noisecraft.models.tokenizer_text import BOS_TOKEN, EOS_TOKEN, EOW, bytes_to_unicode

if TYPE_CHECKING:
    from noisecraft.models.tokenizer import CLIPTokenizer

__all__ = [
    "DEFAULT_VOCAB_ASSET",
    "OPENAI_NUM_MERGES",
    "default_vocab",
    "parse_bpe_gz",
    "read_vocab_files",
    "special_token",
    "write_vocab_files",
]

#: Merges OpenAI reads from ``bpe_simple_vocab_16e6.txt.gz``: ``merges[1 : 49152 - 256 - 2 + 1]``.
OPENAI_NUM_MERGES = 49152 - 256 - 2
DEFAULT_VOCAB_ASSET = "clip_bpe_simple_vocab_16e6.txt.gz"


def _read_text(path: Path, kind: str) -> str:
    if not path.is_file():
        raise CheckpointError(
            f"CLIP tokenizer {kind} not found: {path}; pass the vocab.json and merges.txt "
            "of a CLIP tokenizer (e.g. a diffusers model's tokenizer/ folder) or use "
            "CLIPTokenizer.default()"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); pass a UTF-8 CLIP {kind}") from None


def read_vocab_files(
    vocab_path: Path, merges_path: Path
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    text = _read_text(vocab_path, "vocab.json")
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{vocab_path} is not valid JSON ({e}); pass a CLIP vocab.json"
        ) from None
    if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()):
        raise CheckpointError(f"{vocab_path} is not a token -> id mapping; pass a CLIP vocab.json")
    merges = _parse_merges(_read_text(merges_path, "merges.txt").split("\n"), merges_path)
    return vocab, merges


def _parse_merges(lines: Iterable[str], where: str | Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(lines):
        if (n == 0 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CheckpointError(
                f"{where}: line {n + 1} is not a merge 'a b': {line[:40]!r}; pass a BPE merges file"
            )
        merges.append((parts[0], parts[1]))
    return merges


def parse_bpe_gz(
    data: bytes, where: str, num_merges: int | None
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    try:
        lines = gzip.decompress(data).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{where} is not a gzip BPE file ({e}); pass OpenAI's bpe_simple_vocab_16e6.txt.gz"
        ) from None
    body = lines[1:] if num_merges is None else lines[1 : num_merges + 1]
    merges = _parse_merges(body, where)
    if num_merges is not None and len(merges) != num_merges:
        raise CheckpointError(
            f"{where} has {len(merges)} merges, not {num_merges}; pass num_merges=None to read all"
        )
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, *(s + EOW for s in byte_symbols)]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return tuple((t, i) for i, t in enumerate(tokens)), tuple(merges)


@cache
def default_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    asset = resources.files("noisecraft").joinpath("assets", DEFAULT_VOCAB_ASSET)
    try:
        data = asset.read_bytes()
    except (FileNotFoundError, OSError):
        raise CheckpointError(
            f"the CLIP vocabulary {DEFAULT_VOCAB_ASSET} is missing from the noisecraft install; "
            "reinstall noisecraft or use CLIPTokenizer.from_folder() with a CLIP tokenizer folder"
        ) from None
    return parse_bpe_gz(data, DEFAULT_VOCAB_ASSET, OPENAI_NUM_MERGES)


def special_token(folder: Path, name: str) -> str | None:
    """The special token ``name`` (``"pad_token"``, ``"bos_token"``, ...) that a transformers
    tokenizer folder names in ``special_tokens_map.json`` or ``tokenizer_config.json``."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(name)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def write_vocab_files(
    tokenizer: CLIPTokenizer, folder: str | Path, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``vocab.json``, ``merges.txt`` and ``special_tokens_map.json`` into ``folder``.

    The transformers layout, so that ``transformers.CLIPTokenizer.from_pretrained(folder)``
    and :meth:`CLIPTokenizer.from_folder` read the same vocabulary (e.g. to convert
    OpenAI's ``.txt.gz``). Returns the vocab and merges paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    specials_path = folder / "special_tokens_map.json"
    if not overwrite:
        for path in (vocab_path, merges_path, specials_path):
            if path.exists():
                raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
    decoder = {i: t for t, i in tokenizer.vocab.items()}
    bos, eos = decoder[tokenizer.bos_token_id], decoder[tokenizer.eos_token_id]
    specials = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": decoder[tokenizer.pad_token_id],
    }
    vocab_path.write_text(json.dumps(dict(tokenizer.vocab), ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges), encoding="utf-8"
    )
    specials_path.write_text(json.dumps(specials, ensure_ascii=False, indent=2), encoding="utf-8")
    return vocab_path, merges_path
