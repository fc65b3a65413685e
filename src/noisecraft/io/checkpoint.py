"""The native checkpoint: one ``.safetensors`` file per model (DESIGN.md contract 7).

The tensors are the model's ``state_dict`` (for a trained model: its EMA
weights, which are what sampling uses). The safetensors metadata holds one
key, ``noisecraft``, a JSON document::

    {"format": 1, "kind": "unet", "config": {...model config...},
     "diffusion": {...schedule, prediction, ...}, "training": {...}, "produced_by": "..."}

so that a file alone is enough to rebuild and sample the model. Files are
written atomically; reading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from noisecraft._version import __version__
from noisecraft.errors import CheckpointError
from noisecraft.io.atomic import atomic_path, check_writable

FORMAT_VERSION = 1
METADATA_KEY = "noisecraft"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself (the parsed ``noisecraft`` metadata)."""

    kind: str
    config: dict[str, Any]
    diffusion: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    produced_by: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "kind": self.kind,
                "config": self.config,
                "diffusion": self.diffusion,
                "training": self.training,
                "produced_by": self.produced_by or f"noisecraft {__version__}",
            },
            sort_keys=True,
        )


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    info: CheckpointInfo,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``state_dict`` and ``info`` to one ``.safetensors`` file, atomically."""
    path = check_writable(path, overwrite=overwrite)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: info.to_json()})
    return path


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read only the metadata of a native checkpoint (no tensors are loaded)."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
    return _parse_info(path, meta)


def load_checkpoint(
    path: str | os.PathLike, *, expect_kind: str | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Load tensors and metadata; raise :class:`CheckpointError` on a file of another kind."""
    info = read_info(path)
    if expect_kind is not None and info.kind != expect_kind:
        raise CheckpointError(
            f"{path} holds a '{info.kind}' model, but a '{expect_kind}' checkpoint was expected"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} could not be read ({e}); the file may be truncated"
        ) from None
    return tensors, info


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; give the path of a .safetensors file")
    return path


def _parse_info(path: Path, meta: dict[str, str]) -> CheckpointInfo:
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path} has no noisecraft metadata; it is not a native checkpoint "
            "(train one with `noisecraft train` or convert it first)"
        )
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt noisecraft metadata ({e})") from None
    if doc.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer noisecraft (format {doc['format']}); upgrade noisecraft"
        )
    return CheckpointInfo(
        kind=doc.get("kind", "unknown"),
        config=doc.get("config", {}),
        diffusion=doc.get("diffusion", {}),
        training=doc.get("training", {}),
        produced_by=doc.get("produced_by", ""),
    )
