"""One LoRA module: the low-rank weight change of one Linear / Conv2d layer.

LoRA (Hu et al. 2021, eq. 3) freezes a layer's weight ``W`` (out x in) and learns
``delta W = B A`` with ``A`` (r x in, kohya's ``lora_down``, PEFT's ``lora_A``) and ``B``
(out x r, ``lora_up`` / ``lora_B``), scaled by ``alpha / r``; a user weight multiplies it
(``<lora:name:0.8>``). For a convolution (LoCon), ``down`` is a convolution with the layer's
kernel (r x in x k x k) and ``up`` a 1x1 one (out x r x 1 x 1), so ``delta W`` is the product
of ``up`` with ``down`` flattened, reshaped to (out, in, k, k). LyCORIS' Tucker form adds a
core ``mid`` (r x r x k x k) between a 1x1 ``down`` and a 1x1 ``up``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LoRAModule"]


@dataclass(frozen=True)
class LoRAModule:
    """``down`` (r x in [x k x k]), ``up`` (out x r [x 1 x 1]), ``alpha`` (None = r, a
    scale of 1) and an optional Tucker ``mid`` (r x r x k x k). See the module docstring."""

    down: Tensor
    up: Tensor
    alpha: float | None = None
    mid: Tensor | None = None

    def __post_init__(self) -> None:
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise ValueError("LoRA down / up weights must be 2-D (Linear) or 4-D (Conv2d)")
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"LoRA up {tuple(self.up.shape)} and down {tuple(self.down.shape)} ranks differ"
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """The kernel the change has: (1, 1) for a Linear or 1x1 LoRA."""
        src = self.mid if self.mid is not None else self.down
        return (int(src.shape[2]), int(src.shape[3])) if src.ndim == 4 else (1, 1)

    @property
    def scale(self) -> float:
        """``alpha / r`` (kohya / A1111 convention; 1 when there is no alpha)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(
        self, scale: float = 1.0, shape: torch.Size | tuple[int, ...] | None = None
    ) -> Tensor:
        """``scale * (alpha / r) * up @ down`` in float32, shaped (out, in) for a Linear LoRA
        and (out, in, k, k) for a convolution, or as ``shape`` (a 1x1 convolution's weight
        from a Linear LoRA and back: same numbers, another shape)."""
        up = self.up.float().flatten(1)  # (out, r)
        if self.mid is None:
            down = self.down.float()
            w = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        else:  # W[o, i, h, w] = sum_ab up[o, a] mid[a, b, h, w] down[b, i]
            down = self.down.float().flatten(1)  # (r, in)
            w = torch.einsum("oa,abhw,bi->oihw", up, self.mid.float(), down)
        w = w * (scale * self.scale)
        if shape is not None and tuple(w.shape) != tuple(shape):
            w = w.reshape(shape)
        return w
