"""The embeddings a model's prompts may name, and how a name in a prompt becomes vectors.

AUTOMATIC1111 (``modules/textual_inversion/textual_inversion.py``, ``EmbeddingDatabase``;
``modules/sd_hijack_clip.py``, ``tokenize_line``) finds an embedding in a prompt by its
name's *tokens*: the name is tokenized like any text, and wherever a prompt fragment's token
ids contain that sequence (longest name first), the sequence is replaced by the embedding's
``n`` vectors. They take the fragment's emphasis weight and stay together in one 75-token
chunk. A word that names no embedding is a plain word.

:class:`EmbeddingSet` does this for one model: called on a fragment's ids it returns them
with each name replaced by a tuple of new token ids (``vocab_size + k``), whose vectors
(:attr:`EmbeddingSet.vectors`) the text encoder reads in place of its token table
(:class:`~noisecraft.models.text_encoder.CLIPTextEmbeddings`). Attach it as the model's
``textual_inversion``; nothing of the model itself changes, so removing it restores the
model exactly.

An embedding folder (A1111's ``--embeddings-dir``) is searched recursively for
``.pt`` / ``.bin`` / ``.safetensors`` files; each file's stem is a name. A file is read the
first time a prompt names it, so a folder may hold embeddings for other models as long as
their names are not used here (a used one of another width is refused, in one line).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from noisecraft.adapters.embeddings import EMBEDDING_SUFFIXES, Embedding, read_embedding
from noisecraft.errors import CheckpointError, ConfigError


class EmbeddingSet:
    """Embeddings for one text encoder (module docstring).

    ``tokenizer``: the model's CLIP tokenizer (names are tokenized with it); ``vocab_size``
    and ``width``: the text encoder's; ``folder``: an optional embedding folder.
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        width: int,
        folder: str | os.PathLike | None = None,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.width = int(width)
        self.folder = None if folder is None else Path(folder)
        self._entries: list[Embedding] = []  # in id order; replaced ones stay (ids are stable)
        self._offsets: list[int] = []
        self._loaded: dict[str, int] = {}  # name -> index into _entries
        self._files: dict[str, Path] = {}  # folder names not read yet
        self._clashes: dict[str, list[Path]] = {}
        self._name_ids: dict[str, tuple[int, ...]] = {}
        self._lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        self._vectors: Tensor | None = None
        self._folder_mtime: float | None = None
        if self.folder is not None:
            if not self.folder.is_dir():
                raise ConfigError(
                    f"@embedding_dir {self.folder} is not a folder; give the folder that holds "
                    "the embedding files",
                    settings=["embedding_dir"],
                )
            self.rescan()

    @classmethod
    def for_model(cls, model, folder: str | os.PathLike | None = None) -> EmbeddingSet:
        """An empty set for a :class:`~noisecraft.models.LatentDiffusion`'s text encoder."""
        tok = model.tokenizer
        if not hasattr(tok, "encode_weighted"):
            raise ConfigError("textual inversion needs the model's CLIP tokenizer")
        c = model.text_encoder.config
        return cls(tok, c.vocab_size, c.width, folder)

    # ------------------------------------------------------------------ contents
    @property
    def names(self) -> list[str]:
        """Every name a prompt may use (loaded ones and the folder's files)."""
        return sorted(set(self._loaded) | set(self._files))

    @property
    def vectors(self) -> Tensor | None:
        """(k, width) vectors of ids ``vocab_size .. vocab_size + k - 1``; None if none."""
        if self._vectors is None and self._entries:
            self._vectors = torch.cat([e.vectors for e in self._entries])
        return self._vectors

    def add(self, embedding: Embedding) -> Embedding:
        """Make ``embedding`` usable by its name (replacing one of the same name)."""
        if embedding.width != self.width:
            where = f" ({embedding.path})" if embedding.path is not None else ""
            raise CheckpointError(
                f"embedding {embedding.name}{where} has {embedding.width}-wide vectors but this "
                f"model's text encoder is {self.width} wide{_family_hint(embedding.width)}; "
                "use an embedding made for this model"
            )
        start = self._offsets[-1] + self._entries[-1].count if self._entries else 0
        self._entries.append(embedding)
        self._offsets.append(start)
        self._vectors = None
        self._loaded[embedding.name] = len(self._entries) - 1
        self._files.pop(embedding.name, None)
        self._register(embedding.name)
        return embedding

    def load(self, path: str | os.PathLike, name: str | None = None) -> Embedding:
        """Read an embedding file (:func:`read_embedding`) and :meth:`add` it."""
        return self.add(read_embedding(path, name))

    def get(self, name: str) -> Embedding | None:
        """The embedding called ``name`` (read from the folder if needed), or None."""
        if name not in self._loaded:
            if name in self._clashes:
                paths = ", ".join(map(str, self._clashes[name]))
                raise ConfigError(
                    f"two embedding files are named {name}: {paths}; rename one of them"
                )
            path = self._files.get(name)
            if path is None:
                return None
            self.load(path, name)
        return self._entries[self._loaded[name]]

    def rescan(self) -> None:
        """Read the folder's file list again (files added or removed since)."""
        if self.folder is None:
            return
        found: dict[str, list[Path]] = {}
        for root, dirs, files in os.walk(self.folder, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                p = Path(root) / f
                if p.suffix.lower() in EMBEDDING_SUFFIXES:
                    found.setdefault(p.stem, []).append(p)
        self._clashes = {n: ps for n, ps in found.items() if len(ps) > 1}
        self._files = {n: ps[0] for n, ps in found.items() if n not in self._loaded}
        for name in self._files:
            self._register(name)
        self._folder_mtime = _mtime(self.folder)

    # ------------------------------------------------------------------ prompts
    def __call__(self, ids: list[int]) -> list[int | tuple[int, ...]]:
        """``ids`` with each embedding name replaced by a tuple of its vectors' ids."""
        if self.folder is not None and _mtime(self.folder) != self._folder_mtime:
            self.rescan()
        out: list[int | tuple[int, ...]] = []
        i = 0
        while i < len(ids):
            match = self._match(ids, i)
            if match is None:
                out.append(ids[i])
                i += 1
                continue
            length, name = match
            embedding = self.get(name)
            if embedding is None:  # a folder file removed since the scan: a plain word
                out.append(ids[i])
                i += 1
                continue
            first = self.vocab_size + self._offsets[self._loaded[name]]
            out.append(tuple(range(first, first + embedding.count)))
            i += length
        return out

    def used(self, ids: Iterable[Tensor | Sequence[int]]) -> list[Embedding]:
        """The embeddings whose vectors' ids occur in ``ids`` (token rows), in order."""
        seen: dict[int, Embedding] = {}
        for row in ids:
            values = row.flatten().tolist() if isinstance(row, Tensor) else list(row)
            for token in values:
                if token >= self.vocab_size:
                    k = self._entry_of(token - self.vocab_size)
                    seen.setdefault(k, self._entries[k])
        return list(seen.values())

    # ------------------------------------------------------------------ internals
    def _register(self, name: str) -> None:
        ids = self._name_ids.get(name)
        if ids is None:
            ids = tuple(self.tokenizer.encode(name))
            self._name_ids[name] = ids
        if not ids:
            return
        entries = [e for e in self._lookup.get(ids[0], []) if e[1] != name]
        entries.append((ids, name))
        entries.sort(key=lambda e: len(e[0]), reverse=True)  # longest name first (A1111)
        self._lookup[ids[0]] = entries

    def _match(self, ids: list[int], i: int) -> tuple[int, str] | None:
        for name_ids, name in self._lookup.get(ids[i], ()):
            if tuple(ids[i : i + len(name_ids)]) == name_ids and (
                name in self._loaded or name in self._files or name in self._clashes
            ):
                return len(name_ids), name
        return None

    def piece_of(self, offset: int) -> str:
        """A BPE-like piece for vector ``offset`` (id ``vocab_size + offset``): the
        embedding's name, ending a word (``</w>``) at its last vector."""
        k = self._entry_of(offset)
        entry = self._entries[k]
        last = offset == self._offsets[k] + entry.count - 1
        return entry.name + ("</w>" if last else "")

    def _entry_of(self, offset: int) -> int:
        for k in range(len(self._offsets) - 1, -1, -1):
            if self._offsets[k] <= offset:
                return k
        raise IndexError(offset)


def _mtime(folder: Path) -> float | None:
    try:
        return folder.stat().st_mtime
    except OSError:
        return None


def _family_hint(width: int) -> str:
    return {768: " (an SD 1.x embedding?)", 1024: " (an SD 2.x embedding?)"}.get(width, "")


__all__ = ["EmbeddingSet"]
