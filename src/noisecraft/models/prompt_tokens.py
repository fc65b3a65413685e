"""Which positions of the text encoder's context hold which word of the prompt.

The context a U-Net attends to is ``k`` chunks of 77 positions (start, 75 tokens, end,
padding; :mod:`noisecraft.models.prompt_chunks`), concatenated. A word may be several BPE
pieces (``handwritten`` is one, ``noisecraft`` three); a CLIP piece that ends a word carries
``</w>``. :func:`prompt_words` reads the chunked ids (the same ids the text encoder gets,
emphasis and ``BREAK`` included) back into the prompt's words, each with its positions in the
flattened ``k * 77`` context and its emphasis weight; start, end and padding are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = ["PromptWord", "prompt_words", "words_of_tokenizer"]

_EOW = "</w>"


@dataclass(frozen=True)
class PromptWord:
    """One word of a prompt: its ``text``, the context ``positions`` of its BPE pieces
    (chunk * 77 + index in the chunk) and its emphasis ``weight`` (its first piece's)."""

    text: str
    positions: tuple[int, ...]
    weight: float = 1.0


def prompt_words(
    ids: Tensor,
    weights: Tensor | None,
    *,
    pieces: Mapping[int, str],
    decode: Callable[[list[int]], str],
    eos_token_id: int,
) -> list[PromptWord]:
    """The words of chunked ``ids`` (n_chunks, L), in order.

    ``weights``: the emphasis weights of the same shape (None: all 1); ``pieces``: id -> BPE
    piece string (a piece ending in ``</w>`` ends a word); ``decode``: ids -> text;
    ``eos_token_id``: the end token (the first one in a chunk ends its prompt tokens;
    position 0 is the start token). A word cut by a chunk boundary keeps going in the next
    chunk; a ``BREAK`` (a chunk closed early) ends the word before it.
    """
    n_chunks, length = ids.shape
    rows = ids.tolist()
    w_rows = None if weights is None else weights.tolist()
    words: list[PromptWord] = []
    current: list[tuple[int, int]] = []  # (position, id) of the open word

    def close() -> None:
        if current:
            first = current[0][0]
            weight = 1.0 if w_rows is None else w_rows[first // length][first % length]
            text = decode([i for _, i in current])
            positions = tuple(p for p, _ in current)
            words.append(PromptWord(text, positions, round(float(weight), 6)))
            current.clear()

    for c in range(n_chunks):
        row = rows[c]
        end = row.index(eos_token_id, 1) if eos_token_id in row[1:] else length
        for j in range(1, end):
            current.append((c * length + j, row[j]))
            if pieces.get(row[j], _EOW).endswith(_EOW):
                close()
        if end < length - 1:  # the chunk was closed early (BREAK or the prompt's end)
            close()
    close()
    return words


def words_of_tokenizer(
    ids: Tensor, weights: Tensor | None, tokenizer: object, extra: Mapping[int, str] = {}
) -> list[PromptWord]:
    """:func:`prompt_words` with a :class:`~noisecraft.models.tokenizer.CLIPTokenizer`'s
    vocabulary, decoder and end token; ``extra``: pieces of ids past the vocabulary (the
    vectors of a textual-inversion embedding, read back as its name)."""
    vocab: Mapping[str, int] = tokenizer.vocab  # type: ignore[attr-defined]
    pieces = {**{i: s for s, i in vocab.items()}, **extra}

    def decode(group: list[int]) -> str:
        named = [extra[i] for i in group if i in extra]
        if named:
            return named[0].removesuffix(_EOW)
        return tokenizer.decode(group)  # type: ignore[attr-defined]

    return prompt_words(
        ids,
        weights,
        pieces=pieces,
        decode=decode,
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
    )
