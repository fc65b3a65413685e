"""Trainable LoRA layers added to a model without changing it (Hu et al. 2021).

Each target layer ``W`` (Linear or Conv2d) gets a forward hook that adds
``(alpha / r) * up(down(x))`` to its output (eq. 3 of the paper, unmerged): ``down`` is a
Linear (r x in) or a convolution with the layer's kernel, stride and padding (r x in x k x k),
``up`` a Linear / 1x1 convolution (out x r). As in kohya's scripts and PEFT, ``down`` starts
as ``kaiming_uniform_(a=sqrt(5))`` (a Linear's default) and ``up`` at zero, so the model is
unchanged until training moves ``up``. The base weights are never touched and the model's
modules and state dict keep their names; :meth:`TrainableLoRA.remove` takes the hooks off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from noisecraft.adapters.lora_files import LoRAModules
from noisecraft.adapters.lora_keys import lora_targets
from noisecraft.adapters.lora_module import LoRAModule
from noisecraft.errors import ConfigError, closest

__all__ = ["TrainableLoRA", "add_trainable_lora"]


class _Pair(nn.Module):
    """``down`` then ``up`` for one layer, times ``scale``."""

    def __init__(self, layer: nn.Module, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        w = layer.weight
        kw: dict[str, Any] = {"bias": False, "device": w.device, "dtype": torch.float32}
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ConfigError("LoRA needs ungrouped convolutions (groups = 1)")
            self.down: nn.Module = nn.Conv2d(
                layer.in_channels,
                rank,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                **kw,
            )
            self.up: nn.Module = nn.Conv2d(rank, layer.out_channels, 1, **kw)
        else:
            self.down = nn.Linear(layer.in_features, rank, **kw)
            self.up = nn.Linear(rank, layer.out_features, **kw)
        with torch.no_grad():
            init = torch.empty(self.down.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
            self.down.weight.copy_(init)
            self.up.weight.zero_()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * self.scale


class TrainableLoRA(nn.Module):
    """LoRA layers hooked onto a model's layers (module docstring); build with
    :func:`add_trainable_lora`. ``parameters()`` are the LoRA weights only; ``keys`` the
    patched layers' keys (:func:`~noisecraft.adapters.lora_keys.lora_targets`)."""

    def __init__(self, keys: list[str], pairs: list[_Pair], alpha: float, unet_config: Any):
        super().__init__()
        self.keys = keys
        self.pairs = nn.ModuleList(pairs)
        self.alpha = alpha
        self.unet_config = unet_config
        self._handles: list[RemovableHandle] = []

    def _attach(self, layers: list[nn.Module]) -> None:
        for layer, pair in zip(layers, self.pairs, strict=True):
            self._handles.append(layer.register_forward_hook(_hook(pair)))

    def to_modules(self) -> LoRAModules:
        """The trained weights as :class:`LoRAModule` s keyed by layer (for
        :func:`~noisecraft.adapters.lora_files.write_kohya_lora` and merging); copies."""
        return LoRAModules(
            {
                key: LoRAModule(
                    down=pair.down.weight.detach().clone(),
                    up=pair.up.weight.detach().clone(),
                    alpha=self.alpha,
                )
                for key, pair in zip(self.keys, self.pairs, strict=True)
            },
            unet_config=self.unet_config,
        )

    def remove(self) -> None:
        """Take the hooks off: the model computes exactly what it did before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)


def _hook(pair: _Pair):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + pair(args[0]).to(output.dtype)

    return hook


def add_trainable_lora(
    model: Any,
    targets: Iterable[str],
    rank: int,
    alpha: float | None = None,
    init_seed: int = 0,
) -> TrainableLoRA:
    """Hook trainable rank-``rank`` LoRA layers (float32) onto ``model``'s layers named by
    ``targets`` (keys of :func:`~noisecraft.adapters.lora_keys.lora_targets`); ``alpha``
    None = ``rank`` (scale 1). ``init_seed`` seeds the ``down`` initialisation. The base
    weights are left as they are (freeze them yourself); :meth:`TrainableLoRA.remove` undoes
    it."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    available = lora_targets(model)
    keys = list(dict.fromkeys(targets))
    if not keys:
        raise ConfigError("LoRA targets is empty; name at least one layer")
    for key in keys:
        if key not in available:
            guess = closest(key, available)
            hint = f"did you mean '{guess}'? " if guess else ""
            raise ConfigError(
                f"unknown LoRA target layer '{key}'; {hint}lora_targets(model) lists them"
            )
    alpha = float(rank if alpha is None else alpha)
    generator = torch.Generator().manual_seed(int(init_seed))
    layers = [available[k] for k in keys]
    pairs = [_Pair(layer, rank, alpha / rank, generator) for layer in layers]
    config = getattr(getattr(model, "unet", None), "config", None)
    lora = TrainableLoRA(keys, pairs, alpha, config)
    lora._attach(layers)
    return lora
