"""The file hashes AUTOMATIC1111 writes into a PNG's parameters.

A1111 (``modules/hashes.py``) names an extra network by a hash of its file:

* ``sha256_file``: SHA-256 of the whole file (``calculate_sha256``); textual-inversion
  embeddings are hashed this way (``TI hashes: "name: <first 12 hex>"``).
* ``addnet_hash``: for ``.safetensors`` files, SHA-256 of the tensor bytes only, after the
  8-byte length and the JSON header (kohya's ``addnet_hash_safetensors``), so editing the
  metadata keeps the hash; A1111 hashes LoRA ``.safetensors`` files this way
  (``Lora hashes: "name: <first 12 hex>"``) and other LoRA files with ``sha256_file``.

``short_hash`` is the 12-character prefix A1111 shows (``shorthash``).

``legacy_model_hash`` is A1111's old model hash (``sd_models.model_hash``): the first 8 hex
digits of the SHA-256 of the 64 KiB at offset 1 MiB. The ControlNet extension still names
its models by it (``control_v11p_sd15_canny [d14c016b]``).
"""

from __future__ import annotations

import hashlib
import os
import struct

_BLOCK = 1 << 20


def _sha256_from(path: str | os.PathLike, offset: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the whole file."""
    return _sha256_from(path, 0)


def addnet_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a ``.safetensors`` file's tensor bytes (after the header)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        return sha256_file(path)
    (n,) = struct.unpack("<Q", head)
    return _sha256_from(path, 8 + n)


def network_hash(path: str | os.PathLike) -> str:
    """The hash A1111 gives a LoRA file: ``addnet_hash`` for safetensors, else the file's."""
    with open(path, "rb") as f:
        is_zip_or_pickle = f.read(2) in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04")
    return sha256_file(path) if is_zip_or_pickle else addnet_hash(path)


def legacy_model_hash(path: str | os.PathLike | None) -> str | None:
    """A1111's legacy 8-hex model hash (module docstring); None without a file."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def short_hash(full: str) -> str:
    """The 12-character prefix A1111 writes (``shorthash``)."""
    return full[:12]
