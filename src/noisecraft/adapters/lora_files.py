"""LoRA files: read kohya / A1111 and diffusers / PEFT layouts, write kohya's.

A file holds, per patched layer NAME (see :mod:`.lora_keys` for the names):

* kohya / A1111: ``NAME.lora_down.weight``, ``NAME.lora_up.weight``, ``NAME.alpha`` (a 0-d
  tensor; absent = the rank), LyCORIS' Tucker core ``NAME.lora_mid.weight``;
* diffusers / PEFT: ``NAME.lora_A.weight`` (down), ``NAME.lora_B.weight`` (up), optionally
  ``NAME.alpha`` (network alphas of converted files); PEFT's alpha otherwise equals the rank;
* diffusers' older attention-processor layout: ``...attn1.processor.to_q_lora.down.weight``
  / ``.up.weight`` (``to_out_lora`` = ``to_out.0``), ``...self_attn.to_q_lora.down.weight``
  (= ``q_proj``) and ``...lora_linear_layer.down.weight`` in text encoders.

Files are read through :func:`noisecraft.io.safe_read.read_checkpoint` (``.safetensors``, or a
``.pt`` / ``.ckpt`` pickle through ``torch.load(weights_only=True)``). A file whose layers do
not all exist in the model with the right shapes (a LoRA for SD 2.x or SDXL on SD 1.x) is
refused in one line that counts what does not fit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from noisecraft.adapters.lora_keys import diffusers_names, kohya_name, lora_targets, name_index
from noisecraft.adapters.lora_module import LoRAModule
from noisecraft.errors import CheckpointError
from noisecraft.io.atomic import atomic_path
from noisecraft.io.safe_read import read_checkpoint

__all__ = [
    "LoRAFile",
    "LoRAModules",
    "lora_modules_of",
    "read_lora",
    "write_kohya_lora",
]

# (regex on a key's tail, role); the name is what comes before the tail
_ROLES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), role)
    for p, role in (
        (r"\.lora_down\.weight$", "down"),
        (r"\.lora_up\.weight$", "up"),
        (r"\.lora_mid\.weight$", "mid"),
        (r"\.lora_A(?:\.[^.]+)?\.weight$", "down"),
        (r"\.lora_B(?:\.[^.]+)?\.weight$", "up"),
        (r"\.lora(?:_linear_layer)?\.down\.weight$", "down"),
        (r"\.lora(?:_linear_layer)?\.up\.weight$", "up"),
        (r"_lora\.down\.weight$", "down"),  # processor.to_q_lora.down.weight
        (r"_lora\.up\.weight$", "up"),
        (r"\.alpha$", "alpha"),
    )
)
#: Keys of adapter kinds that are not LoRA (LyCORIS LoHa / LoKr, DoRA): named in the refusal.
_OTHER_KINDS = {
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}
# older diffusers layout: attention-processor names -> module names
_PROCESSOR = (
    (re.compile(r"\.processor\.to_(q|k|v)$"), r".to_\1"),
    (re.compile(r"\.processor\.to_out$"), ".to_out.0"),
    (re.compile(r"\.self_attn\.to_(q|k|v)$"), r".self_attn.\1_proj"),
    (re.compile(r"\.self_attn\.to_out$"), ".self_attn.out_proj"),
)


class LoRAModules(dict):
    """``dict[str, LoRAModule]`` keyed by our module keys, that also knows the U-Net config
    its ``unet.`` keys belong to (:func:`write_kohya_lora` needs it for diffusers' names)."""

    def __init__(self, modules: Mapping[str, LoRAModule] = (), unet_config: Any = None):
        super().__init__(modules)
        self.unet_config = unet_config


@dataclass(frozen=True)
class LoRAFile:
    """A LoRA file read for one model: ``name`` (the file's stem, A1111's name), ``path``,
    ``modules`` keyed by our module keys, and the file's ``metadata``."""

    name: str
    path: Path
    modules: dict[str, LoRAModule]
    metadata: dict[str, str]


def _split(key: str) -> tuple[str, str] | None:
    for pattern, role in _ROLES:
        m = pattern.search(key)
        if m is not None:
            name = key[: m.start()]
            for old, new in _PROCESSOR:
                name = old.sub(new, name)
            return name, role
    return None


def _fits(lora: LoRAModule, weight_shape: torch.Size) -> bool:
    out, inp = int(weight_shape[0]), int(weight_shape[1])
    kernel = tuple(int(s) for s in weight_shape[2:]) or (1, 1)
    return (lora.out_features, lora.in_features, lora.kernel_size) == (out, inp, kernel)


def _guess(keys: list[str], dims: set[int], model: Any) -> str:
    """A guess at the architecture a LoRA is for, from what does not fit."""
    ours = {model.text_encoder.config.width}
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys) or 2048 in dims - ours:
        return " (an SDXL LoRA?)"
    if 1024 in dims - ours:
        return " (an SD 2.x LoRA?)"
    if 768 in dims - ours:
        return " (an SD 1.x LoRA?)"
    return ""


def _peft_alphas(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` (PEFT ``LoraConfig`` s under ``unet.`` /
    ``text_encoder.``): component -> (``lora_alpha``, ``alpha_pattern``)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out = {}
    for component in ("unet", "text_encoder"):
        alpha = config.get(f"{component}.lora_alpha")
        pattern = config.get(f"{component}.alpha_pattern") or {}
        if alpha is not None or pattern:
            out[component] = (alpha, pattern)
    return out


def _peft_alpha(name: str, alphas: Mapping[str, Any]) -> float | None:
    """PEFT's alpha of a module named ``name`` (``unet.down_blocks...``): its
    ``alpha_pattern`` entry (a regex matching the name's tail), else ``lora_alpha``."""
    component, _, path = name.partition(".")
    if component not in alphas:
        return None
    alpha, pattern = alphas[component]
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    return None if alpha is None else float(alpha)


def lora_modules_of(
    state_dict: Mapping[str, Tensor],
    model: Any,
    source: str = "the LoRA",
    metadata: Mapping[str, str] | None = None,
) -> dict[str, LoRAModule]:
    """The LoRA modules of a file's tensors, keyed by our module keys (module docstring);
    ``metadata``: the file's, for diffusers' ``lora_adapter_metadata`` (PEFT alphas).
    Raises :class:`CheckpointError` in one line when a key names no layer of ``model``, a
    module does not fit its layer's shape, or the file holds no LoRA at all."""
    kinds = {kind for k in state_dict for tag, kind in _OTHER_KINDS.items() if tag in k}
    if kinds:
        raise CheckpointError(
            f"{source}: a {'/'.join(sorted(kinds))} file, not a LoRA (lora_down / lora_up); "
            "noisecraft reads LoRA and LoCon files only"
        )
    index = name_index(model)
    peft = _peft_alphas(metadata)
    parts: dict[str, dict[str, Tensor]] = {}
    names: dict[str, list[str]] = {}  # file's module name -> its keys
    unmatched: list[str] = []
    for key, value in state_dict.items():
        split = _split(key)
        if split is None:
            unmatched.append(key)
            continue
        name, role = split
        parts.setdefault(name, {})[role] = value
        names.setdefault(name, []).append(key)
    if not any({"down", "up"} <= set(p) for p in parts.values()):
        raise CheckpointError(
            f"{source}: holds no LoRA weights (lora_down / lora_up or lora_A / lora_B keys); "
            "is it a LoRA file?"
        )
    targets = lora_targets(model)
    modules: dict[str, LoRAModule] = {}
    misfits: list[tuple[str, LoRAModule, torch.Size]] = []
    dims: set[int] = set()
    for name, p in parts.items():
        ours = index.get(name)
        if ours is None or not {"down", "up"} <= set(p):
            unmatched.extend(names[name])
            if "down" in p:
                dims.add(int(p["down"].shape[1]))
            continue
        alpha = p.get("alpha")
        try:
            lora = LoRAModule(
                down=p["down"],
                up=p["up"],
                alpha=_peft_alpha(name, peft)
                if alpha is None
                else float(alpha.float().reshape(-1)[0]),
                mid=p.get("mid"),
            )
        except ValueError as e:
            raise CheckpointError(f"{source}: {name}: {e}") from None
        shape = targets[ours].weight.shape
        if not _fits(lora, shape):
            misfits.append((name, lora, shape))
            dims.update((lora.in_features, lora.out_features))
            continue
        modules[ours] = lora
    total = len(state_dict)
    if unmatched or misfits:
        guess = _guess(list(state_dict), dims, model)
        said = []
        if unmatched:
            said.append(f"{len(unmatched)} of {total} LoRA keys match no layer of this model")
        if misfits:
            name, lora, shape = misfits[0]
            n = sum(len(names[m[0]]) for m in misfits)
            said.append(
                f"{n} of {total} do not fit their layer's shape (e.g. {name}: "
                f"{lora.out_features}x{lora.in_features} for a {'x'.join(map(str, shape))} "
                "weight)"
            )
        raise CheckpointError(f"{source}: {'; '.join(said)}{guess}; it does not fit this model")
    return modules


def read_lora(path: str | os.PathLike, model: Any) -> LoRAFile:
    """Read a LoRA file (``.safetensors``, ``.pt``, ``.ckpt``) for ``model``
    (:func:`lora_modules_of`)."""
    path = Path(path)
    tensors, metadata = read_checkpoint(path)
    return LoRAFile(path.stem, path, lora_modules_of(tensors, model, path.name, metadata), metadata)


def write_kohya_lora(
    path: str | os.PathLike,
    modules: Mapping[str, LoRAModule],
    metadata: Mapping[str, str] | None = None,
    *,
    model: Any = None,
) -> Path:
    """Write ``modules`` (our keys -> :class:`LoRAModule`) as a kohya-layout ``.safetensors``
    file, atomically: ``lora_unet_<diffusers name>`` / ``lora_te_<transformers name>`` +
    ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (the rank when ``alpha`` is None),
    ``.lora_mid.weight`` for a Tucker core. U-Net names need the U-Net's config: from
    ``model``, or from ``modules`` when it is the :class:`LoRAModules` of
    :meth:`TrainableLoRA.to_modules`. The layout diffusers' ``load_lora_weights`` and A1111
    read. Returns the path."""
    from safetensors.torch import save_file

    config = getattr(getattr(model, "unet", None), "config", None)
    config = config or getattr(modules, "unet_config", None)
    theirs = diffusers_names(list(modules), config)
    missing = [k for k in modules if k not in theirs]
    if missing:
        raise CheckpointError(f"LoRA module key '{missing[0]}' names no U-Net / text encoder layer")
    tensors: dict[str, Tensor] = {}
    for key, lora in modules.items():
        name = kohya_name(theirs[key])
        tensors[f"{name}.lora_down.weight"] = lora.down.detach().contiguous().cpu()
        tensors[f"{name}.lora_up.weight"] = lora.up.detach().contiguous().cpu()
        if lora.mid is not None:
            tensors[f"{name}.lora_mid.weight"] = lora.mid.detach().contiguous().cpu()
        alpha = float(lora.rank if lora.alpha is None else lora.alpha)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return path
