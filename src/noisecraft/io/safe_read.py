"""The one place that opens checkpoint files of foreign formats, safely.

Two formats reach us from model sites:

* ``.safetensors`` (format: https://github.com/huggingface/safetensors, "Format"): 8 bytes
  little-endian ``N``, ``N`` bytes of JSON ``{"name": {"dtype", "shape", "data_offsets":
  [begin, end]}, "__metadata__": {str: str}}``, then the tensor bytes, offsets relative to
  the start of that byte buffer. :func:`read_safetensors` checks the header itself (length,
  JSON, dtypes, offsets against ``dtype * shape``, overlaps, the file size) before handing the
  file to ``safetensors.safe_open``, so a truncated download or a lying header gives a
  one-line :class:`~noisecraft.errors.CheckpointError` that names the file and the problem
  instead of a Rust panic or an out-of-memory kill. Tensors are then memory-mapped, not
  copied.
* ``.ckpt`` / ``.pt`` / ``.pth`` (PyTorch pickles, zip or legacy format): read by
  :func:`read_ckpt` with ``torch.load(weights_only=True)`` (memory-mapped for the zip format).
  A pickle that would call anything outside torch's allow-list (plus a few harmless
  globals that real Stable Diffusion ``.ckpt`` files hold: numpy scalars, PyTorch Lightning's
  ``ModelCheckpoint`` callback state) is refused before anything runs.

:func:`read_checkpoint` picks the reader from the file's first bytes, not its suffix.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from noisecraft.errors import CheckpointError

#: Largest safetensors header accepted (the format's own reference reader caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # pickle protocol >= 2 starts with PROTO (torch's legacy format too)

# Keys a .ckpt nests its state dict under: Lightning's "state_dict", plain "model", DeepSpeed
# / DataParallel "module".
_NESTING_KEYS = ("state_dict", "model", "module")


# ---------------------------------------------------------------------------- safetensors


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path} {problem}")


def check_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate a ``.safetensors`` file's header against the file; return (entries, metadata).

    ``entries`` maps each tensor name to its header entry. Raises :class:`CheckpointError`
    for: a file shorter than 8 bytes, a header length beyond the file or
    :data:`MAX_HEADER_BYTES` ("lying header"), JSON that does not parse, an unknown dtype, a
    malformed shape, ``data_offsets`` that are out of order, overlap, leave holes or disagree
    with ``dtype * shape``, and tensor data that runs past the end of the file (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"is truncated or corrupt: {size} bytes, less than a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _fail(
                path,
                f"has a lying header: it claims {n} bytes of header but the file has {size} "
                f"bytes{' (over the 100 MB cap)' if n > MAX_HEADER_BYTES else ''}; the file "
                "is truncated or not a .safetensors file; download it again",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"has a corrupt header (not JSON: {e}); download it again") from None
    if not isinstance(header, dict):
        raise _fail(path, "has a corrupt header (not a JSON object); download it again")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "has corrupt metadata (must map strings to strings)")

    buffer = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(path, f"has a corrupt header entry for tensor {name}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(path, f"has tensor {name} of unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(path, f"has tensor {name} with a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _fail(path, f"has tensor {name} with malformed data_offsets {offsets!r}")
        begin, end = offsets
        want = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != want:
            raise _fail(
                path,
                f"is corrupt: tensor {name} ({dtype} {shape}) needs {want} bytes but its "
                f"data_offsets span {end - begin}",
            )
        spans.append((begin, end, name))

    spans.sort()
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise _fail(path, f"is corrupt: tensors {previous} and {name} overlap")
        if begin > position:
            raise _fail(
                path, f"is corrupt: {begin - position} bytes before tensor {name} are unused"
            )
        position, previous = end, name
    if position > buffer:
        last = spans[-1][2]
        raise _fail(
            path,
            f"is truncated or corrupt: tensor {last} ends at byte {8 + n + position} but the "
            f"file has {size} bytes; download it again",
        )
    if position < buffer:
        raise _fail(
            path,
            f"is corrupt: {buffer - position} bytes after the last tensor; download it again",
        )
    return header, metadata


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file, header validated, no tensor read."""
    return check_safetensors_header(_existing(path))[1]


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a ``.safetensors`` file (memory-mapped) and its string metadata.

    The header is validated first (:func:`check_safetensors_header`); every problem is a
    one-line :class:`CheckpointError` naming the file.
    """
    from safetensors import SafetensorError, safe_open

    path = _existing(path)
    _, metadata = check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _fail(path, f"could not be read ({_one_line(e)}); download it again") from None
    return tensors, metadata


# ---------------------------------------------------------------------------- pickles


class _Opaque:
    """Stand-in for objects of allow-listed classes whose code we do not import (e.g.
    Lightning's ``ModelCheckpoint`` in a ``callbacks`` entry): keeps the pickled state as
    plain data and runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _extra_safe_globals() -> list[Any]:
    """Globals beyond torch's allow-list that real SD ``.ckpt`` files reference; each only
    builds plain data (AUTOMATIC1111's ``modules/safe.py`` allows the same)."""
    extra: list[Any] = [
        (_Opaque, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (set, "__builtin__.set"),
    ]
    try:
        import numpy as np

        scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
        reconstruct = (
            np._core.multiarray._reconstruct
            if hasattr(np, "_core")
            else np.core.multiarray._reconstruct
        )
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            extra += [(scalar, f"{module}.scalar"), (reconstruct, f"{module}._reconstruct")]
        extra += [np.dtype, np.ndarray]
        extra += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i4", "i8", "u1", "b1")]
    except (ImportError, AttributeError):  # pragma: no cover - numpy is a dependency
        pass
    return extra


_GLOBAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)"),
    re.compile(r"(?:new object|build) .* but got (.+)$"),
)


_HARMLESS_MODULES = ("torch", "collections", "numpy", "_codecs", "builtins", "__builtin__")


def _pickled_globals(path: Path) -> list[str]:
    """Globals a pickle file names, found by disassembling it (``pickletools``; nothing runs).

    For the zip format the ``data.pkl`` member is read; otherwise the file's consecutive
    pickles (torch's legacy format writes several). ``STACK_GLOBAL`` takes its module and
    name from the two strings pushed before it.
    """
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(member)
        else:
            data = path.read_bytes()
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # raw tensor bytes after the last pickle, or a corrupt pickle
            break
    return found


def _refused_global(message: str, path: Path) -> str:
    """The global to name in the refusal: the first one outside torch / numpy / builtins
    that the pickle names (the payload), else the one torch's unpickler stopped at."""
    for name in _pickled_globals(path):
        if name.split(".")[0] not in _HARMLESS_MODULES:
            return name
    for pattern in _GLOBAL_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1).strip().rstrip(".")
    return "a function outside the allow-list"


def _unwrap(obj: Any) -> Any:
    """Descend ``state_dict`` / ``model`` / ``module`` nesting until a level holds tensors."""
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def read_ckpt(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors of a PyTorch pickle checkpoint (``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``).

    ``torch.load(map_location="cpu", weights_only=True)``, memory-mapped for the zip format
    (``mmap`` does not apply to the legacy format). A pickle that needs a global outside the
    allow-list (a ``__reduce__`` payload such as ``os.system``) is refused before it runs.
    The state dict is unwrapped from ``state_dict`` / ``model`` / ``module`` nesting;
    non-tensor entries are dropped. The second value holds the outer level's scalar entries
    (e.g. Lightning's ``global_step``) as strings, as safetensors metadata would.
    """
    path = _existing(path)
    obj = load_pickle(path)
    outer = obj if isinstance(obj, Mapping) else {}
    metadata = {
        str(k): str(v)
        for k, v in outer.items()
        if isinstance(v, (int, float, str)) and not isinstance(v, bool)
    }
    sd = _unwrap(obj)
    if not isinstance(sd, Mapping):
        raise _fail(path, f"holds a {type(sd).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise _fail(path, "holds no tensors; it is not a model checkpoint")
    return tensors, metadata


def load_pickle(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    mmap: bool | None = None,
    refused: str = "convert it with a trusted tool or use a .safetensors file",
    corrupt: str = "download it again",
) -> Any:
    r"""``torch.load(path, weights_only=True)`` with one-line :class:`CheckpointError`\ s.

    A pickle that needs a global outside torch's allow-list (plus :func:`_extra_safe_globals`)
    is refused before anything runs, naming the global; a truncated or corrupt file is
    refused with the reader's first sentence. ``refused`` / ``corrupt``: what the user
    should do in each case. ``mmap`` (None: for the zip format) memory-maps the tensors.
    """
    import pickle

    path = _existing(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise _fail(path, f"is empty (0 bytes); {corrupt}")
    is_zip = head == _ZIP_MAGIC
    try:
        with torch.serialization.safe_globals(_extra_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4" etc.
            if path.suffix.lower() == ".safetensors":  # torch.load would hand it to safetensors
                with open(path, "rb") as f:
                    return torch.load(f, map_location=map_location, weights_only=True)
            use_mmap = is_zip if mmap is None else mmap and is_zip
            return torch.load(
                str(path), map_location=map_location, weights_only=True, mmap=use_mmap
            )
    except pickle.UnpicklingError as e:
        message = _one_line(e)
        opcode = re.search(r"Unsupported operand (\d+)", str(e))
        payload = any(g.split(".")[0] not in _HARMLESS_MODULES for g in _pickled_globals(path))
        if opcode and not payload:  # not a pickle (a text file), or a corrupt one
            raise _fail(
                path,
                f"is not a PyTorch checkpoint or is corrupt (pickle opcode {opcode.group(1)} is "
                f"not allowed); {corrupt}",
            ) from None
        if "Weights only load failed" in str(e) or "GLOBAL" in message or "allowlisted" in message:
            culprit = _refused_global(str(e), path)
            raise CheckpointError(
                f"refusing to load {path}: its pickle calls {culprit} (code could run); {refused}"
            ) from None
        raise _fail(path, f"is truncated or corrupt ({message}); {corrupt}") from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        MemoryError,
        RecursionError,
    ) as e:
        detail = _one_line(e)
        if isinstance(e, (KeyError, IndexError, EOFError)) or not detail:  # "101" says nothing
            detail = f"{type(e).__name__} {detail}".strip()
        raise _fail(path, f"is truncated or corrupt ({detail}); {corrupt}") from None


# ---------------------------------------------------------------------------- dispatch


def sniff_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"ckpt"`` or raise: decided by the first bytes, not the suffix.

    Zip (``PK\\x03\\x04``, torch >= 1.6) or a pickle (``\\x80`` protocol byte, torch's legacy
    format) is a ``.ckpt``; an 8-byte length followed by ``{`` is a ``.safetensors`` file.
    """
    path = _existing(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise _fail(path, "is empty (0 bytes), not a checkpoint; download it again")
    if head[:4] == _ZIP_MAGIC or (head[0] == _PICKLE_PROTO and len(head) > 1 and 2 <= head[1] <= 5):
        return "ckpt"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise _fail(
        path,
        "is not a checkpoint: neither a .safetensors file nor a PyTorch .ckpt/.pt pickle "
        f"(it starts with bytes {head[:8].hex(' ')})",
    )


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` or PyTorch checkpoint (see the readers)."""
    kind = sniff_format(path)
    return read_safetensors(path) if kind == "safetensors" else read_ckpt(path)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the path of a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path")
    return path


def _one_line(e: BaseException) -> str:
    """The first sentence of an exception's message, on one line."""
    text = " ".join(str(e).split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return first[:200] + ("..." if len(first) > 200 else "")


__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "check_safetensors_header",
    "load_pickle",
    "read_checkpoint",
    "read_ckpt",
    "read_safetensors",
    "read_safetensors_metadata",
    "sniff_format",
]
