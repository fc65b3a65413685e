"""Opt-in ``torch.compile`` of a model's U-Net, the network sampling calls once per step.

On this project's CPU machines it does NOT pay (docs/performance.md, "torch.compile": the
compiled U-Net was 10-15 % slower than the eager one with noisecraft's CPU kernels, 35-90 s
to compile, and each compiled shape kept its own frozen copy of the weights); on a GPU,
inductor's fused kernels are usually worth their compile time over many images. So it is a
switch (``noisecraft generate --compile``), off by default.

:func:`compile_unet` compiles the module in place (``nn.Module.compile``: ``unet(...)`` runs
the compiled graph; the module, its type and its state dict stay as they are), one static
graph per input shape. On the CPU it turns on inductor's ``freezing`` (weights folded into the
graph as constants and pre-packed for oneDNN), without which the compiled U-Net's linear layers
run 2.3x slower (measured with ``bench/sd_speed.py --compile``). Any image size compiles (one
graph per size; odd U-Net levels included). DeepCache is refused with it: its feature cache
changes which blocks ``UNet.forward`` runs from call to call.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from noisecraft.errors import ConfigError


def compile_unet(model: Any, *, mode: str | None = None) -> Any:
    """Compile ``model.unet`` in place (``model`` is a pixel or latent diffusion model, or a
    U-Net itself) and return ``model``. ``mode``: ``torch.compile``'s (None, "reduce-overhead",
    "max-autotune")."""
    unet = getattr(model, "unet", model)
    if not isinstance(unet, nn.Module):
        raise ConfigError(
            f"@compile needs a model with a U-Net, got {type(model).__name__}", settings=["compile"]
        )
    params = list(unet.parameters())
    if params and params[0].device.type == "cpu":
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant weights, pre-packed for oneDNN (module docstring)
    unet.compile(mode=mode, dynamic=False)
    return model


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs through ``torch.compile`` (:func:`compile_unet`)."""
    return getattr(module, "_compiled_call_impl", None) is not None
