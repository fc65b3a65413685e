"""Long prompts in 75-token chunks, the way the AUTOMATIC1111 web UI cuts them.

A CLIP text encoder reads 77 ids (start, 75 tokens, end); A1111 (``modules/
sd_hijack_clip.py``, ``tokenize_line``) encodes a longer prompt as several such chunks and
concatenates their hidden states. Tokens fill a chunk in order; when a chunk is full and the
next token is not a comma, and the chunk's last comma is at most ``comma_backtrack`` tokens
from its end, the tokens after that comma move to the next chunk (0 disables this, A1111's
``comma_padding_backtrack`` default is 20). ``BREAK`` closes the current chunk. The ids come
from :class:`~noisecraft.models.tokenizer.CLIPTokenizer`, the weights from the emphasis syntax
of :mod:`noisecraft.models.prompt_weights`.

A segment's ids may hold tuples: the ids of one textual-inversion embedding (A1111 puts an
embedding's vectors whole into one chunk: when they do not fit in what is left of the chunk,
the chunk is closed first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

__all__ = ["COMMA_BACKTRACK", "WeightedTokens", "chunk_segments"]

#: A1111's ``comma_padding_backtrack`` default: how far back a chunk may break at a comma.
COMMA_BACKTRACK = 20


class WeightedTokens(NamedTuple):
    """Chunked token ids and A1111 emphasis weights, both of shape (n_chunks, 77)."""

    ids: torch.Tensor
    weights: torch.Tensor


def chunk_segments(
    segments: Iterable[tuple[Sequence[int | tuple[int, ...]], float] | None],
    *,
    size: int,
    comma: int | None,
    comma_backtrack: int,
    wrap: Callable[[Sequence[int]], list[int]],
) -> tuple[list[list[int]], list[list[float]]]:
    """A1111's chunking of (ids, weight) segments (None is a BREAK) into wrapped chunks.

    ``size``: tokens per chunk (75); ``comma``: the comma's id (None: never backtrack);
    ``wrap``: ids -> start + ids + end + padding. Returns the chunks' ids and weights; start,
    end and padding have weight 1.0. An empty prompt gives one chunk. A tuple among a
    segment's ids is kept whole in one chunk (an embedding's vectors; at most ``size``).
    """
    out_ids: list[list[int]] = []
    out_weights: list[list[float]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(tokens: list[int], weights: list[float]) -> None:
        out_ids.append(wrap(tokens))
        out_weights.append([1.0, *weights, 1.0] + [1.0] * (size - len(weights)))

    for segment in segments:
        if segment is None:
            close(tokens, weights)
            tokens, weights, last_comma = [], [], -1
            continue
        ids, weight = segment
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif (
                comma_backtrack
                and len(tokens) == size
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                close(tokens[:cut], weights[:cut])
                tokens, weights, last_comma = tokens[cut:], weights[cut:], -1
            if len(tokens) == size:
                close(tokens, weights)
                tokens, weights, last_comma = [], [], -1
            if isinstance(token, tuple):  # an embedding: all its vectors in this chunk
                if len(tokens) + len(token) > size:
                    close(tokens, weights)
                    tokens, weights, last_comma = [], [], -1
                tokens.extend(token)
                weights.extend([weight] * len(token))
                continue
            tokens.append(token)
            weights.append(weight)
    if tokens or not out_ids:
        close(tokens, weights)
    return out_ids, out_weights
