"""The files of a diffusers folder: JSON configs and each part's weights (``.safetensors`` or
``.bin``, variants such as ``fp16``, sharded with an index). ``.bin`` files are read with
``torch.load(weights_only=True)`` only. The folder itself is written atomically by
:func:`noisecraft.io.atomic.atomic_folder`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from noisecraft.errors import CheckpointError

__all__ = [
    "DIFFUSERS_VERSION",
    "MODEL_STEMS",
    "PARTS_HINT",
    "one_line",
    "read_json",
    "read_weights",
    "write_json",
]

#: The diffusers version whose loader the written folders are tested against.
DIFFUSERS_VERSION = "0.42.1"
PARTS_HINT = "a diffusers folder needs unet/, vae/, text_encoder/, tokenizer/ (and scheduler/)"
#: (safetensors stem, .bin stem) of each part's weights, as diffusers / transformers name them.
MODEL_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model")
_WEIGHT_STEMS = {
    "unet": MODEL_STEMS,
    "vae": MODEL_STEMS,
    "text_encoder": ("model", "pytorch_model"),
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object read from ``path``; every problem is a one-line :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found; {PARTS_HINT}, each with its config file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file ({one_line(e)})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} is not a JSON object; expected a diffusers config")
    return doc


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (or its class name)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def write_json(path: Path, doc: Any) -> None:
    """``doc`` as indented UTF-8 JSON, as diffusers writes its configs."""
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _candidates(stem: str, bin_stem: str, variant: str | None) -> list[str]:
    if variant:
        return [
            f"{stem}.{variant}.safetensors",
            f"{stem}.safetensors.index.{variant}.json",
            f"{bin_stem}.{variant}.bin",
            f"{bin_stem}.bin.index.{variant}.json",
        ]
    return [
        f"{stem}.safetensors",
        f"{stem}.safetensors.index.json",
        f"{bin_stem}.bin",
        f"{bin_stem}.bin.index.json",
    ]


def read_weights(
    folder: Path, variant: str | None, stems: tuple[str, str] | None = None
) -> tuple[list[Path], dict[str, Tensor]]:
    """(files read, state dict) of one part: safetensors, ``.bin`` or a sharded index.
    ``stems``: the (safetensors, .bin) file stems; default: those of the part the folder's
    name says (``unet``, ``vae``, ``text_encoder``)."""
    stem, bin_stem = stems or _WEIGHT_STEMS[folder.name]
    names = _candidates(stem, bin_stem, variant)
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        what = f"{variant} weights" if variant else "weights"
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        hint = f" (found {', '.join(others)}; pass the matching variant)" if others else ""
        raise CheckpointError(f"{folder / names[0]} not found: no {what} in {folder}{hint}")
    if not found.name.endswith(".json"):
        return [found], _load_tensors(found)
    index = read_json(found)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{found} has no weight_map; expected a sharded-weights index")
    shards = [folder / name for name in dict.fromkeys(weight_map.values())]
    state: dict[str, Tensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard} not found; {found} lists it as a shard")
        state.update(_load_tensors(shard))
    return [found, *shards], state


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} could not be read ({one_line(e)}); the file may be truncated or not "
            "a plain weights file"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state
