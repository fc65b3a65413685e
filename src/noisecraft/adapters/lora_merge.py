"""LoRAs merged into a model's weights, each with its weight, and taken out bit for bit.

Merged inference (Hu et al. 2021, sec. 4.1: "no additional inference latency"): each patched
layer's weight becomes ``W + sum_i w_i * (alpha_i / r_i) * up_i @ down_i``, computed in
float32 from the ORIGINAL ``W`` and stored in ``W``'s own format. Only the patched tensors'
originals are kept (the tensors themselves, not copies: a merge puts a new tensor in their
place), so :meth:`MergedLoRAs.restore` puts back exactly what was there.

Weights are merged where they live: a parameter on any device and in any dtype (sequential
offload keeps them on the CPU between forwards), or a low-memory layer's stored ``weight``
buffer: float16 (widened, merged, rounded again) or int8 with its per-channel
``weight_scale`` (requantised by the ``requantize`` function given, e.g.
:func:`noisecraft.pipelines.lowmem.quantize_per_channel`).

A LoRA's weight may differ between the text encoder and the U-Net (A1111's
``<lora:name:te:unet>``): :class:`AppliedLoRA` holds both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.adapters.lora_files import LoRAFile
from noisecraft.adapters.lora_keys import lora_targets
from noisecraft.errors import ConfigError

__all__ = ["AppliedLoRA", "MergedLoRAs"]

_SCALE = "weight_scale"  # noisecraft.pipelines.offload.SCALE_SUFFIX on "weight"


@dataclass(frozen=True)
class AppliedLoRA:
    """A LoRA file with its weights: ``te_weight`` on the text encoder, ``unet_weight`` on
    the U-Net (both ``weight`` usually)."""

    lora: LoRAFile
    te_weight: float = 1.0
    unet_weight: float = 1.0

    @classmethod
    def of(cls, lora: LoRAFile, weight: float = 1.0) -> AppliedLoRA:
        return cls(lora, float(weight), float(weight))

    def weight_for(self, key: str) -> float:
        return self.unet_weight if key.startswith("unet.") else self.te_weight

    @property
    def signature(self) -> tuple[str, float, float]:
        return (str(self.lora.path), self.te_weight, self.unet_weight)


def _stored(module: nn.Module) -> tuple[str, Tensor, Tensor | None]:
    """(where the weight lives: "param" / "buffer", the tensor, its int8 scale or None)."""
    p = module._parameters.get("weight")
    if p is not None:
        return "param", p.data, None
    b = module._buffers.get("weight")
    if b is None:
        raise ConfigError(f"a {type(module).__name__} layer without a weight cannot take a LoRA")
    return "buffer", b, module._buffers.get(_SCALE)


class MergedLoRAs:
    """The LoRAs merged into ``model`` now (module docstring). :meth:`apply` sets the whole
    set (nothing is recomputed when it is unchanged); :meth:`restore` merges none."""

    def __init__(
        self,
        model: Any,
        requantize: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ):
        self.model = model
        self.requantize = requantize
        self.applied: tuple[AppliedLoRA, ...] = ()
        self.baked = False
        # key -> (module, where, original weight, original scale)
        self._originals: dict[str, tuple[nn.Module, str, Tensor, Tensor | None]] = {}

    def apply(self, loras: Sequence[AppliedLoRA]) -> None:
        """Merge exactly ``loras`` (in this order) into the model, from its original weights."""
        loras = tuple(loras)
        if [a.signature for a in loras] == [a.signature for a in self.applied]:
            return
        if self.baked:
            raise ConfigError("these LoRAs are baked into the weights (bake()); they cannot change")
        self.restore()
        targets = lora_targets(self.model)
        keys: dict[str, None] = {}
        for a in loras:
            for key in a.lora.modules:
                if key not in targets:
                    raise ConfigError(f"{a.lora.path.name}: its layer {key} is not in this model")
                keys[key] = None
        try:
            for key in keys:
                self._merge(key, targets[key], [a for a in loras if key in a.lora.modules])
        except BaseException:
            self.restore()
            raise
        self.applied = loras

    def _merge(self, key: str, module: nn.Module, loras: list[AppliedLoRA]) -> None:
        where, w, scale = _stored(module)
        if w.dtype == torch.int8 and (scale is None or self.requantize is None):
            raise ConfigError("LoRAs cannot be merged into int8 weights that have no requantiser")
        full = w.float() * scale if scale is not None else w.float()
        for a in loras:
            lora = a.lora.modules[key]
            delta = lora.delta(a.weight_for(key), full.shape)
            full = full + delta.to(full.device)
        self._originals[key] = (module, where, w, scale)
        if w.dtype == torch.int8:
            q, s = self.requantize(full)  # type: ignore[misc]
            module._buffers["weight"] = q.to(w.device)
            module._buffers[_SCALE] = s.to(device=scale.device, dtype=scale.dtype)  # type: ignore[union-attr]
        elif where == "param":
            module._parameters["weight"].data = full.to(w.dtype)  # type: ignore[union-attr]
        else:
            module._buffers["weight"] = full.to(w.dtype)

    def restore(self) -> None:
        """Put every patched weight back as it was (the original tensors themselves)."""
        for module, where, w, scale in self._originals.values():
            if where == "param":
                module._parameters["weight"].data = w  # type: ignore[union-attr]
            else:
                module._buffers["weight"] = w
                if scale is not None:
                    module._buffers[_SCALE] = scale
        self._originals.clear()
        self.applied = ()

    def bake(self) -> None:
        """Keep the merged weights for good and free the originals (before quantising the
        model, e.g.); :meth:`apply` then refuses another set."""
        self._originals.clear()
        self.baked = True

    @property
    def patched(self) -> list[str]:
        """Keys of the layers whose weights are merged now."""
        return list(self._originals)
