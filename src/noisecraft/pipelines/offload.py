"""Sequential CPU offload: the weights live in CPU memory and visit the GPU one module at a time.

What diffusers calls ``enable_sequential_cpu_offload`` (built there on accelerate's
``cpu_offload`` hooks): every module that owns parameters or buffers itself (a ``Linear``, a
``Conv2d``, a ``GroupNorm``, ...) gets a forward pre-hook that puts *copies* of its own tensors
on the execution device (in the execution dtype, if one is given) just before its ``forward``,
and a forward hook that puts the CPU tensors back right after it. Nothing is copied back to the
CPU (inference does not change the weights), and the GPU copies are freed as soon as the
module is done, so the GPU holds about one layer's weights plus the activations, at the price
of one host-to-device copy of every weight per forward (slow: a whole U-Net crosses PCIe at
every sampling step).

The pre-hook also moves the module's tensor inputs to the execution device (floating-point
ones to the execution dtype), so a model whose weights are on the CPU can be called with CPU
inputs; outputs stay on the execution device. A parent that reads a child's tensor without
calling the child (e.g. ``layer.weight.dtype``) sees the CPU tensor.

On a machine without CUDA the same logic runs with a "fake device": ``device="cpu"`` and
``dtype=torch.float64`` turns every module's weights into float64 copies for its forward only
(that is how the tests check it). ``device="cpu"`` without a dtype is a no-op (nothing hooked).

The same hooks are the low-memory mode's "store in one dtype, compute in another"
(:mod:`noisecraft.pipelines.lowmem`): ``device="cpu"``, ``dtype=torch.float32`` and weights
stored as float16 buffers, or as int8 buffers ``NAME`` with a per-output-channel float32
``NAME_scale`` buffer beside them (:func:`dequantize`: ``q * scale``), which the pre-hook widens
to the execution dtype for the module's forward only. ``select`` limits the hooks to some
modules (those holding stored weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from noisecraft.errors import ConfigError

#: suffix of the buffer holding the per-output-channel scales of an int8 buffer ``NAME``
SCALE_SUFFIX = "_scale"


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale``: int8 weights times their per-output-channel scales (shaped to broadcast,
    e.g. (out, 1) for a Linear), in ``scale``'s dtype; one pass, no int8 -> float copy first."""
    return torch.mul(q, scale)


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


class SequentialOffload:
    """The hooks of :func:`sequential_offload` on one or more modules; :meth:`remove` undoes them.

    ``device``: where each module runs; ``dtype``: the floating-point dtype it runs in (None =
    the weights' own dtype); ``select``: hook only the modules (owning tensors) for which it
    is true (None = all); ``workspace``: on the CPU, widen stored weights (float16 / int8
    buffers) of up to this many elements into ONE reused float32 buffer instead of a fresh
    allocation per layer and call (0 = off). A fresh multi-MB tensor is a new memory map
    whose pages the kernel faults in and zeroes on first touch; that costs about as much as
    the widening itself. Only one hooked module's forward may use it at a time (the hooked
    modules are leaves: Linear, Conv2d, Embedding); a nested use falls back to allocating.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module],
        device: str | torch.device,
        dtype: torch.dtype | None = None,
        select: Callable[[nn.Module], bool] | None = None,
        workspace: int = 0,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.workspace = workspace if self.device.type == "cpu" and dtype is not None else 0
        self._buffer: Tensor | None = None
        self._busy = False
        roots = [modules] if isinstance(modules, nn.Module) else list(modules)
        self._handles: list[RemovableHandle] = []
        self.hooked: list[nn.Module] = []
        for root in roots:
            for module in root.modules():
                if _owns_tensors(module) and (select is None or select(module)):
                    self._hook(module)

    # ------------------------------------------------------------------ moving
    def _move(self, t: Tensor) -> Tensor:
        if self.dtype is not None and t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    def _widen(self, b: Tensor, scale: Tensor | None) -> tuple[Tensor, bool]:
        """A stored buffer in the execution dtype (dequantized with ``scale`` when int8);
        True when it is a view of the workspace (released after the forward)."""
        if self._busy or not 0 < b.numel() <= self.workspace:
            if scale is not None:
                return dequantize(self._move(b), self._move(scale)), False
            return self._move(b), False
        if self._buffer is None:
            self._buffer = torch.empty(self.workspace, dtype=self.dtype)
        out = self._buffer[: b.numel()].view(b.shape)
        out.copy_(b)
        if scale is not None:
            out.mul_(scale)
        self._busy = True
        return out, True

    def _move_inputs(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return self._move(value)
        if isinstance(value, tuple):
            return tuple(self._move_inputs(v) for v in value)
        if isinstance(value, list):
            return [self._move_inputs(v) for v in value]
        if isinstance(value, dict):
            return {k: self._move_inputs(v) for k, v in value.items()}
        return value

    def _hook(self, module: nn.Module) -> None:
        home: dict[str, Any] = {}
        borrowed = [False]

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            for name, p in mod._parameters.items():
                if p is not None:
                    home["p." + name] = p
                    mod._parameters[name] = nn.Parameter(
                        self._move(p.detach()), requires_grad=p.requires_grad
                    )
            buffers = mod._buffers
            for name, b in list(buffers.items()):
                if b is None or name.endswith(SCALE_SUFFIX):
                    continue  # a scale is read with its int8 tensor
                home["b." + name] = b
                scale = buffers.get(name + SCALE_SUFFIX)
                if b.dtype == torch.int8 and scale is not None:  # int8 storage: dequantize
                    buffers[name], used = self._widen(b, scale)
                elif self.workspace and b.is_floating_point() and b.dtype != self.dtype:
                    buffers[name], used = self._widen(b, None)
                else:
                    buffers[name], used = self._move(b), False
                borrowed[0] = borrowed[0] or used
            return self._move_inputs(args), self._move_inputs(kwargs)

        def post(mod: nn.Module, args: tuple, output: Any) -> None:
            for key, t in home.items():
                kind, name = key.split(".", 1)
                (mod._parameters if kind == "p" else mod._buffers)[name] = t
            home.clear()
            if borrowed[0]:
                self._busy = borrowed[0] = False

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, always_call=True))
        self.hooked.append(module)

    def remove(self) -> None:
        """Remove every hook (the weights are on the CPU between forwards, so stay there)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.hooked.clear()


def sequential_offload(
    modules: nn.Module | Iterable[nn.Module],
    device: str | torch.device,
    dtype: torch.dtype | None = None,
) -> SequentialOffload | None:
    """Hook ``modules`` (weights on the CPU) to run each layer on ``device``; None when there is
    nothing to do (``device`` is the CPU and no ``dtype`` is asked for)."""
    if torch.device(device).type == "cpu" and dtype is None:
        return None
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    for root in roots:
        for p in root.parameters():
            if p.device.type != "cpu":
                raise ConfigError(
                    f"sequential offload keeps the weights on the CPU, but one is on {p.device}; "
                    "load the model with device='cpu' first"
                )
    return SequentialOffload(roots, device, dtype)


def offload_latent_diffusion(
    model: Any, device: str | torch.device = "cuda", dtype: torch.dtype | None = None
) -> Any:
    """A :class:`~noisecraft.models.latent_diffusion.LatentDiffusion` whose U-Net, VAE and text
    encoder run layer by layer on ``device`` with their weights on the CPU.

    The returned model's ``execution_device`` is ``device``, so :func:`generate` keeps the
    latents and the sampler's arithmetic there, and its ``offload`` holds the hooks
    (``offload.remove()`` undoes them). The modules are hooked in place (the returned model
    shares them with ``model``); ``device="cpu"`` without a ``dtype`` returns ``model``
    unchanged. Load the model in the dtype it should run in (``load_latent_diffusion(path,
    dtype=torch.float16)``): the CPU copy then takes half the memory and each transfer half
    the time; ``dtype`` here casts each layer on the way instead.
    """
    handle = sequential_offload([model.unet, model.vae, model.text_encoder], device, dtype)
    if handle is None:
        return model
    return model.replace(execution_device=torch.device(device), offload=handle)


__all__ = [
    "SCALE_SUFFIX",
    "SequentialOffload",
    "dequantize",
    "offload_latent_diffusion",
    "sequential_offload",
]
