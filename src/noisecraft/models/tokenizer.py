"""CLIP's byte-level BPE tokenizer, written from the algorithm (no transformers at runtime).

Text -> token ids in four steps, as OpenAI's ``clip/simple_tokenizer.py``: clean-up,
pre-tokenisation into words and the byte-level alphabet (steps 1-3, :mod:`.tokenizer_text`),
then

4. **BPE.** Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine
   Translation of Rare Words with Subword Units"): repeatedly merge the adjacent
   pair with the lowest merge rank, all its occurrences left to right, until no
   adjacent pair has a rank. Each final symbol is one vocabulary id. (transformers
   merges one occurrence at a time from a priority queue; the result is the same,
   since a pair that contains a merged symbol always ranks after that merge.)

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (shipped as
``noisecraft/assets/clip_bpe_simple_vocab_16e6.txt.gz``, MIT licence, see
``CLIP_VOCAB_LICENSE.txt`` there): the 256 byte symbols, the same with ``</w>``,
48 894 merges, ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49 408
ids, the vocabulary of SD 1.x's CLIP ViT-L/14 and of SD 2.x's OpenCLIP ViT-H/14.

A CLIP text encoder reads 77 ids: start, up to 75 tokens, end, padding. SD 1.x
pads with ``<|endoftext|>``; SD 2.x (OpenCLIP) pads with id 0 (``"!"``): pass
``pad_token_id=0``. Longer prompts are never cut silently: :meth:`CLIPTokenizer.__call__`
raises unless ``truncation=True``, and :meth:`~CLIPTokenizer.encode_chunks` /
:meth:`~CLIPTokenizer.encode_weighted` split them into 75-token chunks the way the
AUTOMATIC1111 web UI does (:mod:`.prompt_chunks`; :mod:`.prompt_weights` parses its
``(word:1.3)`` emphasis syntax). Vocabulary files are read and written by
:mod:`.tokenizer_files`. The public names of those modules are importable from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch

from noisecraft.errors import CheckpointError, ConfigError, unknown_name
from noisecraft.models.prompt_chunks import COMMA_BACKTRACK, WeightedTokens, chunk_segments
from noisecraft.models.prompt_weights import BREAK, parse_prompt_attention
from noisecraft.models.tokenizer_files import (
    DEFAULT_VOCAB_ASSET,
    OPENAI_NUM_MERGES,
    default_vocab,
    parse_bpe_gz,
    read_vocab_files,
    special_token,
    write_vocab_files,
)
from noisecraft.models.tokenizer_text import (
    BOS_TOKEN,
    CLEANUPS,
    EOS_TOKEN,
    EOW,
    Cleanup,
    bytes_to_unicode,
    clean_text,
    pretokenize,
)

__all__ = [
    "BOS_TOKEN",
    "CHUNK_LENGTH",
    "COMMA_BACKTRACK",
    "CONTEXT_LENGTH",
    "DEFAULT_VOCAB_ASSET",
    "EOS_TOKEN",
    "OPENAI_NUM_MERGES",
    "CLIPTokenizer",
    "Cleanup",
    "WeightedTokens",
    "bytes_to_unicode",
    "clean_text",
    "write_vocab_files",
]

#: Ids a CLIP text encoder reads: start + 75 tokens + end.
CONTEXT_LENGTH = 77
CHUNK_LENGTH = CONTEXT_LENGTH - 2
_pretokenize = pretokenize  # the name the tests and earlier code import

#: A prompt fragment's token ids -> the same with each textual-inversion name replaced by a
#: tuple of its vectors' ids (:mod:`noisecraft.adapters.embeddings`).
EmbeddingLookup = Callable[[list[int]], list[int | tuple[int, ...]]]

# GPT-2's split (letters / numbers / other runs) of a CLIP word; only the special
# token strings are CLIP words that it splits further.
_RE_GPT2_SPLIT = re.compile(r"[^\W\d_]+|\d+|(?:[^\w\s]|_)+")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (as OpenAI's ``SimpleTokenizer``).

    Build one with :meth:`default` (the shipped OpenAI vocabulary), :meth:`from_folder`
    (a CLIP / diffusers tokenizer folder with ``vocab.json`` and ``merges.txt``),
    :meth:`from_files` or :meth:`from_bpe_gz`. The vocabulary is read-only after
    construction; the only state is a cache of encoded words.

    Args:
        vocab: token string -> id, byte-level symbols as in ``vocab.json``.
        merges: merge pairs, lowest rank (applied first) first.
        bos_token, eos_token: the start / end token strings (must be in ``vocab``).
            The end token is also the id given to symbols not in the vocabulary,
            as transformers does (a byte-level vocabulary has none).
        pad_token_id: id after the end token up to ``context_length``; default the
            end token's id (SD 1.x); SD 2.x's OpenCLIP uses 0.
        context_length: ids per sequence (77 for every CLIP text encoder).
        cleanup: ``"clip"`` (OpenAI's clean-up) or ``"transformers"`` (equal to
            transformers' tokenizer); see :func:`clean_text`.
        use_ftfy: for ``cleanup="clip"``: None uses ftfy if it is installed.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token_id: int | None = None,
        context_length: int = CONTEXT_LENGTH,
        cleanup: Cleanup = "clip",
        use_ftfy: bool | None = None,
    ) -> None:
        self._encoder: dict[str, int] = dict(vocab)
        self._decoder: dict[int, str] = {i: t for t, i in self._encoder.items()}
        self._merges: tuple[tuple[str, str], ...] = tuple((a, b) for a, b in merges)
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(self._merges)}
        for name, token in (("start", bos_token), ("end", eos_token)):
            if token not in self._encoder:
                raise CheckpointError(
                    f"the vocabulary has no {name} token '{token}'; "
                    f"pass the vocab.json of a CLIP tokenizer or {name[0]}os_token="
                )
        if cleanup not in CLEANUPS:
            raise unknown_name("tokenizer cleanup", str(cleanup), CLEANUPS)
        if context_length < 3:
            raise ConfigError(
                f"context_length must be >= 3 (start, a token, end), got {context_length}"
            )
        self.bos_token_id: int = self._encoder[bos_token]
        self.eos_token_id: int = self._encoder[eos_token]
        self.vocab_size: int = max(self._decoder) + 1 if self._decoder else 0
        if pad_token_id is None:
            pad_token_id = self.eos_token_id
        if pad_token_id not in self._decoder:
            raise ConfigError(
                f"pad_token_id {pad_token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        self.pad_token_id: int = int(pad_token_id)
        self.context_length: int = int(context_length)
        self.cleanup: Cleanup = cleanup
        self.use_ftfy: bool | None = use_ftfy
        #: Id of ``",</w>"`` (the comma A1111 breaks chunks at), or None.
        self.comma_token_id: int | None = self._encoder.get("," + EOW)
        self._specials = {bos_token: self.bos_token_id, eos_token: self.eos_token_id}
        # Where the start / end token strings are recognised in a prompt: CLIP finds them
        # as words of the cleaned (lower-cased) text; transformers in the raw text, before
        # any clean-up, and BPE-encodes a word that only becomes "<|endoftext|>" afterwards.
        self._special_words = self._specials if cleanup == "clip" else {}
        self._special_split = re.compile(
            "("
            + "|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True))
            + ")"
        )
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path, **kwargs) -> CLIPTokenizer:
        """Read a transformers-style ``vocab.json`` and ``merges.txt``."""
        vocab, merges = read_vocab_files(Path(vocab_path), Path(merges_path))
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs) -> CLIPTokenizer:
        """Read ``vocab.json`` + ``merges.txt`` from ``path`` or ``path/tokenizer``.

        Works on a transformers CLIP model folder and on a diffusers pipeline folder.
        Unless ``pad_token_id`` is given, the pad token of ``special_tokens_map.json``
        or ``tokenizer_config.json`` is used when present (SD 2.x's says ``"!"``).
        """
        path = Path(path)
        folder = next((p for p in (path, path / "tokenizer") if (p / "vocab.json").is_file()), None)
        if folder is None and path.is_file() and path.name.endswith(".gz"):
            raise CheckpointError(
                f"{path} is a file, not a folder; use CLIPTokenizer.from_bpe_gz()"
            )
        if folder is None:
            raise CheckpointError(
                f"no vocab.json in {path} or {path / 'tokenizer'}; pass a CLIP tokenizer folder "
                "holding vocab.json and merges.txt (or use CLIPTokenizer.default())"
            )
        vocab, merges = read_vocab_files(folder / "vocab.json", folder / "merges.txt")
        if "pad_token_id" not in kwargs:
            pad = special_token(folder, "pad_token")
            if pad is not None and pad in vocab:
                kwargs["pad_token_id"] = vocab[pad]
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_bpe_gz(
        cls, path: str | Path, *, num_merges: int | None = OPENAI_NUM_MERGES, **kwargs
    ) -> CLIPTokenizer:
        """Read OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` format.

        Line 0 is a header, lines ``1..num_merges`` are merges (``None``: all lines).
        The vocabulary is the 256 byte symbols, the same with ``</w>``, one token
        per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"CLIP BPE file not found: {path}; pass the path of a bpe_simple_vocab_16e6.txt.gz "
                "(or use CLIPTokenizer.default())"
            )
        vocab, merges = parse_bpe_gz(path.read_bytes(), str(path), num_merges)
        return cls(dict(vocab), merges, **kwargs)

    @classmethod
    def default(cls, **kwargs) -> CLIPTokenizer:
        """OpenAI CLIP's vocabulary shipped with noisecraft (SD 1.x / 2.x text encoders)."""
        vocab, merges = default_vocab()
        return cls(dict(vocab), merges, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def vocab(self) -> Mapping[str, int]:
        """Token string -> id (read-only view)."""
        return MappingProxyType(self._encoder)

    @property
    def merges(self) -> tuple[tuple[str, str], ...]:
        """Merge pairs in rank order."""
        return self._merges

    @property
    def chunk_length(self) -> int:
        """Prompt tokens per sequence: ``context_length - 2``."""
        return self.context_length - 2

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"pad_token_id={self.pad_token_id}, cleanup={self.cleanup!r})"
        )

    # ------------------------------------------------------------------ encoding

    def bpe(self, word: str) -> list[str]:
        """Byte-pair-encode one byte-level word (its last symbol gets ``</w>``)."""
        symbols = [*word[:-1], word[-1] + EOW]
        ranks = self._ranks
        while len(symbols) > 1:
            best: tuple[str, str] | None = None
            best_rank = 0
            for pair in zip(symbols, symbols[1:], strict=False):
                rank = ranks.get(pair)
                if rank is not None and (best is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            special = self._special_words.get(word)
            if special is not None:
                ids = (special,)
            elif word in self._specials:
                # transformers: a lower-cased special is one CLIP word, which the GPT-2
                # regex of its ByteLevel pre-tokenizer splits again: "<|", "endoftext", "|>".
                ids = tuple(i for w in _RE_GPT2_SPLIT.findall(word) for i in self._bpe_ids(w))
            else:
                ids = self._bpe_ids(word)
            if len(self._cache) >= 100_000:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        symbols = "".join(map(self._byte_encoder.__getitem__, word.encode("utf-8")))
        unk = self.eos_token_id
        return tuple(self._encoder.get(s, unk) for s in self.bpe(symbols))

    def clean(self, text: str) -> str:
        """This tokenizer's text clean-up (:func:`clean_text` with its settings)."""
        return clean_text(text, cleanup=self.cleanup, use_ftfy=self.use_ftfy)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start / end / padding; never truncated."""
        ids: list[int] = []
        parts = [text] if self.cleanup == "clip" else self._special_split.split(text)
        for part in parts:
            special = self._specials.get(part) if self.cleanup != "clip" else None
            if special is not None:
                ids.append(special)
                continue
            for word in pretokenize(self.clean(part), self.cleanup):
                ids.extend(self._word_ids(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` (byte-level symbols, ``</w>`` ends a word)."""
        return [self._decoder[i] for i in self.encode(text)]

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: byte symbols back to UTF-8, ``</w>`` to a space."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        skip = {self.bos_token_id, self.eos_token_id} if skip_special_tokens else set()
        pieces = []
        for i in ids:
            if i in skip:
                continue
            token = self._decoder.get(int(i))
            if token is None:
                raise ConfigError(
                    f"token id {i} is not in the vocabulary (0..{self.vocab_size - 1})"
                )
            if token in self._specials:
                pieces.append(token.encode("utf-8"))
            else:
                pieces.append(bytes(self._byte_decoder.get(c, ord("?")) for c in token))
        text = b"".join(pieces).decode("utf-8", errors="replace")
        return re.sub(" +", " ", text.replace(EOW, " ")).strip()

    def wrap(self, ids: Sequence[int]) -> list[int]:
        """``[start, *ids, end, pad, ...]`` of length ``context_length`` (ids must fit)."""
        if len(ids) > self.chunk_length:
            raise ConfigError(
                f"{len(ids)} tokens do not fit in {self.context_length} ids; "
                "use chunk_ids() for long prompts"
            )
        pad = [self.pad_token_id] * (self.chunk_length - len(ids))
        return [self.bos_token_id, *ids, self.eos_token_id, *pad]

    def __call__(self, texts: str | Sequence[str], *, truncation: bool = False) -> torch.Tensor:
        """Ids of shape (batch, context_length): start, tokens, end, padding.

        A prompt longer than ``context_length - 2`` tokens raises :class:`ConfigError`
        unless ``truncation=True`` (keep the first 75 tokens, as transformers does);
        :meth:`encode_chunks` keeps all of it.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > self.chunk_length:
                if not truncation:
                    raise ConfigError(
                        f"prompt has {len(ids)} tokens, more than the {self.chunk_length} that fit "
                        f"in {self.context_length}; pass truncation=True to cut it, or use "
                        "encode_chunks() / encode_weighted() to keep all of it"
                    )
                ids = ids[: self.chunk_length]
            rows.append(self.wrap(ids))
        if not rows:
            return torch.empty((0, self.context_length), dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    # ------------------------------------------------------------------ long prompts

    def chunk_ids(
        self, ids: Sequence[int], *, comma_backtrack: int = COMMA_BACKTRACK
    ) -> torch.Tensor:
        """Split ``ids`` (from :meth:`encode`) into wrapped chunks, shape (n_chunks, 77).

        A1111's ``tokenize_line``: tokens fill 75-slot chunks; when a chunk is full and
        the next token is not a comma, and the chunk's last comma is at most
        ``comma_backtrack`` tokens from its end, the tokens after that comma move to
        the next chunk (0 disables this). Each chunk is start + tokens + end + padding.
        An empty prompt gives one chunk.
        """
        chunks, _ = self._chunk([(list(ids), 1.0)], comma_backtrack)
        return torch.tensor(chunks, dtype=torch.long)

    def encode_chunks(
        self,
        text: str,
        *,
        comma_backtrack: int = COMMA_BACKTRACK,
        embeddings: EmbeddingLookup | None = None,
    ) -> torch.Tensor:
        """``chunk_ids(encode(text))``: all of a long prompt, shape (n_chunks, 77).

        ``embeddings``: textual-inversion names to replace by their vectors' ids (as in
        :meth:`encode_weighted`)."""
        ids: list = self.encode(text)
        if embeddings is not None:
            ids = embeddings(ids)
        chunks, _ = self._chunk([(ids, 1.0)], comma_backtrack)
        return torch.tensor(chunks, dtype=torch.long)

    def encode_weighted(
        self,
        prompt: str,
        *,
        comma_backtrack: int = COMMA_BACKTRACK,
        embeddings: EmbeddingLookup | None = None,
    ) -> WeightedTokens:
        """Ids and per-token emphasis weights of an A1111-syntax prompt, (n_chunks, 77) each.

        The prompt is split by :func:`~noisecraft.models.prompt_weights.parse_prompt_attention`;
        each fragment is tokenized on its own (so ``(ca)t`` is ``ca`` + ``t``, as in A1111),
        ``BREAK`` closes the current chunk (padding it), and the chunks are cut as in
        :meth:`chunk_ids`. Start, end and padding have weight 1.0.

        ``embeddings`` (textual inversion, :mod:`noisecraft.adapters.embeddings`): maps a
        fragment's ids to the same ids with each embedding's name replaced by a tuple of its
        vectors' ids, which stays whole in one chunk and takes the fragment's weight (A1111's
        ``tokenize_line``).

        Differences from A1111: a ``BREAK`` inside brackets (whose marker weight A1111
        multiplies, so it then encodes the word "break") still breaks here.
        """
        segments: list[tuple[list[int], float] | None] = []
        for text, weight in parse_prompt_attention(prompt):
            if text == BREAK and weight < 0:
                segments.append(None)
            else:
                ids: list = self.encode(text)
                segments.append((ids if embeddings is None else embeddings(ids), weight))
        ids, weights = self._chunk(segments, comma_backtrack)
        w = torch.tensor(weights, dtype=torch.float32)
        if not torch.isfinite(w).all():  # ((((a)))) nested ~930 deep: 1.1^931 > float32's max
            raise ConfigError(
                "an emphasis weight of the prompt is beyond float32's range (too many nested "
                "brackets or too large a weight); use fewer brackets or smaller weights"
            )
        return WeightedTokens(torch.tensor(ids, dtype=torch.long), w)

    def _chunk(
        self,
        segments: Iterable[tuple[Sequence[int | tuple[int, ...]], float] | None],
        comma_backtrack: int,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """A1111's chunking over (ids, weight) segments; None is a BREAK."""
        return chunk_segments(
            segments,
            size=self.chunk_length,
            comma=self.comma_token_id,
            comma_backtrack=comma_backtrack,
            wrap=self.wrap,
        )
