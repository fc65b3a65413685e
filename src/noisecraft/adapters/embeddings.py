"""Textual-inversion embedding files: the formats users download, read safely.

Textual inversion (Gal et al. 2022, "An Image is Worth One Word", sec. 3) learns ``n`` new
token vectors ``v_1..v_n`` for a frozen text encoder; a prompt that names the embedding gets
those vectors in place of the name's token embeddings (eq. 2: only ``v`` is optimised). The
files hold nothing else:

* AUTOMATIC1111 ``.pt``: ``{"string_to_param": {"*": tensor (n, d)}, "string_to_token":
  ..., "name": ..., "step": ...}`` -- a pickle, read with ``torch.load(weights_only=True)``
  (:func:`noisecraft.io.safe_read.load_pickle`); a pickle that would call code is refused.
* ``.safetensors`` with ``emb_params`` (n, d) (kohya's and A1111-compatible tools').
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": tensor (d,) or (n, d)}``.

``d`` is the text encoder's width: 768 for SD 1.x, 1024 for SD 2.x (checked where the
embedding meets a model, :mod:`noisecraft.adapters.embedding_set`). The embedding's name --
the word that triggers it in a prompt -- is the file's stem, as in A1111 (so renaming the
file renames the word), or the token a diffusers file names when it is loaded on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from noisecraft.errors import CheckpointError
from noisecraft.io.checkpoint import CheckpointInfo, save_checkpoint
from noisecraft.io.file_hash import sha256_file, short_hash
from noisecraft.io.safe_read import load_pickle, read_safetensors, sniff_format

#: File suffixes an embedding folder is searched for (A1111 also reads embeddings hidden in
#: PNG / WebP images; noisecraft does not).
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
#: Most vectors one embedding may have: A1111 puts all of them into one 75-token chunk.
MAX_VECTORS = 75


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding: ``vectors`` (n, d) float32 named ``name``.

    ``path``: the file it came from (None if built in memory); ``step``: the training step
    the file records, if any.
    """

    name: str
    vectors: Tensor
    path: Path | None = None
    step: int | None = None

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def count(self) -> int:
        """Vectors (prompt tokens) the embedding takes."""
        return int(self.vectors.shape[0])

    def short_hash(self) -> str | None:
        """A1111's ``TI hashes`` value: the first 12 hex of the file's SHA-256 (None without
        a file). Computed on first use."""
        if self.path is None:
            return None
        cached = self.__dict__.get("_short_hash")
        if cached is None:
            cached = short_hash(sha256_file(self.path))
            object.__setattr__(self, "_short_hash", cached)
        return cached


def read_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """Read an embedding file of any format of the module docstring.

    ``name``: the word that triggers it; None = the token a diffusers file names, else the
    file's stem (A1111). Raises :class:`CheckpointError` in one line for a file that is not
    an embedding (or a pickle that would run code).
    """
    path = Path(path)
    if sniff_format(path) == "safetensors":
        obj: Any = read_safetensors(path)[0]
    else:
        obj = load_pickle(
            path,
            refused="only load embeddings you trust, or get a .safetensors one",
            corrupt="download it again",
        )
    vectors, token, step = _parse(obj, path)
    return Embedding(name=name or token or path.stem, vectors=vectors, path=path, step=step)


def _parse(obj: Any, path: Path) -> tuple[Tensor, str | None, int | None]:
    """(vectors (n, d), the file's own token or None, step or None) of a loaded file."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a textual-inversion embedding"
        )
    step = obj.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    token = None
    if "string_to_param" in obj:  # A1111 / original textual inversion
        params = obj["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise CheckpointError(
                f"{path}: string_to_param must hold one tensor, it holds "
                f"{len(params) if isinstance(params, Mapping) else type(params).__name__}"
            )
        tensor = next(iter(params.values()))
    elif "emb_params" in obj:  # A1111-compatible .safetensors
        tensor = obj["emb_params"]
    elif {"clip_l", "clip_g"} <= set(obj):
        raise CheckpointError(
            f"{path} is an SDXL embedding (clip_l + clip_g); noisecraft's models take SD 1.x / "
            "2.x embeddings (one tensor)"
        )
    else:
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if len(tensors) != 1 or len(obj) != 1:
            keys = sorted(map(str, obj))[:4]
            raise CheckpointError(
                f"{path} is not a textual-inversion embedding: expected string_to_param, "
                f"emb_params or one token's tensor, found keys {keys}"
            )
        token, tensor = next(iter(tensors.items()))  # diffusers learned_embeds
    return _vectors(tensor, path), token, step


def _vectors(tensor: Any, path: Path) -> Tensor:
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise CheckpointError(f"{path}: the embedding is not a floating-point tensor")
    v = tensor.detach()
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise CheckpointError(
            f"{path}: an embedding is (vectors, width), got shape {tuple(tensor.shape)}"
        )
    if v.shape[0] > MAX_VECTORS:
        raise CheckpointError(
            f"{path} has {v.shape[0]} vectors, more than the {MAX_VECTORS} tokens of a prompt "
            "chunk; it cannot be used"
        )
    v = v.to(torch.float32).clone()
    if not torch.isfinite(v).all():
        raise CheckpointError(f"{path}: the embedding holds nan or inf; it is corrupt")
    return v


def save_embedding(
    embedding: Embedding,
    path: str | os.PathLike,
    *,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``embedding`` as an A1111-format ``.safetensors`` file (``emb_params`` (n, d)),
    atomically. Its metadata is a native checkpoint's (kind ``"textual_inversion"``: name,
    vectors, width, and what trained it), which A1111 and diffusers ignore."""
    info = CheckpointInfo(
        kind="textual_inversion",
        config={"name": embedding.name, "vectors": embedding.count, "width": embedding.width},
        training=dict(training or {}),
    )
    vectors = embedding.vectors.detach().to(torch.float32).contiguous().cpu()
    return save_checkpoint(path, {"emb_params": vectors}, info, overwrite=overwrite)


__all__ = [
    "EMBEDDING_SUFFIXES",
    "MAX_VECTORS",
    "Embedding",
    "read_embedding",
    "save_embedding",
]
